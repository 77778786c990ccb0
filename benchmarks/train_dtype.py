"""Expert training step with the frozen base in float32 and in bfloat16, one run.

    PYTHONPATH=. .venv/bin/python benchmarks/train_dtype.py [--batch 8 --batches 4 --repeats 5]

The science retrain trains its experts and gates over a bfloat16 copy of the frozen base
(`RetrainSettings.train_dtype`); the LoRA weights train in float32 either way (peft keeps an
adapter over a bfloat16 base in float32). This times the experts' step both ways on
SmolLM2-135M-Instruct: a LoRA r=8 on q/k/v/o/up/down, forward + backward + AdamW on batches of
science training examples from all eight domains (the loss on the labelled positions only,
as `CompletionLossTrainer` computes it), one thread as each retrain worker runs.

The two dtypes are interleaved per round (each batch once per round, the order of the two
alternating from round to round, after a warm-up on every batch), so load from other
processes falls on both alike. Prints the median times, the ratio bfloat16 / float32, and the
largest relative difference of the two ways' losses on the same batch (the learning rate is
0, so both see their starting weights; the adapters start from the same seed, and each batch
gets the same dropout masks both ways).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as benchmarks/generate.py; see there

import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from peft import get_peft_model  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from training_loss import (  # noqa: E402
    SCIENCE_TARGETS,
    parse_batch_arguments,
    science_batches,
    step_function,
)

from loramix.smollm2 import load_base_model  # noqa: E402
from loramix.training.expert import LoraSettings  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def lora_expert(dtype: torch.dtype) -> nn.Module:
    """The retrain's expert (`LoraSettings` as `RetrainSettings` gives them: rank 8, alpha 16,
    dropout 0.05, its targets) over a base in `dtype`, its LoRA weights in float32."""
    base, _ = load_base_model("smollm2", dtype=dtype)
    torch.manual_seed(0)  # the same A matrices both ways
    lora = LoraSettings(rank=8, alpha=16, targets=tuple(SCIENCE_TARGETS))
    return get_peft_model(base, lora.peft_config())


def main() -> None:
    args = parse_batch_arguments(__doc__.split("\n")[0])

    model, tokenizer = load_base_model("smollm2")
    del model  # only its tokenizer is needed here
    batches = science_batches(tokenizer, args.batches, args.batch)
    steps = {}
    for name, dtype in DTYPES.items():
        model = lora_expert(dtype).train()
        adapter = {p.dtype for p in model.parameters() if p.requires_grad}
        assert adapter == {torch.float32}, f"{name}: adapter weights in {adapter}"
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
        steps[name] = step_function(model, True, optimizer)
        for batch in batches:  # warm-up: every padded shape once
            steps[name](batch)
    times: dict[str, list[float]] = {name: [] for name in steps}
    losses: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(args.repeats):
        order = list(steps) if round_index % 2 == 0 else list(reversed(steps))  # alternate
        for name in order:
            start = time.perf_counter()
            for index, batch in enumerate(batches):
                torch.manual_seed(index)  # the same dropout masks both ways
                losses[name].append(steps[name](batch))
            times[name].append((time.perf_counter() - start) / len(batches))
    print(
        f"expert training step (LoRA r=8), {args.batches} batches of {args.batch} science "
        f"examples, {args.threads} thread(s), median over {args.repeats} rounds:"
    )
    medians = {name: statistics.median(spread) for name, spread in times.items()}
    for name, seconds in medians.items():
        spread = ", ".join(f"{t * 1000:.0f}" for t in times[name])
        print(f"  base in {name:9s} {seconds * 1000:7.0f} ms per step   (rounds: {spread} ms)")
    gap = max(
        abs(a - b) / abs(b) for a, b in zip(losses["bfloat16"], losses["float32"], strict=True)
    )
    ratio = medians["bfloat16"] / medians["float32"]
    print(f"  bfloat16 / float32 time: {ratio:.2f}; losses differ by <= {gap:.1e} (rel.)")


if __name__ == "__main__":
    main()
