"""Generation speed of loramix's X-LoRA against its base model and peft's X-LoRA, in one run.

Setup: a random-weight model with SmolLM2-135M's config (a 30-layer Llama, hidden
576, intermediate 1536, 9 heads, 3 KV heads, vocabulary 49152, tied embeddings), 8 random
experts of rank 8 on all seven projections, a 64-token prompt, 128 new tokens, greedy, two
CPU threads. Tokens/s count generated tokens of all sequences over the whole `generate` call
(prefill and, in merged mode, merging and restoring included). Each configuration runs
`--repeats` times at batch 1 (`--repeats-batched` times above), interleaved with the others;
the ratios use each one's best time (the run least disturbed by other processes on a shared
machine), the median is shown beside them.
peft's X-LoRA runs once (it re-runs the whole sequence twice per token, without a KV cache),
on the same model, experts, prompt and gate weights, and its tokens are compared with
loramix's granular ones.

OpenMP threads wait passively (`OMP_WAIT_POLICY=PASSIVE`, set here unless already set): on a
machine shared with other jobs, spinning threads stall every parallel op until the other
job's time slice ends (a 576x64x576 matmul took 16 ms instead of 1 ms), which buries the
differences being measured. The policy applies to every model alike.

Peak memory: the growth of the process's resident set during the call above what it was
just before (sampled every 2 ms, after returning freed memory to the system), plus the
weights each model holds.

    .venv/bin/python benchmarks/generate.py                 # the full run (several minutes)
    .venv/bin/python benchmarks/generate.py --new-tokens 16 --repeats 1 --skip-peft  # smoke
    .venv/bin/python benchmarks/generate.py --dtype float32 float16 bfloat16 --model science

`--dtype` runs every mode at each dtype (base and experts in it, the gate in float32), always
with the float32 base as the reference; `--model science` uses the bundled science model
(SmolLM2-135M-Instruct and its 8 experts; `--bundle` names another, such as
models/science-xlora-v1 with 4) instead of the random one. The mode
`fixed-mixes` (batch > 1) gives every sequence its own mix through `fixed_scalings`
(`per_sequence=True`): no scaling pass, the path a server batching requests takes.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP; see above

import argparse  # noqa: E402
import contextlib  # noqa: E402
import ctypes  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import make_experts, random_base  # noqa: E402

from loramix import XLoraConfig, XLoraModel  # noqa: E402
from loramix.science.bundle import DEFAULT_BUNDLE  # noqa: E402

# Batch 1: tokens/s x the float32 base's in the same run.
TARGETS = {
    "granular float32": 0.45,
    "frozen float32": 0.8,
    "merged float32": 0.9,
    "granular float16": 1.15,
    "frozen float16": 1.8,
    "merged float16": 2.2,
}
BATCHED_TARGET = 0.8  # batch > 1, different mixes per sequence: x the base at the same dtype
PEFT_TARGET = 20.0  # granular x peft tokens/s


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def trim_memory() -> None:
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


CLOCK = time.perf_counter  # `--clock cpu` switches to the process's CPU time


def measure(fn: Callable[[], torch.Tensor]) -> tuple[float, int, torch.Tensor]:
    """Runs `fn` once: (seconds, peak RSS growth in bytes, its output)."""
    trim_memory()
    base = rss_bytes()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.002):
            peak[0] = max(peak[0], rss_bytes())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = CLOCK()
    out = fn()
    seconds = CLOCK() - start
    stop.set()
    thread.join()
    peak[0] = max(peak[0], rss_bytes())
    return seconds, peak[0] - base, out


def weight_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def build_models(
    args: argparse.Namespace, dtype: torch.dtype
) -> tuple[torch.nn.Module, XLoraModel, str]:
    """The base model and the X-LoRA model at `dtype`, and a line describing them."""
    if args.model == "science":
        from loramix.smollm2 import load_base_model

        base = load_base_model("smollm2", dtype=dtype)[0]
        model = XLoraModel.from_pretrained(load_base_model("smollm2", dtype=dtype)[0], args.bundle)
        what = f"science model {args.bundle.as_posix()}"
    else:
        base = random_base().to(dtype)
        model = XLoraModel(random_base(), XLoraConfig(adapters=args.adapters))
        torch.manual_seed(1)
        torch.nn.init.normal_(model.gate.layers[-1].weight, std=0.05)  # visibly uneven scalings
        model.lm.to(dtype)  # base and experts; the gate stays float32
        what = f"{args.experts} random experts of rank {args.rank}"
    base.generation_config.eos_token_id = None  # always generate every token
    model.generation_config.eos_token_id = None
    line = (
        f"{str(dtype).removeprefix('torch.')}: weights base {weight_bytes(base) / 2**20:.0f} MiB, "
        f"X-LoRA {weight_bytes(model) / 2**20:.0f} MiB ({what} on {model.n_layers} modules)"
    )
    return base, model, line


def mixes_for(model: XLoraModel, batch: int) -> torch.Tensor:
    """`(B, E)` a different random softmax mix per sequence (a fixed seed)."""
    generator = torch.Generator().manual_seed(batch)
    return torch.softmax(torch.randn(batch, model.n_experts, generator=generator) * 2, dim=-1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="runs per mode at batch 1")
    parser.add_argument("--repeats-batched", type=int, default=2, help="runs per mode at batch > 1")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument(
        "--dtype",
        nargs="+",
        choices=["float32", "float16", "bfloat16"],
        default=["float32"],
        help="weights of base and experts; the float32 base is always run as the reference",
    )
    parser.add_argument(
        "--model",
        choices=["synthetic", "science"],
        default="synthetic",
        help="random SmolLM2-shaped model and experts, or a science model (--bundle)",
    )
    parser.add_argument(
        "--bundle",
        type=Path,
        default=DEFAULT_BUNDLE,
        help="the science X-LoRA folder (on SmolLM2) that --model science runs",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["granular", "frozen", "merged", "fixed-mixes"],
        help="fixed-mixes: a different given mix per sequence (fixed_scalings, per_sequence)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: the process's CPU time (all threads), steadier than wall time on a machine "
        "shared with other jobs; use it with --threads 1",
    )
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--peft-new-tokens", type=int, default=None, help="default: --new-tokens")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, {args.clock} clock"
    )
    if args.model == "synthetic":
        args.adapters = make_experts(args.experts, args.rank)

    dtypes = ["float32"] + [name for name in args.dtype if name != "float32"]
    gen = dict(max_new_tokens=args.new_tokens, do_sample=False)
    runs: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    models: dict[str, XLoraModel] = {}
    for name in dtypes:
        base, model, line = build_models(args, getattr(torch, name))
        print(line)
        models[name] = model
        runs[f"base {name}"] = lambda ids, base=base: base.generate(ids, **gen)
        if name not in args.dtype:  # float32 only as the reference
            continue
        for mode in ("granular", "frozen", "merged"):
            if mode in args.modes:
                runs[f"{mode} {name}"] = lambda ids, m=model, mode=mode: m.generate(
                    ids, scalings_mode=mode, **gen
                )
        if "fixed-mixes" in args.modes:
            runs[f"fixed-mixes {name}"] = lambda ids, m=model: fixed_mixes(m, ids, gen)

    results, outputs, prompts = [], {}, {}
    with torch.inference_mode():
        warm = torch.randint(2, 49152, (1, 8))
        for run in runs.values():  # warm up allocators and code paths
            run(warm)
        for batch in args.batch_sizes:
            generator = torch.Generator().manual_seed(batch)
            ids = torch.randint(2, 49152, (batch, args.prompt_tokens), generator=generator)
            prompts[batch] = ids
            selected = {k: v for k, v in runs.items() if batch > 1 or "fixed-mixes" not in k}
            times: dict[str, list[float]] = {name: [] for name in selected}
            memory: dict[str, int] = {}
            repeats = args.repeats if batch == 1 else args.repeats_batched
            for _ in range(repeats):  # interleaved, so slow phases of the machine hit all
                for name, run in selected.items():
                    seconds, grown, out = measure(lambda run=run, ids=ids: run(ids))
                    times[name].append(seconds)
                    memory[name] = max(memory.get(name, 0), grown)
                    outputs[(name, batch)] = out
            for name in selected:
                results.append(row(name, batch, batch * args.new_tokens, times[name], memory[name]))
            for name in args.dtype:
                frozen, merged = (
                    outputs.get((f"frozen {name}", batch)),
                    outputs.get((f"merged {name}", batch)),
                )
                if frozen is not None and merged is not None:
                    same = torch.equal(frozen, merged)
                    print(f"batch {batch}, {name}: frozen and merged give the same tokens: {same}")
    for entry in results:
        batch, dtype = entry["batch"], entry["mode"].split()[-1]
        reference = next(r for r in results if r["mode"] == "base float32" and r["batch"] == batch)
        same_dtype = next(
            r for r in results if r["mode"] == f"base {dtype}" and r["batch"] == batch
        )
        entry["x_base"] = entry["tokens_per_s"] / reference["tokens_per_s"]
        entry["x_base_median"] = entry["tokens_per_s_median"] / reference["tokens_per_s_median"]
        entry["x_base_same_dtype"] = entry["tokens_per_s"] / same_dtype["tokens_per_s"]

    peft_row = None
    if (
        not args.skip_peft
        and 1 in prompts
        and args.model == "synthetic"
        and "float32" in args.dtype
    ):
        granular = outputs.get(("granular float32", 1))
        peft_row = run_peft(models["float32"], args.adapters, prompts[1], granular, args)
        results.append(peft_row)
    print_table(results, peft_row, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def fixed_mixes(model: XLoraModel, ids: torch.Tensor, gen: dict) -> torch.Tensor:
    """A different given mix per sequence: no scaling pass at all (the server's batched path)."""
    with model.fixed_scalings(mixes_for(model, ids.shape[0]), per_sequence=True):
        return model.generate(ids, **gen)


def row(mode: str, batch: int, tokens: int, seconds: list[float], memory: int) -> dict:
    """Tokens/s from the best time (least disturbed by other processes) and the median."""
    return dict(
        mode=mode,
        batch=batch,
        tokens_per_s=tokens / min(seconds),
        tokens_per_s_median=tokens / statistics.median(seconds),
        seconds=seconds,
        peak_rss_growth_mib=memory / 2**20,
    )


def run_peft(
    model: XLoraModel,
    adapters: dict[str, str],
    ids: torch.Tensor,
    ours: torch.Tensor | None,
    args: argparse.Namespace,
) -> dict:
    """peft's X-LoRA on the same random model, experts, gate weights and prompt (batch 1)."""
    import peft

    new_tokens = args.peft_new_tokens or args.new_tokens
    peft_base = random_base(use_cache=False)  # peft's X-LoRA refuses the KV cache
    peft_base.generation_config.eos_token_id = None
    peft_config = peft.XLoraConfig(
        task_type="CAUSAL_LM",
        hidden_size=peft_base.config.hidden_size,
        adapters={str(i): path for i, path in enumerate(adapters.values())},
    )
    peft_model = peft.get_peft_model(peft_base, peft_config).eval()
    peft_model.base_model.internal_xlora_classifier.load_state_dict(model.gate.state_dict())
    with torch.inference_mode():
        seconds, grown, out = measure(
            lambda: peft_model.generate(input_ids=ids, max_new_tokens=new_tokens, do_sample=False)
        )
    if ours is not None and new_tokens == args.new_tokens:
        print(f"peft X-LoRA and loramix granular give the same tokens: {torch.equal(out, ours)}")
    result = row("peft X-LoRA", 1, new_tokens, [seconds], grown)
    result["new_tokens"] = new_tokens
    return result


def print_table(results: list[dict], peft_row: dict | None, args: argparse.Namespace) -> None:
    print()
    print(
        f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, greedy; tok/s from "
        f"the best of {args.repeats} (batch 1) or {args.repeats_batched} (batch > 1) "
        "interleaved runs, median in brackets; x f32 base: against the float32 base at the "
        "same batch, x base: against the base of the same dtype"
    )
    header = (
        f"{'mode':<20} {'batch':>5} {'tok/s':>8} {'x f32 base':>12} {'x base':>7} {'target':>7} "
        f"{'x peft':>7} {'peak RSS +MiB':>13}"
    )
    print(header)
    print("-" * len(header))
    peft_tps = peft_row["tokens_per_s"] if peft_row else None
    for entry in results:
        target = ""
        mode, batch = entry["mode"], entry["batch"]
        if batch == 1 and mode in TARGETS:
            met = entry["x_base"] >= TARGETS[mode]
            target = f"{'>=' if met else '<'}{TARGETS[mode]}"
        elif batch > 1 and mode.split()[0] in ("frozen", "fixed-mixes"):
            met = entry["x_base_same_dtype"] >= BATCHED_TARGET
            target = f"{'>=' if met else '<'}{BATCHED_TARGET}"
        x_base = same = "-"
        if "x_base" in entry:
            x_base = f"{entry['x_base']:.2f} ({entry['x_base_median']:.2f})"
            same = f"{entry['x_base_same_dtype']:.2f}"
        x_peft = "-"
        if peft_tps and batch == 1:
            x_peft = f"{entry['tokens_per_s'] / peft_tps:.1f}"
        print(
            f"{mode:<20} {batch:>5} {entry['tokens_per_s']:>8.2f} {x_base:>12} {same:>7} "
            f"{target:>7} {x_peft:>7} {entry['peak_rss_growth_mib']:>13.0f}"
        )
    if peft_row:
        granular = next(r for r in results if r["mode"] == "granular float32" and r["batch"] == 1)
        ratio = granular["tokens_per_s"] / peft_tps
        verdict = "met" if ratio >= PEFT_TARGET else "MISSED"
        print(
            f"granular / peft X-LoRA (batch 1, peft generating {peft_row['new_tokens']} tokens "
            f"once): {ratio:.1f}x (target {PEFT_TARGET:.0f}x: {verdict})"
        )
    if any(r["mode"].startswith("merged") and r["batch"] > 1 for r in results):
        print("merged with batch > 1: different prompts run one sequence at a time, one merge each")
    print("fixed-mixes: one given mix per sequence (fixed_scalings, per_sequence=True), no gate")


if __name__ == "__main__":
    sys.exit(main())
