"""Forward-pass speed: loramix X-LoRA vs the base model vs peft's XLoraModel, one run.

    .venv/bin/python benchmarks/forward.py [--experts 8 --rank 8 --batch 4 --tokens 128]
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/forward.py   # another thread policy

Every system is built first and then timed in interleaved rounds (each round: base,
loramix, loramix with adapters disabled, peft; each the median of `--repeats` calls under
`torch.inference_mode()`), so that a slow spell of the machine falls on all of them alike.
Prints each system's median over the rounds, and the ratios X-LoRA / base (2.0 is about the
floor: two passes) and peft / loramix, as the median of the per-round ratios with their range.
Everything runs on the same random model with SmolLM2-135M's shape.

The OpenMP wait policy (the `OMP_WAIT_POLICY` environment variable, printed in the header)
matters for peft: its X-LoRA runs thousands of small ops per call (a loop over experts in
every module), and with two threads its time swings between about 3x and 5.5x the base
model's depending on whether idle threads spin or sleep between them. loramix's and the base
model's few large GEMMs hardly notice. BENCHMARKS.md reports runs under each policy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import make_experts, random_base, time_call  # noqa: E402

from loramix import XLoraConfig, XLoraModel  # noqa: E402


def build_systems(
    experts: dict[str, str], ids: torch.Tensor, with_peft: bool
) -> dict[str, Callable[[], object]]:
    """name -> a call running one forward pass of that system on `ids`."""
    base = random_base(use_cache=False).requires_grad_(False)
    model = XLoraModel(random_base(use_cache=False), XLoraConfig(adapters=experts))

    def disabled() -> object:
        with model.disable_adapters():
            return model(input_ids=ids)

    systems = {
        "base": lambda: base(input_ids=ids),
        "loramix": lambda: model(input_ids=ids),
        "loramix disabled": disabled,
    }
    if with_peft:
        import peft

        peft_config = peft.XLoraConfig(
            task_type="CAUSAL_LM",
            hidden_size=576,
            adapters={str(i): path for i, path in enumerate(experts.values())},
        )
        peft_model = peft.get_peft_model(random_base(use_cache=False), peft_config).eval()
        systems["peft"] = lambda: peft_model(input_ids=ids)
    return systems


def ratio_summary(numerators: list[float], denominators: list[float]) -> str:
    ratios = [n / d for n, d in zip(numerators, denominators, strict=True)]
    return f"{statistics.median(ratios):.2f}  (rounds: {min(ratios):.2f} to {max(ratios):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="calls per system and round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-peft", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    experts = make_experts(args.experts, args.rank)
    ids = torch.randint(
        0, 49152, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0)
    )
    systems = build_systems(experts, ids, with_peft=not args.skip_peft)
    times: dict[str, list[float]] = {name: [] for name in systems}  # name -> one per round
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, forward in systems.items():
                times[name].append(time_call(forward, args.repeats))

    policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    print(
        f"forward, batch {args.batch} x {args.tokens} tokens, {args.experts} experts of rank "
        f"{args.rank} on 7 projections x 30 blocks, {args.threads} threads, "
        f"OMP_WAIT_POLICY {policy}, {args.rounds} interleaved rounds of {args.repeats} calls"
    )
    base = statistics.median(times["base"])
    for name, values in times.items():
        median = statistics.median(values)
        rounds = ", ".join(f"{t * 1000:.0f}" for t in values)
        print(f"  {name:18s} {median * 1000:8.1f} ms  ({median / base:.2f} x base)  [{rounds}]")
    print(f"X-LoRA / base time:   {ratio_summary(times['loramix'], times['base'])}  (<= 2.3)")
    if "peft" in times:
        print(f"peft / loramix time:  {ratio_summary(times['peft'], times['loramix'])}  (>= 2)")


if __name__ == "__main__":
    main()
