"""Tests of loramix.training.expert and `loramix train-expert` on a tiny Llama saved to disk."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import StopAfterSave
from peft import PeftModel
from safetensors.torch import load_file
from tiny_tokenizer import save_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from loramix.cli import main
from loramix.training.data import PadCollator, load_jsonl
from loramix.training.expert import LoraSettings, check_targets, train_expert
from loramix.training.trainer import TrainingConfig

FAST = TrainingConfig(batch_size=4, progress=False, logging_steps=1, warmup=0, lr=1e-2)


def fast(**changes) -> TrainingConfig:
    """`FAST` with some settings changed."""
    return dataclasses.replace(FAST, **changes)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("base") / "tiny-llama")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A memorisable dataset: two question/answer pairs, repeated."""
    path = tmp_path_factory.mktemp("data") / "qa.jsonl"
    pairs = [("what is two plus two? ", "four."), ("capital of france? ", "paris.")]
    path.write_text(
        "".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in pairs * 6)
    )
    return path


def mean_loss(model: torch.nn.Module, base: Path, data: Path) -> float:
    tokenizer = AutoTokenizer.from_pretrained(base)
    examples = list(load_jsonl(data, tokenizer, max_length=64))
    batch = PadCollator(tokenizer.pad_token_id)(examples)
    with torch.no_grad():
        return model.eval()(**batch).loss.item()


def test_loss_drops_and_adapter_loads_with_peft(base, data, tmp_path):
    out = train_expert(
        base,
        [data],
        tmp_path / "expert",
        LoraSettings(rank=4, alpha=8),
        fast(max_steps=20, eval_fraction=0.0, save_steps=100),
    )
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "training_args.json",
    ]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert set(config["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert config["base_model_name_or_path"] == str(base.resolve())
    record = json.loads((out / "training_args.json").read_text())
    assert record["command"] == "train-expert" and record["status"] == "finished"
    assert record["global_step"] == 20
    assert record["prompts"]["chat"] is False

    before = mean_loss(AutoModelForCausalLM.from_pretrained(base), base, data)
    expert = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)
    after = mean_loss(expert, base, data)
    assert after < 0.5 * before, (before, after)


class StopAt(TrainerCallback):
    """Simulates an interruption (Ctrl-C) at the end of a given step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


class RecordSteps(TrainerCallback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def test_resume_continues_from_the_checkpoint(base, data, tmp_path):
    out = tmp_path / "expert"
    settings = fast(max_steps=6, save_steps=2, eval_fraction=0.2)
    with pytest.raises(KeyboardInterrupt):
        train_expert(base, [data], out, training=settings, callbacks=[StopAt(3)])
    # Interrupted: checkpoint 2 exists, and no (half-written) adapter in the output folder.
    assert (out / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file()
    assert not (out / "adapter_config.json").exists()
    assert not list(out.glob(".publish-*"))

    with pytest.raises(ValueError, match="--resume"):
        train_expert(base, [data], out, training=settings)

    steps = RecordSteps()
    train_expert(base, [data], out, training=settings, resume=True, callbacks=[steps])
    assert steps.steps == [3, 4, 5, 6]
    state = json.loads((out / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    assert any("eval_loss" in entry for entry in state["log_history"])
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)


def test_resume_gives_the_uninterrupted_expert_byte_for_byte(base, data, tmp_path):
    # Dropout is on (the default), so this also checks that the RNG state is restored.
    settings = fast(max_steps=6, save_steps=2, eval_fraction=0.0)
    assert LoraSettings().dropout > 0
    straight = train_expert(base, [data], tmp_path / "straight", training=settings)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train_expert(base, [data], out, training=settings, callbacks=[StopAt(3)])
    steps = RecordSteps()
    train_expert(base, [data], out, training=settings, resume=True, callbacks=[steps])
    assert steps.steps == [3, 4, 5, 6]  # resumed from checkpoint 2, not trained afresh
    weights = "adapter_model.safetensors"
    assert (out / weights).read_bytes() == (straight / weights).read_bytes()


def test_unknown_targets_name_the_real_ones(base):
    model = AutoModelForCausalLM.from_pretrained(base)
    with pytest.raises(ValueError, match=r"\['c_attn'\].*'q_proj'"):
        check_targets(model, ["q_proj", "c_attn"])


def test_bad_data_fails_before_training(base, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2"):
        train_expert(base, [bad], tmp_path / "out", training=fast(max_steps=1))
    assert not (tmp_path / "out").exists()  # validated before the folder is made


def test_cli_trains_and_reports_errors(base, data, tmp_path, capsys):
    out = tmp_path / "cli-expert"
    argv = [
        "train-expert",
        "--base",
        str(base),
        "--data",
        f"{data}:2",
        "--out",
        str(out),
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--rank",
        "2",
        "--targets",
        "q_proj",
        "v_proj",
        "--eval-fraction",
        "0",
        "--no-progress",
    ]
    assert main(argv) == 0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2
    assert str(out) in capsys.readouterr().out

    assert main(argv) == 2  # the folder now holds a run
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv[:4], str(tmp_path / "none.jsonl"), *argv[5:], "--overwrite"]) == 2
    assert "none.jsonl does not exist" in capsys.readouterr().err


class CheckpointingSeen(TrainerCallback):
    """Records whether the model's layers checkpoint activations when training begins."""

    def __init__(self) -> None:
        self.checkpointing: list[bool] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.checkpointing.append(
            any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        )


def test_gradient_checkpointing_trains_the_same_adapter(base, data, tmp_path):
    lora = LoraSettings(rank=2, targets=("q_proj", "v_proj"))
    settings = TrainingConfig(
        max_steps=2, batch_size=4, eval_fraction=0.0, progress=False, warmup=0, lr=1e-2
    )
    plain = train_expert(base, [data], tmp_path / "plain", lora, settings)
    seen = CheckpointingSeen()
    checkpointed = train_expert(
        base,
        [data],
        tmp_path / "checkpointed",
        lora,
        dataclasses.replace(settings, gradient_checkpointing=True),
        callbacks=[seen],
    )
    assert seen.checkpointing == [True]
    expected = load_file(plain / "adapter_model.safetensors")
    got = load_file(checkpointed / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-6)


def test_saving_the_adapter_never_asks_the_hub(base, data, tmp_path, monkeypatch):
    import peft.utils.save_and_load as peft_saving

    import loramix.training.expert as expert_module

    def no_hub(*args, **kwargs):
        raise AssertionError(f"looked up the model hub: {args}")

    monkeypatch.setattr(peft_saving, "check_file_exists_on_hf_hub", no_hub)
    real_record = expert_module.base_record

    def hub_named(model):  # as for the embedded SmolLM2: a hub name, not a local folder
        return {**real_record(model), "name": "HuggingFaceTB/SmolLM2-135M-Instruct"}

    monkeypatch.setattr(expert_module, "base_record", hub_named)
    out = train_expert(base, [data], tmp_path / "e", training=fast(max_steps=1, eval_fraction=0.0))
    assert (out / "adapter_model.safetensors").is_file()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def unlearned_dev(folder: Path) -> Path:
    """Answers made of words the training data lacks: training makes them less likely, so
    the held-out loss is lowest at an early checkpoint."""
    dev = folder / "dev.jsonl"
    pairs = [("what is two plus two? ", "zebra kjq"), ("capital of france? ", "vwx zzz")]
    dev.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in pairs))
    return dev


def test_keep_best_ends_at_the_checkpoint_best_on_the_eval_data(base, data, tmp_path):
    dev = unlearned_dev(tmp_path)
    settings = fast(max_steps=8, save_steps=2, keep_best=True, save_total_limit=None)
    out = train_expert(base, [data], tmp_path / "expert", training=settings, eval_data=[dev])

    record = json.loads((out / "training_args.json").read_text())
    assert record["training"]["eval_fraction"] == 0.0  # the eval files replace the split
    assert record["run"]["eval_data"][0]["path"] == str(dev.resolve())
    state = json.loads((out / "checkpoints/checkpoint-8/trainer_state.json").read_text())
    evals = {e["step"]: e["eval_loss"] for e in state["log_history"] if "eval_loss" in e}
    assert sorted(evals) == [2, 4, 6, 8]
    best = min(evals, key=evals.get)
    assert record["kept_step"] == best < 8
    assert record["kept_eval_loss"] == pytest.approx(evals[best])
    weights = "adapter_model.safetensors"
    kept = load_file(out / weights)
    at_best = load_file(out / f"checkpoints/checkpoint-{best}" / weights)
    last = load_file(out / "checkpoints/checkpoint-8" / weights)
    assert all(torch.equal(kept[k], at_best[k]) for k in kept)
    assert not all(torch.equal(kept[k], last[k]) for k in kept)


def test_keep_best_resumes_from_checkpoints_between_its_measurements(base, data, tmp_path):
    dev = unlearned_dev(tmp_path)
    # Checkpoints only where the dev loss is measured, as keep_best saved before...
    measured_only = fast(max_steps=8, save_steps=4, eval_steps=4, keep_best=True)
    straight = train_expert(
        base, [data], tmp_path / "straight", training=measured_only, eval_data=[dev]
    )
    # ...and with resume points every 3 steps in between, as the science retrain saves.
    between = fast(max_steps=8, save_steps=3, eval_steps=4, keep_best=True, save_total_limit=1)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train_expert(base, [data], out, training=between, eval_data=[dev], callbacks=[StopAt(7)])
    state = json.loads((out / "checkpoints/checkpoint-6/trainer_state.json").read_text())
    assert state["best_global_step"] == 4
    # The newest resume point and the best measurement; the older resume point 3 is rotated.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "checkpoint-4",
        "checkpoint-6",
    ]

    steps = RecordSteps()
    train_expert(
        base, [data], out, training=between, eval_data=[dev], resume=True, callbacks=[steps]
    )
    assert steps.steps == [7, 8]  # from checkpoint 6, which measured nothing
    record = json.loads((out / "training_args.json").read_text())
    assert (
        record["kept_step"]
        == json.loads((straight / "training_args.json").read_text())["kept_step"]
    )
    weights = "adapter_model.safetensors"
    assert (out / weights).read_bytes() == (straight / weights).read_bytes()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-4"]


@pytest.mark.parametrize("keep_best", [False, True])
def test_a_run_stopped_after_its_last_checkpoint_trains_no_step_past_it(
    base, data, tmp_path, keep_best
):
    # 12 examples in batches of 4: 3 steps per epoch, so step 8 does not close an epoch, and
    # Trainer, resumed there, would train a step 9 before it checks for the end.
    dev = unlearned_dev(tmp_path)
    settings = fast(max_steps=8, save_steps=4, keep_best=keep_best, save_total_limit=1)
    eval_data = [dev] if keep_best else ()
    straight = train_expert(
        base, [data], tmp_path / "straight", training=settings, eval_data=eval_data
    )
    out = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):  # after the last checkpoint, before publishing
        train_expert(
            base, [data], out, training=settings, eval_data=eval_data, callbacks=[StopAfterSave(8)]
        )
    moved = tmp_path / "moved"  # and the folder moved: the state names the old paths
    out.rename(moved)
    steps = RecordSteps()
    train_expert(
        base,
        [data],
        moved,
        training=settings,
        eval_data=eval_data,
        resume=True,
        callbacks=[steps],
    )
    assert steps.steps == []
    weights = "adapter_model.safetensors"
    assert (moved / weights).read_bytes() == (straight / weights).read_bytes()
    record = json.loads((moved / "training_args.json").read_text())
    assert record["global_step"] == 8
    kept = json.loads((straight / "training_args.json").read_text())["kept_step"]
    assert record["kept_step"] == kept == (4 if keep_best else 8)
    # only the best checkpoint is left, as at the end of the uninterrupted run
    assert sorted(p.name for p in (moved / "checkpoints").iterdir()) == sorted(
        p.name for p in (straight / "checkpoints").iterdir()
    )


def test_a_run_of_part_epochs_stopped_after_its_last_checkpoint_ends_there(base, data, tmp_path):
    settings = fast(epochs=1.5, save_steps=5, eval_fraction=0.0)  # 3 steps per epoch: 5 steps
    straight = train_expert(base, [data], tmp_path / "straight", training=settings)
    out = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        train_expert(base, [data], out, training=settings, callbacks=[StopAfterSave(5)])
    steps = RecordSteps()
    train_expert(base, [data], out, training=settings, resume=True, callbacks=[steps])
    assert steps.steps == []
    weights = "adapter_model.safetensors"
    assert (out / weights).read_bytes() == (straight / weights).read_bytes()

    # Asking for more epochs continues it; asking for fewer steps than it has is refused.
    out2 = tmp_path / "stopped-2"
    with pytest.raises(KeyboardInterrupt):
        train_expert(base, [data], out2, training=settings, callbacks=[StopAfterSave(5)])
    more = RecordSteps()
    longer = dataclasses.replace(settings, epochs=2.0)
    train_expert(base, [data], out2, training=longer, resume=True, callbacks=[more])
    assert more.steps == [6]
    out3 = tmp_path / "stopped-3"
    with pytest.raises(KeyboardInterrupt):
        train_expert(base, [data], out3, training=settings, callbacks=[StopAfterSave(5)])
    fewer = dataclasses.replace(settings, max_steps=4)
    with pytest.raises(ValueError, match="at step 5, past the 4 step"):
        train_expert(base, [data], out3, training=fewer, resume=True)


def test_keep_best_refuses_to_end_without_its_best_checkpoint(base, data, tmp_path):
    dev = unlearned_dev(tmp_path)
    settings = fast(max_steps=8, save_steps=4, keep_best=True, save_total_limit=1)
    out = tmp_path / "a"
    with pytest.raises(KeyboardInterrupt):
        train_expert(
            base, [data], out, training=settings, eval_data=[dev], callbacks=[StopAfterSave(8)]
        )
    shutil.rmtree(out / "checkpoints" / "checkpoint-4")  # the best one, deleted by hand
    with pytest.raises(RuntimeError, match="checkpoint-4, is missing.*nothing was published"):
        train_expert(base, [data], out, training=settings, eval_data=[dev], resume=True)
    assert not (out / "adapter_config.json").exists()


def test_keep_best_needs_held_out_data(base, data, tmp_path):
    with pytest.raises(ValueError, match="no held-out data"):
        train_expert(
            base,
            [data],
            tmp_path / "a",
            training=fast(max_steps=2, eval_fraction=0.0, keep_best=True),
        )
    assert not (tmp_path / "a").exists()  # refused before the output folder is made
