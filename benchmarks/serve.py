"""Load test of `loramix serve` on the bundled science model (127.0.0.1 only, bounded).

Starts `loramix serve models/science-xlora` (SmolLM2-135M-Instruct and its experts) in a
subprocess on a free local port, then, for the granular and frozen scalings modes, runs 1, 4,
8 and 16 concurrent clients; each client sends streaming greedy `/v1/completions` requests
(science questions; `ignore_eos`, so each generates exactly `max_tokens` tokens: 32, or 64
without --quick) one after the other until its share of the level's
requests is done. Reported per level: aggregate throughput (generated tokens/s of all clients
over the level's wall time), p50 and p99 request latency, p50 time to first token, and how
many greedy answers differ from the same prompt's answer at 1 client (batched answers should
equal lone ones). Then 200 requests (8 or 16 tokens each) under 16 clients: none may be lost
or fail. The server's
resident memory (RSS, from /proc) is read after the warm-up and at the end.

Everything stops by itself: fixed request counts, plus `--time-limit` seconds overall (levels
not reached are reported as skipped).

    .venv/bin/python benchmarks/serve.py --quick     # ~3 minutes on 2 CPU cores
    .venv/bin/python benchmarks/serve.py             # twice the requests and tokens
    .venv/bin/python benchmarks/serve.py --quick --levels 1 8 --modes frozen --no-stress

Per level it also reads the server's `/metrics` before and after: the share of the wall time
in prefills and in decode steps, the mean decode batch and the mean decode step time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "What peptide do the DNA codons ATG GCC TTT encode?",
    "What is the reverse complement of the DNA codons ATG AAA CCC?",
    "What is the molar mass of H2SO4 in g/mol?",
    "How many atoms are in one molecule of C6H12O6?",
    "What is the net charge of the peptide KKDE at pH 7?",
    "What is the molecular weight of the peptide MAF in Da?",
    "A rod of cross-section 2 cm^2 carries 1000 N. What is the stress in MPa?",
    "A spring with k = 200 N/m is stretched by 5 cm. What is the force in N?",
]
CLIENTS = (1, 4, 8, 16)
MODES = ("granular", "frozen")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def one_request(client: httpx.AsyncClient, body: dict) -> dict:
    """Streams one completion; returns latency, time to first token, tokens and text."""
    start = time.perf_counter()
    first = None
    text, tokens, reason = "", 0, None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            return {"ok": False, "status": response.status_code}
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "usage" in chunk and not chunk["choices"]:
                tokens = chunk["usage"]["completion_tokens"]
                continue
            choice = chunk["choices"][0]
            if first is None and choice["text"]:
                first = time.perf_counter() - start
            text += choice["text"]
            reason = choice["finish_reason"] or reason
    latency = time.perf_counter() - start
    return {
        "ok": reason is not None,
        "latency": latency,
        "ttft": first if first is not None else latency,
        "tokens": tokens,
        "text": text,
        "prompt": body["prompt"],
    }


async def run_level(url: str, clients: int, requests: int, body: dict, deadline: float) -> dict:
    """`clients` concurrent clients sharing `requests` requests; prompts cycle over QUESTIONS."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(requests):
        queue.put_nowait(index)
    results: list[dict] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        while not queue.empty() and time.monotonic() < deadline:
            index = queue.get_nowait()
            prompt = QUESTIONS[index % len(QUESTIONS)]
            try:
                results.append(await one_request(client, {**body, "prompt": prompt}))
            except httpx.HTTPError as error:
                results.append({"ok": False, "error": repr(error)})

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        wall = time.perf_counter() - start
    done = [r for r in results if r["ok"]]
    latencies = sorted(r["latency"] for r in done)
    return {
        "clients": clients,
        "requests": len(results),
        "failed": len(results) - len(done),
        "lost": requests - len(results),
        "tokens": sum(r["tokens"] for r in done),
        "wall_s": wall,
        "tokens_per_s": sum(r["tokens"] for r in done) / wall,
        "p50_s": statistics.median(latencies) if latencies else None,
        "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
        if latencies
        else None,
        "ttft_p50_s": statistics.median(r["ttft"] for r in done) if done else None,
        "answers": {r["prompt"]: r["text"] for r in done},
    }


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE"}
    command = [sys.executable, "-m", "loramix.cli", "serve", args.model, "--port", str(port)]
    command += ["--max-batch", "16", "--threads", str(args.threads)]
    return subprocess.Popen(command, env=env)


def wait_ready(url: str, server: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with status {server.returncode}")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not start")


def engine_counters(url: str) -> dict[str, float]:
    """The engine's cumulative forward seconds by phase and decode-step batch sizes."""
    wanted = {
        'loramix_forward_seconds_total{phase="prefill"}': "prefill_s",
        'loramix_forward_seconds_total{phase="decode"}': "decode_s",
        "loramix_batch_size_sum": "batch_rows",
        "loramix_batch_size_count": "decode_steps",
    }
    counters = dict.fromkeys(wanted.values(), 0.0)
    for line in httpx.get(url + "/metrics").text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in wanted:
            counters[wanted[name]] = float(value)
    return counters


async def benchmark(args: argparse.Namespace, url: str, pid: int) -> dict:
    deadline = time.monotonic() + args.time_limit
    scale = 1 if args.quick else 2
    # ignore_eos: every request generates max_tokens tokens (the science answers end after ~5)
    model_id = Path(args.model).resolve().name  # what `loramix serve` names it
    body = {"model": model_id, "max_tokens": 32 * scale, "temperature": 0}
    body["ignore_eos"] = True
    body["stream"], body["stream_options"] = True, {"include_usage": True}
    await run_level(url, 1, 2, body, deadline)  # warm-up
    report: dict = {"rss_before_mib": rss_mib(pid), "levels": []}
    for mode in args.modes:
        alone: dict[str, str] = {}
        for clients in args.levels:
            if time.monotonic() > deadline:
                report["levels"].append({"mode": mode, "clients": clients, "skipped": True})
                continue
            requests = max(4, 2 * clients) * scale
            before = engine_counters(url)
            level = await run_level(
                url, clients, requests, {**body, "scalings_mode": mode}, deadline
            )
            after = engine_counters(url)
            spent = {key: after[key] - before[key] for key in after}
            level["prefill_share"] = spent["prefill_s"] / level["wall_s"]
            level["decode_share"] = spent["decode_s"] / level["wall_s"]
            level["mean_decode_batch"] = spent["batch_rows"] / max(spent["decode_steps"], 1)
            level["decode_step_ms"] = 1000 * spent["decode_s"] / max(spent["decode_steps"], 1)
            answers = level.pop("answers")
            if clients == 1:
                alone = answers
            level["differ_from_1_client"] = sum(
                1 for p, text in answers.items() if p in alone and alone[p] != text
            )
            report["levels"].append({"mode": mode, **level})
            print(json.dumps(report["levels"][-1]), flush=True)
    if args.no_stress:
        report["rss_after_mib"] = rss_mib(pid)
        return report
    stress = {**body, "max_tokens": 8 * scale, "scalings_mode": "granular"}
    level = await run_level(url, 16, 200, stress, deadline + 600)  # bounded by its 200 requests
    level.pop("answers")
    report["stress_200_requests_16_clients"] = level
    report["rss_after_mib"] = rss_mib(pid)
    return report


def print_table(report: dict, command: str) -> None:
    print(f"\n`{command}` (indicative: measured on a shared, loaded machine)\n")
    print(
        "| mode | clients | requests | tokens/s | x 1 client | p50 s | p99 s | TTFT p50 | differ "
        "| prefill % | decode % | decode batch | step ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    single = {}
    for level in report["levels"]:
        if level.get("skipped"):
            print(f"| {level['mode']} | {level['clients']} | skipped (time limit) |||||||")
            continue
        if level["clients"] == 1:
            single[level["mode"]] = level["tokens_per_s"]
        ratio = level["tokens_per_s"] / single[level["mode"]] if level["mode"] in single else 0
        print(
            f"| {level['mode']} | {level['clients']} | {level['requests']} | "
            f"{level['tokens_per_s']:.1f} | {ratio:.2f} | {level['p50_s']:.2f} | "
            f"{level['p99_s']:.2f} | {level['ttft_p50_s']:.2f} | "
            f"{level['differ_from_1_client']} | {100 * level['prefill_share']:.0f} | "
            f"{100 * level['decode_share']:.0f} | {level['mean_decode_batch']:.1f} | "
            f"{level['decode_step_ms']:.0f} |"
        )
    stress = report.get("stress_200_requests_16_clients")
    if stress is None:
        print(f"\nServer RSS {report['rss_after_mib']:.0f} MiB at the end (no stress run).")
        return
    print(
        f"\n200 requests under 16 clients: {stress['requests'] - stress['failed']} answered, "
        f"{stress['failed']} failed, {stress['lost']} lost, {stress['tokens_per_s']:.1f} tokens/s, "
        f"p99 {stress['p99_s']:.2f} s. Server RSS {report['rss_before_mib']:.0f} MiB after the "
        f"warm-up, {report['rss_after_mib']:.0f} MiB at the end."
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="half the requests and tokens")
    parser.add_argument("--model", default=str(ROOT / "models" / "science-xlora"))
    parser.add_argument("--threads", type=int, default=2, help="the server's torch threads")
    parser.add_argument("--time-limit", type=float, default=900, help="seconds for the levels")
    parser.add_argument("--levels", type=int, nargs="+", default=list(CLIENTS), help="clients")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--no-stress", action="store_true", help="skip the 200-request run")
    parser.add_argument("--json", default=None, help="also write the report here")
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(args, port)
    try:
        wait_ready(url, server)
        report = asyncio.run(benchmark(args, url, server.pid))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(120)
    command = "python " + " ".join(["benchmarks/serve.py", *sys.argv[1:]])
    print_table(report, command)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
