"""`loramix eval` on a tiny X-LoRA folder: table, report files, targets, heatmaps, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import LLAMA_TARGETS, make_expert
from tiny_tokenizer import save_tiny_model
from transformers import AutoModelForCausalLM

from loramix import XLoraConfig, XLoraModel
from loramix.cli import main
from loramix.evaluation.report import EvalReport


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    base = save_tiny_model(root / "base")

    def load() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(base).eval()

    experts = {
        name: str(make_expert(load, root / "experts" / name, seed, LLAMA_TARGETS))
        for name, seed in (("bio", 1), ("chem", 2))
    }
    model = XLoraModel(load(), XLoraConfig(adapters=experts, xlora_size=8))
    model.save_pretrained(root / "xlora")
    files = {}
    for name, words in (("bio", "quick brown fox"), ("chem", "lazy dog"), ("mixed", "hello")):
        files[name] = root / f"{name}.jsonl"
        files[name].write_text(
            "".join(
                json.dumps({"prompt": f"{words} {i}?", "completion": f"answer {i}"}) + "\n"
                for i in range(3)
            )
        )
    return {"root": root, "base": base, "xlora": root / "xlora", **files}


def test_eval_prints_the_table_and_writes_report_and_plots(setup, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    code = main(
        [
            "eval", str(setup["xlora"]), "--base", str(setup["base"]),
            "--test", f"bio={setup['bio']}", "--test", f"chem={setup['chem']}",
            "--test", f"mixed={setup['mixed']}",
            "--out", str(out), "--limit", "2", "--max-new-tokens", "2", "--plots",
            "--blocks", "1:2",
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    assert "| system | bio | chem | mixed |" in printed
    for system in ("base", "expert:bio", "expert:chem", "uniform", "xlora"):
        assert f"| {system} |" in printed
    for target in ("bio: X-LoRA NLL within 10%", "chem: X-LoRA", "mixed: X-LoRA NLL beats"):
        assert target in printed
    report = EvalReport.read(out)
    assert report.score("xlora", "bio").n_examples == 2
    assert set(report.usage) == {"bio", "chem", "mixed"}
    names = {p.name for p in out.iterdir()}
    assert {"eval.json", "eval.md", "expert_usage.png", "layers_bio.png", "tokens_mixed.png"} <= (
        names
    )
    assert len(json.loads((out / "eval.json").read_text())["targets"]) == 3
    markdown = (out / "eval.md").read_text()  # every system against X-LoRA, paired
    paired = markdown[markdown.index("## Against xlora, paired") :]
    base_row = next(line for line in paired.splitlines() if line.startswith("| base |"))
    assert base_row.count("[") == 3 and "| xlora |" not in paired.split("\n\n")[1]


def test_eval_with_chosen_systems_and_expert_mapping(setup, tmp_path, capsys) -> None:
    code = main(
        [
            "eval", str(setup["xlora"]), "--base", str(setup["base"]),
            "--test", f"domain={setup['bio']}", "--expert-for", "domain=chem",
            "--systems", "expert:chem", "xlora", "--max-new-tokens", "0", "--limit", "1",
            "--out", str(tmp_path / "o"),
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    assert "domain: X-LoRA NLL within 10% of expert:chem" in printed
    assert "| base |" not in printed and " / - |" in printed


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--test", "nofile"], "write it as NAME=FILE"),
        (["--test", "a=missing.jsonl"], "missing.jsonl does not exist"),
        (["--systems", "gpt"], "unknown ['gpt']"),
        (["--blocks", "3"], "START:END"),
        (["--expert-for", "bio=phys"], "unknown expert(s) phys"),
        (["--plots", "--blocks", "40:50"], "no adapted module lies in blocks 40 to 49"),
        (["--systems", "base", "xlora", "--reference", "uniform"], "--reference 'uniform': comp"),
        (["--systems", "xlora", "--reference", "xlora"], "compare it with other evaluated"),
        (["--systems", "gpt", "--batch-size", "0"], "batch_size=0"),  # both problems named
        (["--systems", "gpt", "--batch-size", "0"], "unknown ['gpt']"),
    ],
)
def test_eval_errors_say_what_to_do(setup, tmp_path, capsys, flags, message) -> None:
    argv = ["eval", str(setup["xlora"]), "--base", str(setup["base"]), "--out", str(tmp_path)]
    if "--test" not in flags:
        argv += ["--test", f"bio={setup['bio']}", "--limit", "1", "--max-new-tokens", "0"]
    assert main(argv + flags) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--expert-for", "bio=phys"], "unknown expert(s) phys"),
        (["--plots", "--blocks", "40:50"], "no adapted module lies in blocks 40 to 49"),
        (["--out", "{file}/report"], "is a file; give a folder"),
        (["--out", "{file}"], "is a file; give a folder"),
    ],
)
def test_eval_checks_its_flags_before_it_evaluates(
    setup, tmp_path, capsys, monkeypatch, flags, message
) -> None:
    import loramix.evaluation.runner as runner

    monkeypatch.setattr(runner, "evaluate", lambda *a, **k: pytest.fail("evaluated"))
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    argv = ["eval", str(setup["xlora"]), "--base", str(setup["base"]), "--out", str(tmp_path)]
    argv += ["--test", f"bio={setup['bio']}", "--limit", "1", "--max-new-tokens", "0"]
    assert main(argv + [flag.format(file=file) for flag in flags]) == 2
    assert message in capsys.readouterr().err
    assert file.read_text() == "mine"


def test_eval_renders_prompts_as_training_did(setup, tmp_path, caplog) -> None:
    import logging
    import shutil

    trained = tmp_path / "trained"
    shutil.copytree(setup["xlora"], trained)
    record = {"command": "train-gate", "prompts": {"chat": False, "chat_template": None}}
    (trained / "training_args.json").write_text(json.dumps(record))
    argv = ["eval", str(trained), "--test", f"bio={setup['bio']}", "--limit", "1"]
    argv += ["--max-new-tokens", "0", "--systems", "xlora"]  # no --base: the recorded one
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "eval.json").read_text())["settings"]["chat"] is False
    with caplog.at_level(logging.WARNING, logger="loramix.records"):
        assert main([*argv, "--out", str(tmp_path / "b"), "--chat"]) == 0
    said = "training rendered prompts plain (no chat template), but they are rendered with the"
    assert said in caplog.text
    assert json.loads((tmp_path / "b" / "eval.json").read_text())["settings"]["chat"] is True


def test_a_bad_reference_fails_before_any_scoring(setup, tmp_path, capsys, monkeypatch) -> None:
    def never(*args, **kwargs):
        raise AssertionError("evaluate ran")

    monkeypatch.setattr("loramix.evaluation.runner.evaluate", never)
    argv = ["eval", str(setup["xlora"]), "--base", str(setup["base"]), "--out", str(tmp_path)]
    argv += ["--test", f"bio={setup['bio']}", "--reference", "expert:bio", "--systems", "base"]
    assert main(argv) == 2
    assert "--reference 'expert:bio'" in capsys.readouterr().err


def test_the_paired_table_takes_the_reference_asked_for(setup, tmp_path) -> None:
    argv = ["eval", str(setup["xlora"]), "--base", str(setup["base"])]
    argv += ["--test", f"bio={setup['bio']}", "--limit", "2", "--max-new-tokens", "0"]
    assert (
        main(
            [
                *argv,
                "--systems",
                "base",
                "xlora",
                "--reference",
                "base",
                "--out",
                str(tmp_path / "a"),
            ]
        )
        == 0
    )
    paired = (tmp_path / "a" / "eval.md").read_text().split("## Against base, paired")[1]
    assert "| xlora | " in paired and "| base | " not in paired.split("Cells:")[0]
    assert main([*argv, "--systems", "xlora", "--out", str(tmp_path / "b")]) == 0
    assert "paired" not in (tmp_path / "b" / "eval.md").read_text()  # nothing to compare with
