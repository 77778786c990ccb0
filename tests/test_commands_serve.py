"""`loramix serve`: the command serves a saved folder; SIGTERM drains and exits; bad flags."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from serving_server import free_port, tiny_xlora
from tiny_tokenizer import save_tiny_model

import loramix.serving.app as app_module
from loramix.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(base model folder, X-LoRA folder): the tiny model of the serving tests, saved."""
    root = tmp_path_factory.mktemp("serve")
    model, _ = tiny_xlora(root)
    model.save_pretrained(root / "xlora")
    save_tiny_model(root / "base")  # the same seed-0 base weights and tokenizer
    return root / "base", root / "xlora"


def test_sigterm_finishes_running_requests_then_exits(folders) -> None:
    base, xlora = folders
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "loramix.cli", "serve", str(xlora), "--base", str(base)]
    process = subprocess.Popen(
        [*command, "--port", str(port), "--threads", "1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        started = time.monotonic()
        deadline = started + 60
        while True:
            assert process.poll() is None, process.stdout.read().decode()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        print(f"server up after {time.monotonic() - started:.1f} s")
        body = {
            "model": "xlora",
            "prompt": "the quick brown fox",
            "max_tokens": 150,
            "temperature": 0,
            "stream": True,
        }
        reasons, last = [], ""
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            for line in lines:
                if line.startswith("data: {"):
                    break
            process.send_signal(signal.SIGTERM)
            for line in lines:
                if line.startswith("data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    reasons.append(choice["finish_reason"])
                last = line or last
        assert last == "data: [DONE]"
        assert reasons[-1] == "length"  # the running request got all its 150 tokens
        with pytest.raises(httpx.TransportError):  # refused: the socket is closed
            httpx.post(url + "/v1/completions", json=body)
        # uvicorn drains, then re-raises the signal: the exit status says SIGTERM (shell: 143)
        assert process.wait(timeout=30) == -signal.SIGTERM
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_bad_folder_and_flags_fail_with_the_fix(tmp_path: Path, capsys) -> None:
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "save_pretrained" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--port", "0"]) == 2
    assert "--port=0" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--max-batch", "0"]) == 2
    assert "max_batch=0" in capsys.readouterr().err


def test_serves_on_the_recorded_base_and_rendering(folders, tmp_path, monkeypatch, caplog) -> None:
    """No --base: the base recorded in the folder loads; the card shows training's rendering."""
    base, xlora = folders
    folder = tmp_path / "plain"
    shutil.copytree(xlora, folder)
    record = json.loads((folder / "base_model.json").read_text())
    (folder / "base_model.json").write_text(json.dumps({**record, "name": str(base)}))
    prompts = {"chat": False, "chat_template": None}
    (folder / "training_args.json").write_text(json.dumps({"prompts": prompts}))
    served = []
    monkeypatch.setattr(app_module, "run_server", lambda app, **_: served.append(app))
    with caplog.at_level("INFO"):
        assert main(["serve", str(folder), "--threads", "1", "--device", "cpu"]) == 0
    service = served[0].state.service
    assert {p.device.type for p in service.model.parameters()} == {"cpu"}
    assert service.model.base_model.config.name_or_path == str(base)  # not the default smollm2
    assert f"base model: {base}" in caplog.text
    (card,) = TestClient(served[0]).get("/v1/models").json()["data"]
    assert card["prompt_rendering"] == {"chat": False}
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert sum("/v1/completions matches its training" in w for w in warnings) == 1
