"""One process of a gate-training run, for tests/test_train_gate_distributed.py.

    python -m torch.distributed.run --nproc_per_node 2 tests/training_gate_worker.py SPEC.json

SPEC.json holds `train_gate`'s arguments (base, experts, data, out, and keyword settings).
When training ends, every process writes its gate's weights to `OUT/rank-<rank>.safetensors`,
so the test can check that data-parallel processes end with the same gate.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import TrainerCallback

from loramix.config import XLoraConfig
from loramix.training.gate import train_gate, trainable_state
from loramix.training.trainer import TrainingConfig


class DumpGate(TrainerCallback):
    """Saves this process's trainable weights when training ends."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, args, state, control, model=None, **kwargs):
        rank = int(os.environ.get("RANK", "0"))
        save_file(trainable_state(model), self.out / f"rank-{rank}.safetensors")


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(spec.pop("out"))
    train_gate(
        spec.pop("base"),
        XLoraConfig(adapters=spec.pop("experts")),
        spec.pop("data"),
        out,
        TrainingConfig(**spec),
        callbacks=[DumpGate(out)],
    )


if __name__ == "__main__":
    main()
