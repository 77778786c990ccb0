"""Micro-benchmark: one decode step of a mixing module with a different fixed mix per sequence.

Candidates, each exact (the same sums, in another order):

    rank weights   down = A x (B, 1, R); down * w (B, 1, R); addmm with the shared B (today)
    bmm scaled B   per-sequence B' = B * w_b, (B, R, D_out); baddbmm(result, down, B')
    bmm scaled A   per-sequence A' = w_b * A, (B, D_in, R); bmm(x, A'); addmm with shared B

Shapes are SmolLM2-135M's seven projections with R = 64 (8 experts of rank 8); each
candidate runs every projection of one transformer block once per call, 2 threads. The
per-sequence matrices are formed once per generate call, so they are not timed; their size
is reported. Prints microseconds per block (best of the rounds) and the ratio to the base
projections alone.

    .venv/bin/python benchmarks/batched_mixes.py --batch-sizes 8 16 --dtype float32 bfloat16
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

# (D_in, D_out) of q, k, v, o, gate, up, down in SmolLM2-135M
SHAPES = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]


def best_time(fn: Callable[[], object], rounds: int) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--dtype", nargs="+", default=["float32", "float16", "bfloat16"])
    parser.add_argument("--rank", type=int, default=64, help="R, the stacked rank")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, R = {args.rank}")
    print(f"{'dtype':<9} {'B':>3} {'base us':>8} {'rank weights':>13} {'bmm B':>13} {'bmm A':>13}")
    for name in args.dtype:
        dtype = getattr(torch, name)
        for batch in args.batch_sizes:
            times, extra = run(batch, dtype, args.rank, args.rounds)
            base = times["base"]
            cells = [
                f"{times[k] * 1e6:>6.0f} {times[k] / base:>5.2f}x"
                for k in ("rank weights", "bmm B", "bmm A")
            ]
            print(f"{name:<9} {batch:>3} {base * 1e6:>8.0f} " + " ".join(cells))
            print(f"          per-sequence copies: {extra / 2**20:.1f} MiB per block")
    return 0


def run(batch: int, dtype: torch.dtype, rank: int, rounds: int) -> tuple[dict, int]:
    generator = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    mods = []
    for d_in, d_out in SHAPES:
        weight, lora_a, lora_b = rand(d_out, d_in), rand(rank, d_in), rand(d_out, rank)
        w = rand(batch, 1, rank)  # (B, 1, R) per-sequence rank weights
        x = rand(batch, 1, d_in)
        scaled_b = (lora_b.T[None] * w.transpose(1, 2)).contiguous()  # (B, R, D_out)
        scaled_a = (lora_a.T[None] * w).contiguous()  # (B, D_in, R)
        mods.append((x, weight, lora_a, lora_b, w, scaled_b, scaled_a))
    extra = sum(m[5].numel() * m[5].element_size() for m in mods)

    def base() -> None:
        for x, weight, *_ in mods:
            F.linear(x, weight)

    def rank_weights() -> None:
        for x, weight, lora_a, lora_b, w, _, _ in mods:
            result = F.linear(x, weight)
            down = F.linear(x, lora_a) * w  # (B, 1, R)
            torch.addmm(result.view(batch, -1), down.view(batch, -1), lora_b.T)

    def bmm_b() -> None:
        for x, weight, lora_a, _, _, scaled_b, _ in mods:
            result = F.linear(x, weight)
            torch.baddbmm(result, F.linear(x, lora_a), scaled_b)  # (B, 1, D_out)

    def bmm_a() -> None:
        for x, weight, _, lora_b, _, _, scaled_a in mods:
            result = F.linear(x, weight)
            down = torch.bmm(x, scaled_a)  # (B, 1, R)
            torch.addmm(result.view(batch, -1), down.view(batch, -1), lora_b.T)

    fns = {"base": base, "rank weights": rank_weights, "bmm B": bmm_b, "bmm A": bmm_a}
    times = {name: float("inf") for name in fns}
    for _ in range(rounds):  # interleaved rounds
        for name, fn in fns.items():
            times[name] = min(times[name], best_time(fn, 1))
    return times, extra


if __name__ == "__main__":
    sys.exit(main())
