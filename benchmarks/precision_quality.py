"""Quality of the bundled science model in half precision against float32, in one run.

For each dtype (base and experts in it, the gate in float32), on the held-out test sets of
the bundle (`models/science-xlora`, regenerated from its `retrain.json` as the demo does):

- completion NLL per test set (X-LoRA, first `--limit` examples), and its relative
  difference to float32's (target: within 1%); the same for the base model alone
  (`disable_adapters`), which shows how much of the difference the dtype causes without
  any expert or gate;
- greedy answers (first line, `--max-new-tokens` tokens) to the first `--answers` prompts of
  every test set, the first of each being the demo's question, counted equal to float32's.

    .venv/bin/python benchmarks/precision_quality.py --limit 16 --answers 4
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

import torch

from loramix.evaluation.runner import completion_nll, greedy_answers, load_test_set
from loramix.model import XLoraModel
from loramix.science.bundle import DEFAULT_BUNDLE
from loramix.science.demo import write_test_sets
from loramix.smollm2 import load_base_model

NLL_TOLERANCE = 0.01  # relative to float32's NLL


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", nargs="+", default=["float16", "bfloat16"])
    parser.add_argument("--limit", type=int, default=16, help="examples per test set for NLL")
    parser.add_argument("--answers", type=int, default=4, help="greedy answers per test set")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--bundle", type=Path, default=DEFAULT_BUNDLE, help="the science X-LoRA folder"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("command:", shlex.join([sys.executable, *sys.argv]))
    data = Path(tempfile.mkdtemp(prefix="loramix-precision-"))
    nll: dict[str, dict[str, float]] = {}
    base_nll: dict[str, dict[str, float]] = {}
    answers: dict[str, dict[str, list[str]]] = {}
    for name in ["float32", *args.dtype]:
        dtype = getattr(torch, name)
        base, tokenizer = load_base_model("smollm2", dtype=dtype)
        model = XLoraModel.from_pretrained(base, args.bundle)
        sets = write_test_sets(args.bundle, data, model.expert_names)
        nll[name], answers[name], base_nll[name] = {}, {}, {}
        with torch.inference_mode():
            for test_set, path in sets.items():
                examples = load_test_set(path, tokenizer, chat=False, limit=args.limit)
                nll[name][test_set] = completion_nll(model, tokenizer, examples)[0]
                with model.disable_adapters():
                    base_nll[name][test_set] = completion_nll(model, tokenizer, examples)[0]
                answers[name][test_set] = greedy_answers(
                    model, tokenizer, examples[: args.answers], args.max_new_tokens
                )
        print(f"{name}: done", flush=True)

    worst = {d: 0.0 for d in args.dtype}
    for what, table in (("X-LoRA", nll), ("base model alone", base_nll)):
        print()
        print(f"{what}: completion NLL per test set (first {args.limit} examples), x float32 - 1")
        header = f"{'test set':<12} {'float32':>8} " + " ".join(f"{d:>18}" for d in args.dtype)
        print(header)
        print("-" * len(header))
        for test_set, reference in table["float32"].items():
            cells = []
            for name in args.dtype:
                relative = table[name][test_set] / reference - 1
                if table is nll:
                    worst[name] = max(worst[name], abs(relative))
                cells.append(f"{table[name][test_set]:>8.4f} ({relative:+.2%})")
            print(f"{test_set:<12} {reference:>8.4f} " + " ".join(f"{c:>18}" for c in cells))
    for name in args.dtype:
        verdict = "met" if worst[name] <= NLL_TOLERANCE else "MISSED"
        print(f"{name}: largest NLL difference {worst[name]:.2%} (target 1%: {verdict})")
        same = total = demo_same = 0
        for test_set, reference in answers["float32"].items():
            ours = answers[name][test_set]
            same += sum(a == b for a, b in zip(ours, reference, strict=True))
            total += len(reference)
            demo_same += ours[0] == reference[0]
        print(
            f"{name}: greedy answers equal to float32's: {same} of {total} "
            f"(demo questions, the first of each set: {demo_same} of {len(answers['float32'])})"
        )
        for test_set, reference in answers["float32"].items():
            for ours, theirs in zip(answers[name][test_set], reference, strict=True):
                if ours != theirs:
                    print(f"  {test_set}: {name} {ours!r} / float32 {theirs!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
