"""Tests of loramix.training.gate and `loramix train-gate` on a tiny Llama saved to disk.

The task where the gate matters: two experts, "good" (a LoRA trained on the data with
`train_expert`) and "bad" (random, large updates). A gate that learns picks "good".
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import StopAfterSave
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from tiny_tokenizer import save_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, TrainingArguments

from loramix import XLoraConfig, XLoraModel
from loramix.cli import main
from loramix.training.data import PadCollator, load_jsonl
from loramix.training.expert import LoraSettings, train_expert
from loramix.training.gate import (
    TRAINABLE_WEIGHTS_NAME,
    GateTrainer,
    ScalingsLog,
    train_gate,
)
from loramix.training.regularizer import GateRegularizer, scaling_terms
from loramix.training.trainer import TrainingConfig

FAST = TrainingConfig(
    batch_size=4, progress=False, logging_steps=1, warmup=0, lr=5e-2, lr_scheduler="constant"
)


def fast(**changes) -> TrainingConfig:
    """`FAST` with some settings changed."""
    return dataclasses.replace(FAST, **changes)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("base") / "tiny-llama")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Two question/answer pairs, repeated."""
    path = tmp_path_factory.mktemp("data") / "qa.jsonl"
    pairs = [("what is two plus two? ", "four."), ("capital of france? ", "paris.")]
    path.write_text(
        "".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in pairs * 8)
    )
    return path


@pytest.fixture(scope="module")
def experts(base, data, tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("experts")
    train_expert(
        base,
        [data],
        folder / "good",
        LoraSettings(rank=4, alpha=8),
        TrainingConfig(
            max_steps=20, eval_fraction=0.0, batch_size=4, progress=False, warmup=0, lr=1e-2
        ),
    )
    model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(11)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
        init_lora_weights=False,
        lora_dropout=0.0,
    )
    bad = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in bad.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    bad.save_pretrained(folder / "bad")
    return {"bad": str(folder / "bad"), "good": str(folder / "good")}


def batch_of(base: Path, data: Path) -> dict[str, torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(base)
    examples = list(load_jsonl(data, tokenizer, max_length=64))
    return PadCollator(tokenizer.pad_token_id)(examples)


def fresh_model(base: Path, experts: dict[str, str], seed: int = 0, **options) -> XLoraModel:
    """The model as `train_gate` builds it before training (same seed, same gate init)."""
    torch.manual_seed(seed)
    return XLoraModel(
        AutoModelForCausalLM.from_pretrained(base), XLoraConfig(adapters=experts, **options)
    )


class KeepModel(TrainerCallback):
    """Keeps a reference to the trained model."""

    model: XLoraModel | None = None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.model = model


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


def test_gate_learns_the_good_expert_and_only_the_gate_changes(base, data, experts, tmp_path):
    kept = KeepModel()
    out = train_gate(
        base,
        XLoraConfig(adapters=experts, layerwise_scalings=True),
        [data],
        tmp_path / "gate",
        fast(max_steps=12, save_steps=6, eval_fraction=0.0),
        callbacks=[kept],
    )
    batch = batch_of(base, data)
    before = fresh_model(base, experts, layerwise_scalings=True)
    with torch.no_grad():
        loss_before = before(**batch).loss.item()
        trained = kept.model.eval()
        loss_after = trained(**batch).loss.item()
    assert loss_after < 0.6 * loss_before, (loss_before, loss_after)

    # Only the gate changed: base weights and expert stacks are bit-identical.
    old, new = before.state_dict(), trained.state_dict()
    assert old.keys() == new.keys()
    changed = sorted(k for k in old if not torch.equal(old[k], new[k]))
    assert changed == ["gate.layers.0.bias", "gate.layers.0.weight"]

    # The scalings log moved to the good expert, one line per step, per-layer rows too.
    records = ScalingsLog(out / "scalings_log.jsonl", ["bad", "good"], True).read()
    assert [r["step"] for r in records] == list(range(1, 13))
    assert records[-1]["experts"]["good"] > 0.8 > records[0]["experts"]["good"]
    assert len(records[-1]["layers"]) == trained.n_layers
    assert all(len(row) == 2 for row in records[-1]["layers"])

    # Checkpoints hold the gate only (no base model or expert weights).
    checkpoint = out / "checkpoints" / "checkpoint-12"
    assert load_file(checkpoint / TRAINABLE_WEIGHTS_NAME).keys() == {
        "gate.layers.0.bias",
        "gate.layers.0.weight",
    }
    assert not list(checkpoint.glob("model*.safetensors"))
    assert (checkpoint / TRAINABLE_WEIGHTS_NAME).stat().st_size < 10_000

    # The output folder reloads with the same logits; the summary records the run.
    reloaded = XLoraModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(**batch).logits, trained(**batch).logits, rtol=0, atol=0
        )
    summary = json.loads((out / "training_args.json").read_text())
    assert summary["global_step"] == 12
    assert summary["xlora"]["layerwise_scalings"] is True
    assert summary["expert_names"] == ["bad", "good"]
    assert summary["last_loss"] < summary["first_loss"]


def test_resume_gives_the_uninterrupted_gate(base, data, experts, tmp_path):
    settings = fast(max_steps=6, save_steps=2, eval_fraction=0.25)
    xlora = XLoraConfig(adapters=experts)
    straight = KeepModel()
    train_gate(base, xlora, [data], tmp_path / "straight", settings, callbacks=[straight])

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train_gate(base, xlora, [data], out, settings, callbacks=[StopAt(3)])
    assert (out / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file()
    assert not (out / "xlora_config.json").exists()  # no half-written result
    with pytest.raises(ValueError, match="--resume"):
        train_gate(base, xlora, [data], out, settings)

    steps, resumed = RecordSteps(), KeepModel()
    train_gate(base, xlora, [data], out, settings, resume=True, callbacks=[steps, resumed])
    assert steps.steps == [3, 4, 5, 6]
    for name, param in straight.model.gate.state_dict().items():
        assert torch.equal(param, resumed.model.gate.state_dict()[name]), name
    # The log has each step once (step 3 of the interrupted run was dropped and redone).
    log = ScalingsLog(out / "scalings_log.jsonl", ["bad", "good"], False)
    straight_log = ScalingsLog(tmp_path / "straight" / "scalings_log.jsonl", ["bad", "good"], False)
    assert log.read() == straight_log.read()
    assert [r["step"] for r in log.read()] == [1, 2, 3, 4, 5, 6]


def test_a_gate_stopped_after_its_last_checkpoint_trains_no_step_past_it(
    base, data, experts, tmp_path
):
    # 12 training examples in batches of 4: step 4 does not close an epoch, and Trainer,
    # resumed there, would train a step 5 before it checks for the end.
    settings = fast(max_steps=4, save_steps=2, eval_fraction=0.25)
    xlora = XLoraConfig(adapters=experts)
    straight = KeepModel()
    train_gate(base, xlora, [data], tmp_path / "straight", settings, callbacks=[straight])
    out = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        train_gate(base, xlora, [data], out, settings, callbacks=[StopAfterSave(4)])
    steps, resumed = RecordSteps(), KeepModel()
    train_gate(base, xlora, [data], out, settings, resume=True, callbacks=[steps, resumed])
    assert steps.steps == []
    for name, param in straight.model.gate.state_dict().items():
        assert torch.equal(param, resumed.model.gate.state_dict()[name]), name
    assert json.loads((out / "training_args.json").read_text())["global_step"] == 4


def test_gradient_checkpointing_trains_the_same_gate(base, data, experts, tmp_path):
    settings = fast(max_steps=3, eval_fraction=0.0)
    xlora = XLoraConfig(adapters=experts)
    plain, checkpointed = KeepModel(), KeepModel()
    train_gate(base, xlora, [data], tmp_path / "plain", settings, callbacks=[plain])
    out = train_gate(
        base,
        xlora,
        [data],
        tmp_path / "checkpointed",
        dataclasses.replace(settings, gradient_checkpointing=True),
        callbacks=[checkpointed],
    )
    assert checkpointed.model.checkpointing_activations
    assert not plain.model.checkpointing_activations
    for name, param in plain.model.gate.state_dict().items():
        torch.testing.assert_close(
            checkpointed.model.gate.state_dict()[name], param, rtol=1e-4, atol=1e-6
        )
    summary = json.loads((out / "training_args.json").read_text())
    assert summary["training"]["gradient_checkpointing"] is True


def test_resume_refuses_a_checkpoint_of_another_gate(base, data, experts, tmp_path):
    settings = fast(max_steps=2, save_steps=2, eval_fraction=0.0)
    out = tmp_path / "gate"
    train_gate(base, XLoraConfig(adapters=experts), [data], out, settings)
    other = XLoraConfig(adapters=experts, xlora_depth=2, xlora_size=8)
    more = dataclasses.replace(settings, max_steps=4)
    named = r"differs .* in xlora.xlora_depth: 1 -> 2; xlora.xlora_size: 2048 -> 8"
    with pytest.raises(ValueError, match=named):
        train_gate(base, other, [data], out, more, resume=True)
    # A record without settings (an older loramix): the checkpoint's own check still refuses.
    record = json.loads((out / "training_args.json").read_text())
    del record["run"]
    (out / "training_args.json").write_text(json.dumps(record))
    fix = r"missing keys \['gate.layers.3.bias'.*wrong shapes \['gate.layers.0.bias'.*same experts"
    with pytest.raises(ValueError, match=fix):
        train_gate(base, other, [data], out, more, resume=True)


def test_scaling_terms_formulas():
    uniform = torch.full((2, 3, 4, 5), 0.2)
    balance, entropy = scaling_terms(uniform, None)
    assert balance.item() == pytest.approx(0, abs=1e-6)
    assert entropy.item() == pytest.approx(0, abs=1e-6)

    one_hot = torch.zeros(2, 3, 4, 5)
    one_hot[..., 1] = 1
    balance, entropy = scaling_terms(one_hot, None)
    assert balance.item() == pytest.approx(5 - 1)
    assert entropy.item() == pytest.approx(math.log(5))

    # Padding does not count: one-hot on real tokens, uniform on padding.
    mixed = one_hot.clone()
    mixed[:, 2] = 0.2
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    balance, entropy = scaling_terms(mixed, mask)
    assert balance.item() == pytest.approx(4)
    assert entropy.item() == pytest.approx(math.log(5))


@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_balance_term_changes_the_gradient_only_when_weighted(
    base, data, experts, weight, tmp_path
):
    batch = batch_of(base, data)

    def gate_grads(loss: torch.Tensor, model: XLoraModel) -> list[torch.Tensor]:
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.gate.parameters()]

    model = fresh_model(base, experts).train()
    plain = gate_grads(model(**batch).loss, model)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = GateTrainer(
        model=model, args=args, regularizer=GateRegularizer(balance_weight=weight)
    )
    loss, output = trainer.compute_loss(model, dict(batch), return_outputs=True)
    balance, _ = scaling_terms(output["scalings"], batch["attention_mask"])
    assert loss.item() == pytest.approx(output.loss.item() + weight * balance.item())
    regularized = gate_grads(loss, model)
    same = all(torch.equal(a, b) for a, b in zip(plain, regularized, strict=True))
    assert same == (weight == 0)


def test_balance_term_keeps_both_experts_in_use(base, data, experts, tmp_path):
    settings = fast(max_steps=8, save_steps=100, eval_fraction=0.0)
    shares = {}
    for weight in (0.0, 2.0):
        out = train_gate(
            base,
            XLoraConfig(adapters=experts),
            [data],
            tmp_path / f"w{weight}",
            settings,
            GateRegularizer(balance_weight=weight),
        )
        last = ScalingsLog(out / "scalings_log.jsonl", ["bad", "good"], False).read()[-1]
        shares[weight] = last["experts"]["good"]
    assert shares[2.0] < shares[0.0] - 0.1, shares


def test_settings_errors_name_the_fix(base, data, experts, tmp_path):
    with pytest.raises(ValueError, match="enable the softmax or set both weights to 0"):
        train_gate(
            base,
            XLoraConfig(adapters=experts, enable_softmax=False),
            [data],
            tmp_path / "a",
            regularizer=GateRegularizer(balance_weight=0.1),
        )
    with pytest.raises(ValueError, match=r"balance_weight=-1: use a number >= 0"):
        GateRegularizer(balance_weight=-1)
    with pytest.raises(ValueError, match="top_k_lora=3: use None or an int between 1 and"):
        train_gate(base, XLoraConfig(adapters=experts, top_k_lora=3), [data], tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("softmax", [True, False])
def test_one_expert_with_softmax_warns_that_the_gate_has_nothing_to_choose(
    base, data, experts, tmp_path, caplog, softmax
):
    one = XLoraConfig(adapters={"good": experts["good"]}, enable_softmax=softmax)
    train_gate(base, one, [data], tmp_path / "one", fast(max_steps=1, eval_fraction=0.0))
    warned = [r for r in caplog.records if "nothing to choose" in r.getMessage()]
    assert len(warned) == (1 if softmax else 0)
    if softmax:
        assert warned[0].levelname == "WARNING" and "--no-enable-softmax" in warned[0].getMessage()


def test_scalings_log_truncate_drops_later_and_broken_lines(tmp_path):
    log = ScalingsLog(tmp_path / "log.jsonl", ["x", "y"], layerwise=False)
    for step in (1, 2, 3):
        log.append(step, 1.0 / step, torch.tensor([[0.25, 0.75]]))
    with (tmp_path / "log.jsonl").open("a") as handle:
        handle.write('{"step": 4, "loss"')  # killed mid-write
    log.truncate(2)
    assert [r["step"] for r in log.read()] == [1, 2]
    assert log.read()[0] == {"step": 1, "loss": 1.0, "experts": {"x": 0.25, "y": 0.75}}


def test_cli_trains_with_xlora_flags_and_reports_errors(base, data, experts, tmp_path, capsys):
    out = tmp_path / "cli-gate"
    argv = ["train-gate", "--base", str(base), "--data", str(data), "--out", str(out)]
    argv += ["--expert", f"bad={experts['bad']}", "--expert", f"good={experts['good']}"]
    argv += ["--max-steps", "2", "--batch-size", "4", "--no-progress", "--eval-fraction", "0"]
    argv += ["--layerwise-scalings", "--xlora-depth", "2", "--xlora-size", "8"]
    argv += ["--xlora-dropout-p", "0.1", "--softmax-temperature", "2", "--top-k-lora", "1"]
    argv += ["--enable-softmax-topk", "--scaling-pass-value", "0.5"]
    argv += ["--global-scaling-weight", "0.9", "--balance-weight", "0.1"]
    argv += ["--gradient-checkpointing"]
    assert main(argv) == 0
    assert "saved the X-LoRA model" in capsys.readouterr().out
    config = XLoraConfig.from_file(out)
    assert config.layerwise_scalings and config.xlora_depth == 2 and config.xlora_size == 8
    assert config.xlora_dropout_p == 0.1 and config.softmax_temperature == 2
    assert config.top_k_lora == 1 and config.enable_softmax_topk
    assert config.scaling_pass_value == 0.5 and config.global_scaling_weight == 0.9
    summary = json.loads((out / "training_args.json").read_text())
    assert summary["training"]["gradient_checkpointing"] is True
    XLoraModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)

    with pytest.raises(SystemExit) as info:
        main(["train-gate", "--expert", "no-equals-sign", "--data", str(data), "--out", "x"])
    assert info.value.code == 2
    assert "use NAME=DIR, e.g. --expert math=experts/math" in capsys.readouterr().err

    twice = ["--expert", f"a={experts['bad']}", "--expert", f"a={experts['good']}"]
    assert main(["train-gate", *twice, "--data", str(data), "--out", str(tmp_path / "x")]) == 2
    assert "expert name 'a' is given twice" in capsys.readouterr().err

    # An earlier run is refused with the fix.
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_out_over_an_expert_is_refused_even_with_overwrite(base, data, experts, tmp_path, capsys):
    good = Path(experts["good"])
    before = {p.name: p.read_bytes() for p in good.iterdir() if p.is_file()}
    argv = ["train-gate", "--base", str(base), "--data", str(data), "--out", str(good)]
    argv += ["--expert", f"bad={experts['bad']}", "--expert", f"good={good}"]
    argv += ["--max-steps", "1", "--batch-size", "4", "--no-progress", "--overwrite"]
    assert main(argv) == 2
    assert "output of `loramix train-expert`" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in good.iterdir() if p.is_file()} == before
    assert (good / "checkpoints").is_dir()  # the expert's checkpoints are still there
    with pytest.raises(ValueError, match="a PEFT adapter"):  # an adapter from elsewhere
        train_gate(
            base, XLoraConfig(adapters=experts), [data], experts["bad"], fast(max_steps=1),
            overwrite=True,
        )  # fmt: skip


def test_expert_over_an_xlora_folder_is_refused(base, data, experts, tmp_path):
    xlora = XLoraConfig(adapters=experts)
    out = train_gate(base, xlora, [data], tmp_path / "gate", fast(max_steps=1, eval_fraction=0.0))
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ValueError, match="output of `loramix train-gate`"):
        train_expert(base, [data], out, training=fast(max_steps=1), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == before


def test_a_failed_run_leaves_no_folder(base, data, experts, tmp_path):
    from helpers import LLAMA_TARGETS, make_expert, tiny_llama

    wrong = make_expert(tiny_llama, tmp_path / "wrong", 1, LLAMA_TARGETS)  # other MLP width
    with_wrong = XLoraConfig(adapters={**experts, "wrong": str(wrong)})
    with pytest.raises(ValueError, match="experts do not fit the base model"):
        train_gate(base, with_wrong, [data], tmp_path / "out", FAST)
    assert not (tmp_path / "out").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n')
    with pytest.raises(ValueError, match="bad.jsonl, line 1"):
        train_gate(base, XLoraConfig(adapters=experts), [bad], tmp_path / "out", FAST)
    assert not (tmp_path / "out").exists()


def test_a_finished_run_is_finished(base, data, experts, tmp_path):
    settings = fast(max_steps=2, save_steps=1, eval_fraction=0.0)
    xlora = XLoraConfig(adapters=experts)
    out = train_gate(base, xlora, [data], tmp_path / "gate", settings)
    gate = (out / "gate.safetensors").read_bytes()
    steps = RecordSteps()
    train_gate(base, xlora, [data], out, settings, resume=True, callbacks=[steps])
    assert steps.steps == []  # no step past max_steps
    assert (out / "gate.safetensors").read_bytes() == gate
    assert json.loads((out / "training_args.json").read_text())["global_step"] == 2
    # Raising max_steps continues the run.
    more = dataclasses.replace(settings, max_steps=3)
    train_gate(base, xlora, [data], out, more, resume=True, callbacks=[steps])
    assert steps.steps == [3]


def test_resume_with_other_experts_or_data_says_which_differ(base, data, experts, tmp_path):
    settings = fast(max_steps=2, save_steps=1, eval_fraction=0.0)
    xlora = XLoraConfig(adapters=experts)
    out = train_gate(base, xlora, [data], tmp_path / "gate", settings)
    more = dataclasses.replace(settings, max_steps=4)
    fewer = XLoraConfig(adapters={"good": experts["good"]})
    with pytest.raises(ValueError, match=r"experts.bad: .* -> null"):
        train_gate(base, fewer, [data], out, more, resume=True)
    other = tmp_path / "other.jsonl"
    other.write_text(data.read_text().replace("paris", "lyon"))
    with pytest.raises(ValueError, match=r"^cannot resume .* data: "):
        train_gate(base, xlora, [other], out, more, resume=True)
    with pytest.raises(ValueError, match=r"training.lr: 0.05 -> 0.1"):
        train_gate(base, xlora, [data], out, dataclasses.replace(more, lr=0.1), resume=True)


def test_keep_best_is_refused_for_the_gate(base, data, experts, tmp_path):
    settings = fast(max_steps=2, eval_fraction=0.25, keep_best=True)
    with pytest.raises(ValueError, match="keep_best is not available for the gate"):
        train_gate(base, XLoraConfig(adapters=experts), [data], tmp_path / "gate", settings)
    assert not (tmp_path / "gate").exists()
