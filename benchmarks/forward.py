"""Forward-pass speed: loramix X-LoRA vs the base model vs peft's XLoraModel, one run.

    .venv/bin/python benchmarks/forward.py [--experts 8 --rank 8 --batch 4 --tokens 128]

Prints median times and the ratios X-LoRA / base (2.0 is the floor: two passes) and
peft / loramix. Everything runs on the same random model with SmolLM2-135M's shape.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import make_experts, random_base, time_call  # noqa: E402

from loramix import XLoraConfig, XLoraModel  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-peft", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    experts = make_experts(args.experts, args.rank)
    ids = torch.randint(
        0, 49152, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0)
    )
    results: dict[str, float] = {}

    def time_forward(model: torch.nn.Module) -> float:
        with torch.inference_mode():
            return time_call(lambda: model(input_ids=ids, use_cache=False), args.repeats)

    results["base"] = time_forward(random_base())
    model = XLoraModel(random_base(), XLoraConfig(adapters=experts))
    results["loramix"] = time_forward(model)
    with model.disable_adapters():
        results["loramix disabled"] = time_forward(model)
    model = None  # free it before peft's copy

    if not args.skip_peft:
        import peft

        peft_base = random_base(use_cache=False)
        peft_config = peft.XLoraConfig(
            task_type="CAUSAL_LM",
            hidden_size=576,
            adapters={str(i): path for i, path in enumerate(experts.values())},
        )
        peft_model = peft.get_peft_model(peft_base, peft_config).eval()
        with torch.inference_mode():
            results["peft"] = time_call(lambda: peft_model(input_ids=ids), args.repeats)

    print(
        f"forward, batch {args.batch} x {args.tokens} tokens, {args.experts} experts of rank "
        f"{args.rank} on 7 projections x 30 blocks, {args.threads} threads, median of "
        f"{args.repeats}"
    )
    for name, seconds in results.items():
        print(f"  {name:18s} {seconds * 1000:9.1f} ms  ({seconds / results['base']:.2f} x base)")
    print(f"X-LoRA / base time:   {results['loramix'] / results['base']:.2f}  (target <= 2.3)")
    if "peft" in results:
        print(f"peft / loramix time:  {results['peft'] / results['loramix']:.2f}  (target >= 2)")


if __name__ == "__main__":
    main()
