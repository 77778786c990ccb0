"""Training step and evaluation speed with the logits of the labelled positions only, one run.

    .venv/bin/python benchmarks/training_loss.py [--batch 8 --batches 4 --repeats 5 --threads 1]

On SmolLM2-135M-Instruct and batches of science training examples (prompt/completion pairs,
loss on the completion; eight domains), three things are timed, each once with the model's
own loss (`(B, T, vocab)` logits, all upcast to float32) and once with a boolean
`logits_to_keep` mask (the model's head at the labelled positions only):

* expert training step: a LoRA r=8 on q/k/v/o/up/down over the base in bfloat16 (the science
  retrain's `train_dtype`), forward + backward + AdamW, through `forward_labelled` as
  `CompletionLossTrainer` takes it;
* gate training step: the bundled science X-LoRA model over the bfloat16 base, only its gate
  trains, the same way;
* evaluation NLL pass: the bundled X-LoRA model in float32 without gradients, each example's
  summed NLL (`loramix.training.loss.row_nlls`, as `loramix eval` and the retrain score).

The ways are interleaved per round (each batch once per round), so load from other processes
falls on both alike. Prints the median times, the ratio labelled / model's loss, and the
largest relative difference between the two ways' values on the same batch (the learning
rate is 0, so both see the same weights).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from loramix import XLoraModel
from loramix.science import DOMAINS
from loramix.science.bundle import DEFAULT_BUNDLE
from loramix.science.datasets import write_datasets
from loramix.smollm2 import load_base_model
from loramix.training.data import PadCollator, load_training_data, pad_token_id
from loramix.training.loss import forward_labelled, row_nlls

SCIENCE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def science_batches(tokenizer, n_batches: int, batch: int) -> list[dict[str, torch.Tensor]]:
    """`n_batches` batches of training examples drawn from all eight domains."""
    with tempfile.TemporaryDirectory() as folder:
        write_datasets(folder, seed=0, n_train=50, n_test=8)
        files = [Path(folder) / f"{domain}_train.jsonl" for domain in DOMAINS]
        train, _ = load_training_data(files, tokenizer, max_length=96)
    collate = PadCollator(pad_token_id(tokenizer))
    draw = random.Random(0)
    return [
        collate([train[draw.randrange(len(train))] for _ in range(batch)]) for _ in range(n_batches)
    ]


def step_function(
    model: nn.Module, labelled: bool, optimizer: torch.optim.Optimizer
) -> Callable[[dict[str, torch.Tensor]], float]:
    """One optimizer step on a batch; returns the loss."""

    def step(batch: dict[str, torch.Tensor]) -> float:
        optimizer.zero_grad(set_to_none=True)
        if labelled:
            loss, _ = forward_labelled(model, batch)
        else:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def lora_expert() -> nn.Module:
    base, _ = load_base_model("smollm2", dtype=torch.bfloat16)
    # peft keeps the LoRA weights of a bfloat16 base in float32 (autocast_adapter_dtype), as
    # the retrain trains them.
    return get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=SCIENCE_TARGETS))


def parse_batch_arguments(
    description: str, parser: argparse.ArgumentParser | None = None
) -> argparse.Namespace:
    """--batch, --batches, --repeats and --threads (torch's CPU threads, set here), besides
    the arguments `parser` already has."""
    if parser is None:
        parser = argparse.ArgumentParser(description=description)
    else:
        parser.description = description
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5, help="rounds over the batches")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--bundle", type=Path, default=DEFAULT_BUNDLE, help="the science X-LoRA folder"
    )
    args = parse_batch_arguments(__doc__.split("\n")[0], parser)

    def xlora_gate() -> nn.Module:
        return XLoraModel.from_pretrained("smollm2", args.bundle, dtype=torch.bfloat16)

    _, tokenizer = load_base_model("smollm2")
    batches = science_batches(tokenizer, args.batches, args.batch)
    labelled = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    positions = sum(b["labels"][:, 1:].numel() for b in batches)  # padding included
    print(
        f"{args.batches} batches of {args.batch} science examples: "
        f"{positions / args.batches:.0f} positions per batch, {labelled / positions:.1%} "
        f"labelled; {args.threads} thread(s), median over {args.repeats} rounds"
    )
    for name, make in (("expert (LoRA r=8)", lora_expert), ("gate (X-LoRA)", xlora_gate)):
        model = make()
        # Learning rate 0: the weights stay put, so both ways see the same model and their
        # losses on a batch must agree; AdamW still does all its work.
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
        ways = {
            "model's loss": step_function(model, False, optimizer),
            "labelled": step_function(model, True, optimizer),
        }
        compare(f"{name} training step", ways, batches, args.repeats)
        del model, ways

    # The evaluation's NLL pass: float32 (as `loramix eval` and the retrain score), no
    # gradients, each example's summed NLL.
    model = XLoraModel.from_pretrained("smollm2", args.bundle).eval()

    def nll_pass(labelled: bool) -> Callable[[dict[str, torch.Tensor]], float]:
        def run(batch: dict[str, torch.Tensor]) -> float:
            with torch.no_grad():
                sums, _, _ = row_nlls(model, {**batch, "use_cache": False}, labelled=labelled)
            return float(sums.sum())

        return run

    ways = {"model's loss": nll_pass(False), "labelled": nll_pass(True)}
    compare("evaluation NLL pass (X-LoRA, float32)", ways, batches, args.repeats)
    sys.stdout.flush()


def compare(
    name: str,
    ways: dict[str, Callable[[dict[str, torch.Tensor]], float]],
    batches: list[dict[str, torch.Tensor]],
    repeats: int,
) -> None:
    """Time each way over the batches, interleaved per round, and print the medians, their
    ratio and the largest relative difference of the values they return."""
    for way in ways.values():
        way(batches[0])  # warm-up
    times: dict[str, list[float]] = {key: [] for key in ways}
    values: dict[str, list[float]] = {key: [] for key in ways}
    for _ in range(repeats):
        for key, way in ways.items():
            start = time.perf_counter()
            values[key] += [way(batch) for batch in batches]
            times[key].append((time.perf_counter() - start) / len(batches))
    medians = {key: statistics.median(spread) for key, spread in times.items()}
    print(f"{name}:")
    for key, seconds in medians.items():
        spread = ", ".join(f"{t * 1000:.0f}" for t in times[key])
        print(f"  {key:13s} {seconds * 1000:8.0f} ms per batch   (rounds: {spread} ms)")
    ratio = medians["labelled"] / medians["model's loss"]
    gap = max(
        abs(a - b) / abs(b) for a, b in zip(values["labelled"], values["model's loss"], strict=True)
    )
    print(f"  labelled / model's loss time: {ratio:.2f}; values differ by <= {gap:.1e} (rel.)")


if __name__ == "__main__":
    main()
