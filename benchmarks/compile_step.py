"""What `torch.compile` buys for one decode step over a static cache, base and X-LoRA.

A random model with SmolLM2-135M's shape (see `common.py`), 8 experts of rank 8, batch
`--batch`, a 32-token prompt in an `XLoraStaticCache` (a transformers `StaticCache` for the
base), then decode steps of one token, eager against `torch.compile` (inductor, the step's
shapes fixed by the static cache). X-LoRA runs with fixed per-sequence mixes (no scaling
pass) or gated (`--gated`: both passes per step). Reports the compile time (first call) and
the best step time of `--steps` calls after it, in CPU seconds with `--clock cpu`.

    .venv/bin/python benchmarks/compile_step.py --threads 1 --clock cpu --steps 5
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from transformers import StaticCache  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import make_experts, random_base  # noqa: E402

from loramix import XLoraConfig, XLoraModel  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--gated", action="store_true", help="per-token gate (both passes)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print("command:", shlex.join([sys.executable, *sys.argv]))
    dtype = getattr(torch, args.dtype)
    base = random_base().to(dtype)
    model = XLoraModel(random_base(), XLoraConfig(adapters=make_experts(8, 8)))
    model.lm.to(dtype)
    ids = torch.randint(2, 49152, (args.batch, 32))
    step = torch.randint(2, 49152, (args.batch, 1))
    mixes = torch.softmax(torch.randn(args.batch, model.n_experts), dim=-1)
    context = (
        contextlib.nullcontext() if args.gated else model.fixed_scalings(mixes, per_sequence=True)
    )

    def base_cache() -> StaticCache:
        return StaticCache(config=base.config, max_cache_len=64)

    systems: dict[str, tuple[Callable, Callable]] = {
        "base": (base.forward, base_cache),
        "X-LoRA": (model.forward, lambda: model.new_cache(max_cache_len=64)),
    }
    print(f"{'system':<8} {'eager step':>11} {'compile':>9} {'compiled step':>14} {'speed-up':>9}")
    with torch.inference_mode(), context:
        for name, (forward, new_cache) in systems.items():
            cache = new_cache()
            forward(input_ids=ids, cache=cache, use_cache=True)
            eager = best(lambda f=forward, c=cache: decode(f, c, step), args.steps, clock)
            compiled = torch.compile(forward, fullgraph=False)
            start = clock()
            decode(compiled, cache, step)
            compile_seconds = clock() - start
            fast = best(lambda f=compiled, c=cache: decode(f, c, step), args.steps, clock)
            print(
                f"{name:<8} {eager * 1e3:>9.1f}ms {compile_seconds:>8.1f}s {fast * 1e3:>12.1f}ms "
                f"{eager / fast:>8.2f}x",
                flush=True,
            )
    return 0


def decode(forward: Callable, cache, step: torch.Tensor) -> None:
    forward(input_ids=step, cache=cache, use_cache=True)
    cache.crop(-1)  # the same position every call: fixed shapes, same work


def best(fn: Callable[[], None], steps: int, clock: Callable[[], float]) -> float:
    fn()
    times = []
    for _ in range(steps):
        start = clock()
        fn()
        times.append(clock() - start)
    return min(times)


if __name__ == "__main__":
    sys.exit(main())
