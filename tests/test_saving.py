"""loramix.saving: save/load round trips, peft-readable experts, atomic writes, file errors;
saving into existing folders, save_pretrained's keyword arguments, the base model record."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import LLAMA_TARGETS, make_expert, random_ids, randomize_gate, tiny_llama
from peft import PeftModel
from tiny_tokenizer import save_tiny_model
from transformers import AutoModelForCausalLM

from loramix import XLoraConfig, XLoraModel
from loramix.records import CANONICAL_NAME, canonical_base_name, default_base


def test_save_load_bit_identical(llama_experts: dict[str, str], tmp_path: Path) -> None:
    config = XLoraConfig(adapters=llama_experts, layerwise_scalings=True, xlora_depth=2)
    model = XLoraModel(tiny_llama(), config)
    randomize_gate(model, seed=5, std=0.3)
    model.set_topk_lora(2)
    model.save_pretrained(tmp_path / "saved")
    for path in llama_experts.values():  # the folder must be self-contained
        shutil.rmtree(path)
    reloaded = XLoraModel.from_pretrained(tiny_llama(), tmp_path / "saved")
    assert reloaded.top_k_lora == 2
    assert reloaded.expert_names == model.expert_names
    ids = random_ids(2, 10)
    with torch.no_grad():
        first, second = model(input_ids=ids), reloaded(input_ids=ids)
    assert torch.equal(first.logits, second.logits)
    assert torch.equal(first.scalings, second.scalings)
    saved = json.loads((tmp_path / "saved" / "xlora_config.json").read_text())
    assert saved["adapters"] == {name: f"experts/{name}" for name in llama_experts}


def test_saved_experts_load_in_peft(llama_experts: dict[str, str], tmp_path: Path) -> None:
    model = XLoraModel(tiny_llama(), XLoraConfig(adapters=llama_experts))
    model.save_pretrained(tmp_path / "saved")
    ids = random_ids()
    for name, original in llama_experts.items():
        copy = PeftModel.from_pretrained(tiny_llama(), tmp_path / "saved" / "experts" / name)
        reference = PeftModel.from_pretrained(tiny_llama(), original)
        with torch.no_grad():
            assert torch.equal(copy(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_save_overwrites_atomically(llama_experts: dict[str, str], tmp_path: Path) -> None:
    model = XLoraModel(tiny_llama(), XLoraConfig(adapters=llama_experts))
    target = tmp_path / "saved"
    model.save_pretrained(target)
    randomize_gate(model, seed=9)
    model.save_pretrained(target)
    reloaded = XLoraModel.from_pretrained(tiny_llama(), target)
    assert torch.equal(reloaded.gate.layers[0].weight, model.gate.layers[0].weight)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "saved") == sorted(
        ["bio", "chem", "mech"]
    )  # no temporary folders left behind


def test_scalings_log(llama_experts: dict[str, str], tmp_path: Path) -> None:

    model = XLoraModel(tiny_llama(), XLoraConfig(adapters=llama_experts))
    model(input_ids=random_ids())
    assert model.get_scalings_log() == []
    model.enable_scalings_logging()
    model(input_ids=random_ids(1, 5))
    model(input_ids=random_ids(2, 3))
    log = model.get_scalings_log()
    assert [tuple(s.shape) for s in log] == [(1, 5, 14, 3), (2, 3, 14, 3)]
    model.disable_scalings_logging()
    model(input_ids=random_ids())
    assert len(model.get_scalings_log()) == 2
    model.save_scalings_log(tmp_path / "log.npz")
    with np.load(tmp_path / "log.npz") as saved:
        np.testing.assert_allclose(saved["scalings_1"], log[1].numpy())
        assert list(saved["expert_names"]) == ["bio", "chem", "mech"]
    model.clear_scalings_log()
    assert model.get_scalings_log() == []


def test_corrupt_weights_name_the_file(tmp_path: Path) -> None:
    folder = make_expert(tiny_llama, tmp_path / "bad", 1, ["q_proj"])
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt") as error:
        XLoraModel(tiny_llama(), XLoraConfig(adapters={"b": str(folder)}))
    assert str(weights) in str(error.value)


def test_missing_weights_and_folder(tmp_path: Path) -> None:
    folder = make_expert(tiny_llama, tmp_path / "gone", 1, ["q_proj"])
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        XLoraModel(tiny_llama(), XLoraConfig(adapters={"g": str(folder)}))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        XLoraModel(tiny_llama(), XLoraConfig(adapters={"g": str(tmp_path / "nowhere")}))


def test_gate_weights_that_do_not_fit(llama_experts: dict[str, str], tmp_path: Path) -> None:
    XLoraModel(tiny_llama(), XLoraConfig(adapters=llama_experts)).save_pretrained(tmp_path / "s")
    config_path = tmp_path / "s" / "xlora_config.json"
    config = json.loads(config_path.read_text())
    config["layerwise_scalings"] = True
    config_path.write_text(json.dumps(config))
    base = tiny_llama()
    with pytest.raises(ValueError, match=r"gate weight layers\.0\.\w+ has shape"):
        XLoraModel.from_pretrained(base, tmp_path / "s")
    assert type(base.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # restored


def saved_model(experts: dict[str, str]) -> XLoraModel:
    model = XLoraModel(tiny_llama(), XLoraConfig(adapters=experts))
    with torch.no_grad():
        for param in model.gate.parameters():
            param.normal_(0, 0.3)
    return model


def outputs(model: XLoraModel) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=random_ids()).logits


def test_save_into_existing_folder_keeps_the_users_files(llama_experts, tmp_path: Path) -> None:
    target = tmp_path / "saved"
    (target / "results").mkdir(parents=True)
    (target / "results" / "my_notes.txt").write_text("keep me")
    (target / "experts" / "bio").mkdir(parents=True)
    (target / "experts" / "bio" / "notes.md").write_text("mine too")
    model = saved_model(llama_experts)
    model.save_pretrained(target)
    assert (target / "results" / "my_notes.txt").read_text() == "keep me"
    assert (target / "experts" / "bio" / "notes.md").read_text() == "mine too"
    reloaded = XLoraModel.from_pretrained(tiny_llama(), target)
    assert torch.equal(outputs(reloaded), outputs(model))
    assert not [p for p in target.iterdir() if p.name.startswith(".")]  # no staging left


def test_resave_with_other_experts_removes_only_stale_loramix_files(
    llama_experts, tmp_path: Path
) -> None:
    target = tmp_path / "saved"
    saved_model(llama_experts).save_pretrained(target)
    (target / "experts" / "mech" / "my_plot.png").write_bytes(b"png")
    two = {name: llama_experts[name] for name in ("bio", "chem")}
    smaller = saved_model(two)
    smaller.save_pretrained(target, safe_serialization=False)
    assert sorted(p.name for p in (target / "experts").iterdir()) == ["bio", "chem", "mech"]
    assert [p.name for p in (target / "experts" / "mech").iterdir()] == ["my_plot.png"]
    assert not (target / "gate.safetensors").exists()  # the other format's stale file
    assert not (target / "experts" / "bio" / "adapter_model.safetensors").exists()
    assert (target / "gate.bin").is_file() and (
        target / "experts" / "bio" / "adapter_model.bin"
    ).is_file()
    reloaded = XLoraModel.from_pretrained(tiny_llama(), target)
    assert reloaded.expert_names == ["bio", "chem"]
    assert torch.equal(outputs(reloaded), outputs(smaller))


@pytest.mark.parametrize("foreign", ["adapter_config.json", "config.json"])
def test_save_refuses_a_folder_of_another_model(llama_experts, tmp_path, foreign) -> None:
    target = tmp_path / "other"
    target.mkdir()
    (target / foreign).write_text("{}")
    with pytest.raises(ValueError, match="Nothing was written: save to another folder"):
        saved_model(llama_experts).save_pretrained(target)
    assert sorted(p.name for p in target.iterdir()) == [foreign]


def test_save_refuses_a_file(llama_experts, tmp_path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        saved_model(llama_experts).save_pretrained(tmp_path / "file")


def test_unknown_save_arguments_are_named(llama_experts, tmp_path) -> None:
    model = saved_model(llama_experts)
    with pytest.raises(TypeError, match=r"\['max_shard_size'\]"):
        model.save_pretrained(tmp_path / "a", max_shard_size="5GB")
    with pytest.raises(TypeError, match=r"\['repo_id'\] only apply with push_to_hub"):
        model.save_pretrained(tmp_path / "a", repo_id="me/model")
    assert not (tmp_path / "a").exists()
    model.save_pretrained(tmp_path / "b", is_main_process=False)
    assert not (tmp_path / "b").exists()


def test_push_to_hub_uploads_loramix_files(llama_experts, tmp_path, monkeypatch) -> None:
    import huggingface_hub

    calls: list[tuple[str, dict]] = []

    class FakeApi:
        def __init__(self, token=None) -> None:
            calls.append(("init", {"token": token}))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    target = tmp_path / "saved"
    target.mkdir()
    (target / "private_notes.txt").write_text("not for the hub")
    saved_model(llama_experts).save_pretrained(
        target, push_to_hub=True, repo_id="me/xlora", private=True, token="t0k", commit_message="m"
    )
    assert calls[0] == ("init", {"token": "t0k"})
    assert calls[1] == ("create_repo", {"repo_id": "me/xlora", "private": True, "exist_ok": True})
    upload = calls[2][1]
    assert upload["repo_id"] == "me/xlora" and upload["commit_message"] == "m"
    assert Path(upload["folder_path"]) == target
    assert "private_notes.txt" not in upload["allow_patterns"]
    assert {"xlora_config.json", "gate.safetensors", "base_model.json"} <= set(
        upload["allow_patterns"]
    )
    assert "experts/bio/adapter_model.safetensors" in upload["allow_patterns"]


def test_base_is_recorded_and_from_pretrained_loads_a_named_base(tmp_path) -> None:
    base_dir = save_tiny_model(tmp_path / "tiny-base")
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    make = lambda: AutoModelForCausalLM.from_pretrained(base_dir)  # noqa: E731
    expert = make_expert(make, tmp_path / "e", 1, ["q_proj", "v_proj"])
    model = XLoraModel(base, XLoraConfig(adapters={"e": str(expert)}))
    model.save_pretrained(tmp_path / "saved")
    record = json.loads((tmp_path / "saved" / "base_model.json").read_text())
    assert record["name"] == str(base_dir.resolve())
    assert record["fingerprint"] == {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "vocab_size": base.config.vocab_size,
    }
    adapter = json.loads((tmp_path / "saved/experts/e/adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(base_dir.resolve())
    assert default_base(tmp_path / "saved") == str(base_dir.resolve())
    reloaded = XLoraModel.from_pretrained(str(base_dir), tmp_path / "saved")  # a string base
    assert torch.equal(outputs(reloaded), outputs(model))


def edit_base_record(folder: Path, name: str, **fingerprint) -> None:
    path = folder / "base_model.json"
    record = json.loads(path.read_text())
    record["name"] = name
    record["fingerprint"].update(fingerprint)
    path.write_text(json.dumps(record))


def test_a_base_with_other_sizes_is_refused(llama_experts, tmp_path) -> None:
    saved_model(llama_experts).save_pretrained(tmp_path / "saved")
    edit_base_record(tmp_path / "saved", "someone/else", vocab_size=1000)
    with pytest.raises(
        ValueError, match=r"vocab_size 1000 \(recorded\) vs 97.*--base someone/else"
    ):
        XLoraModel.from_pretrained(tiny_llama(), tmp_path / "saved")


def test_another_base_name_with_the_same_shapes_warns(llama_experts, tmp_path, caplog) -> None:
    saved_model(llama_experts).save_pretrained(tmp_path / "saved")
    edit_base_record(tmp_path / "saved", "someone/else")
    base = tiny_llama_named("me/mine")
    with caplog.at_level(logging.WARNING, logger="loramix.records"):
        XLoraModel.from_pretrained(base, tmp_path / "saved")
    assert "saved with base model someone/else but is loaded on me/mine" in caplog.text


def test_an_expert_trained_on_another_base_warns_naming_both(tmp_path, caplog) -> None:
    expert = make_expert(tiny_llama, tmp_path / "e", 1, LLAMA_TARGETS)
    config_path = expert / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "someone/other-base"
    config_path.write_text(json.dumps(config))
    base = tiny_llama_named("smollm2")
    with caplog.at_level(logging.WARNING, logger="loramix.records"):
        XLoraModel(base, XLoraConfig(adapters={"e": str(expert)}))
    assert "someone/other-base" in caplog.text and CANONICAL_NAME in caplog.text
    caplog.clear()
    config["base_model_name_or_path"] = "smollm2"  # the old spelling of the same base
    config_path.write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="loramix.records"):
        XLoraModel(tiny_llama_named(CANONICAL_NAME), XLoraConfig(adapters={"e": str(expert)}))
    assert caplog.text == ""


def tiny_llama_named(name: str):
    base = tiny_llama()
    base.config.name_or_path = name
    return base


def test_canonical_names() -> None:
    assert canonical_base_name("smollm2") == CANONICAL_NAME
    assert canonical_base_name(CANONICAL_NAME) == CANONICAL_NAME
    assert canonical_base_name("") is None


def test_folder_without_records_still_loads(llama_experts, tmp_path) -> None:
    model = saved_model(llama_experts)
    model.save_pretrained(tmp_path / "saved")
    (tmp_path / "saved" / "base_model.json").unlink()  # saved by an earlier loramix
    assert default_base(tmp_path / "saved") is None
    shutil.rmtree(tmp_path / "bio")
    assert torch.equal(
        outputs(XLoraModel.from_pretrained(tiny_llama(), tmp_path / "saved")), outputs(model)
    )


BUNDLE = Path(__file__).resolve().parents[1] / "models" / "science-xlora"


@pytest.mark.slow
@pytest.mark.skipif(not (BUNDLE / "xlora_config.json").is_file(), reason="no bundled model")
def test_from_pretrained_loads_the_embedded_base_by_name() -> None:
    from loramix.records import prompt_rendering

    model = XLoraModel.from_pretrained("smollm2", BUNDLE)
    assert model.lm.config.name_or_path == CANONICAL_NAME
    assert default_base(BUNDLE) == "smollm2"
    assert prompt_rendering(BUNDLE)["chat"] is False  # the science experts trained plain
    for path in (BUNDLE / "experts").glob("*/adapter_config.json"):
        assert json.loads(path.read_text())["base_model_name_or_path"] == CANONICAL_NAME


def test_a_base_built_in_memory_loads_a_folder_saved_from_disk(tmp_path) -> None:
    base_dir = save_tiny_model(tmp_path / "tiny-base")
    make = lambda: AutoModelForCausalLM.from_pretrained(base_dir)  # noqa: E731
    expert = make_expert(make, tmp_path / "e", 1, ["q_proj"])
    model = XLoraModel(make(), XLoraConfig(adapters={"e": str(expert)}))
    model.save_pretrained(tmp_path / "saved")  # records architectures ["LlamaForCausalLM"]
    in_memory = AutoModelForCausalLM.from_config(make().config)
    in_memory.config.architectures = None
    XLoraModel.from_pretrained(in_memory, tmp_path / "saved")  # no architectures: not compared


def test_from_pretrained_without_a_base_loads_the_recorded_one(tmp_path) -> None:
    base_dir = save_tiny_model(tmp_path / "tiny-base")
    make = lambda: AutoModelForCausalLM.from_pretrained(base_dir)  # noqa: E731
    expert = make_expert(make, tmp_path / "e", 1, ["q_proj", "v_proj"])
    model = XLoraModel(make(), XLoraConfig(adapters={"e": str(expert)}))
    model.save_pretrained(tmp_path / "saved")
    reloaded = XLoraModel.from_pretrained(None, tmp_path / "saved")  # base_model.json's base
    assert torch.equal(outputs(reloaded), outputs(model))
