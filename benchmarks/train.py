"""Gate-training step speed: loramix X-LoRA vs peft's XLoraModel vs a plain LoRA step, one run.

    .venv/bin/python benchmarks/train.py [--experts 8 --rank 8 --batch 4 --tokens 128]

A step is forward + backward + AdamW step, with the causal-LM loss on the batch:

* loramix: `XLoraModel`, only the gate trains (the scaling pass runs without gradients; the
  gate's gradient flows back through the mixed pass, so the backward pass runs through the
  frozen base model);
* peft: `peft.XLoraModel` with the same experts, only its classifier (gate) trains;
* loramix, checkpointed: the same with `gradient_checkpointing_enable()` (each block's
  activations recomputed in the backward pass instead of kept);
* single LoRA: peft LoRA r=8 on the seven projections (one pass, LoRA weights train).

Also prints the activation memory of each: the bytes of the tensors the forward pass saves
for the backward pass (parameters and buffers excluded, shared storage counted once).

Prints median times and the ratios loramix / peft (target <= 0.5) and loramix / single LoRA.
Everything runs on the same random model with SmolLM2-135M's shape. `--profile` prints the
operators that dominate the loramix step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import SEVEN_PROJECTIONS, make_experts, random_base, time_call  # noqa: E402

from loramix import XLoraConfig, XLoraModel  # noqa: E402


def training_step(model: nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    """forward + backward + AdamW step on the parameters that require grad."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()

    return step


def saved_activation_bytes(model: nn.Module, ids: torch.Tensor) -> int:
    """Bytes the forward pass keeps for the backward pass, weights excluded."""
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--profile", action="store_true", help="profile one loramix step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    experts = make_experts(args.experts, args.rank)
    ids = torch.randint(
        0, 49152, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0)
    )
    models: dict[str, nn.Module] = {}
    models["loramix"] = XLoraModel(random_base(use_cache=False), XLoraConfig(adapters=experts))
    checkpointed = XLoraModel(random_base(use_cache=False), XLoraConfig(adapters=experts))
    checkpointed.gradient_checkpointing_enable()
    models["loramix, checkpointed"] = checkpointed
    if not args.skip_peft:
        import peft

        peft_config = peft.XLoraConfig(
            task_type="CAUSAL_LM",
            hidden_size=576,
            adapters={str(i): path for i, path in enumerate(experts.values())},
        )
        peft_model = peft.get_peft_model(random_base(use_cache=False), peft_config)
        for name, param in peft_model.named_parameters():  # train only the classifier (gate)
            param.requires_grad_("internal_xlora_classifier" in name)
        models["peft"] = peft_model
    from peft import LoraConfig, get_peft_model

    models["single LoRA"] = get_peft_model(
        random_base(use_cache=False),
        LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=SEVEN_PROJECTIONS),
    )
    steps = {name: training_step(model, ids) for name, model in models.items()}
    trainable = {name: count(model) for name, model in models.items()}
    activations = {name: saved_activation_bytes(model, ids) for name, model in models.items()}

    # Interleaved (one step of each per round), so that load from other processes on shared
    # cores falls on all three alike.
    for step in steps.values():
        step()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            times[name].append(time_call(step, repeats=1, warmup=0))
    results = {name: statistics.median(values) for name, values in times.items()}
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            steps["loramix"]()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))

    print(
        f"training step (forward + backward + AdamW), batch {args.batch} x {args.tokens} "
        f"tokens, {args.experts} experts of rank {args.rank} on 7 projections x 30 blocks, "
        f"{args.threads} threads, median of {args.repeats}"
    )
    for name, seconds in results.items():
        spread = ", ".join(f"{t * 1000:.0f}" for t in times[name])
        print(
            f"  {name:21s} {seconds * 1000:9.1f} ms   {trainable[name]:>9,d} trainable params"
            f"   {activations[name] / 2**20:7.0f} MiB activations   (all: {spread} ms)"
        )
    if "peft" in results:
        print(f"loramix / peft time:         {results['loramix'] / results['peft']:.2f}  (<= 0.5)")
    print(f"loramix / single LoRA time:  {results['loramix'] / results['single LoRA']:.2f}")
    slower = results["loramix, checkpointed"] / results["loramix"]
    smaller = activations["loramix, checkpointed"] / activations["loramix"]
    print(f"checkpointed / plain loramix: time {slower:.2f}, activation memory {smaller:.2f}")


if __name__ == "__main__":
    main()
