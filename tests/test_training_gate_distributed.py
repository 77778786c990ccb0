"""Gate training with 2 data-parallel CPU processes (torchrun, gloo) vs one process.

The two runs see the same global batches: per-process batch 2 x 2 processes, against batch
4 in one process (accelerate gives process i the batches i, i+2, ... of one seeded order, so
the global batch k is the single run's batch k). The loss is the mean over the global batch's
target tokens in both (transformers counts the tokens across processes), so the gradients
agree in exact arithmetic. In float32 they differ by summation order only: the gradient is
summed over two halves and all-reduced instead of summed at once, and each half is padded to
its own longest example, which changes matmul shapes. That is ~1e-7 relative per step
(observed: at most 2e-7 on the losses over 8 steps). The tolerance, 1e-4 relative, leaves a
wide margin for Adam amplifying that noise, and still fails by orders of magnitude if the
processes train on their own (each then sees other batches: the step losses differed by up to
0.35, 5%, when transformers left CPU processes unconnected) or if the loss were averaged per
process instead of per token (the halves hold different numbers of target tokens).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from tiny_tokenizer import save_tiny_model
from training_gate_worker import DumpGate
from transformers import AutoModelForCausalLM

from loramix.config import XLoraConfig
from loramix.training.gate import ScalingsLog, train_gate
from loramix.training.trainer import TrainingConfig

WORKER = Path(__file__).with_name("training_gate_worker.py")
STEPS = 8


def make_experts(base: Path, folder: Path) -> dict[str, str]:
    experts = {}
    for index, name in enumerate(["a", "b"]):
        model = AutoModelForCausalLM.from_pretrained(base)
        torch.manual_seed(10 + index)
        config = LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
            init_lora_weights=False,
        )
        peft_model = get_peft_model(model, config)
        with torch.no_grad():
            for param_name, param in peft_model.named_parameters():
                if "lora_B" in param_name:
                    param.normal_(0, 0.3)
        peft_model.save_pretrained(folder / name)
        experts[name] = str(folder / name)
    return experts


def make_data(path: Path) -> Path:
    """Examples of different lengths, so that the two runs pad differently."""
    rng = random.Random(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "two", "paris"]
    lines = []
    for _ in range(40):
        prompt = " ".join(rng.choices(words, k=rng.randint(2, 6))) + " "
        completion = " ".join(rng.choices(words, k=rng.randint(1, 5)))
        lines.append(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    path.write_text("".join(lines))
    return path


def losses(out: Path) -> tuple[list[float], list[float]]:
    state = json.loads(
        (out / "checkpoints" / f"checkpoint-{STEPS}" / "trainer_state.json").read_text()
    )
    history = state["log_history"]
    return (
        [entry["loss"] for entry in history if "loss" in entry],
        [entry["eval_loss"] for entry in history if "eval_loss" in entry],
    )


@pytest.mark.distributed
def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    base = save_tiny_model(tmp_path / "base")
    experts = make_experts(base, tmp_path)
    data = make_data(tmp_path / "data.jsonl")
    settings = {
        "max_steps": STEPS,
        "logging_steps": 1,
        "save_steps": STEPS,
        "eval_fraction": 0.1,
        "eval_steps": 4,
        "progress": False,
        "lr": 1e-2,
        "warmup": 0,
    }

    single = tmp_path / "single"
    train_gate(
        base,
        XLoraConfig(adapters=experts),
        [data],
        single,
        TrainingConfig(batch_size=4, **settings),
        callbacks=[DumpGate(single)],
    )

    parallel = tmp_path / "parallel"
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "base": str(base),
                "experts": experts,
                "data": [str(data)],
                "out": str(parallel),
                "batch_size": 2,
                **settings,
            }
        )
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", str(WORKER), str(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-5000:]

    # Every process ends with the same gate, bit for bit.
    rank0 = load_file(parallel / "rank-0.safetensors")
    rank1 = load_file(parallel / "rank-1.safetensors")
    assert rank0.keys() == rank1.keys() == {"gate.layers.0.weight", "gate.layers.0.bias"}
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name

    # The loss curve (and the gate) match the single process within the stated tolerance.
    (train_1, eval_1), (train_2, eval_2) = losses(single), losses(parallel)
    assert len(train_1) == len(train_2) == STEPS and len(eval_1) == len(eval_2) == 2
    torch.testing.assert_close(train_2, train_1, rtol=1e-4, atol=0)
    torch.testing.assert_close(eval_2, eval_1, rtol=1e-4, atol=0)
    reference = load_file(single / "rank-0.safetensors")
    for name in reference:
        torch.testing.assert_close(rank0[name], reference[name], rtol=1e-4, atol=1e-6)

    # One result, written once: the summary knows the world size, the log has each step once.
    summary = json.loads((parallel / "training_args.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 4
    log = ScalingsLog(parallel / "scalings_log.jsonl", ["a", "b"], False).read()
    assert [record["step"] for record in log] == list(range(1, STEPS + 1))
