"""XLoraConfig: peft-compatible defaults, JSON round trip, foreign config files, errors."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import peft
import pytest

from loramix import config as config_module
from loramix.config import CONFIG_NAME, XLoraConfig

ADAPTERS = {"math": "/experts/math", "code": "/experts/code", "bio": "relative/bio"}

# Non-default values for every field, so that a field lost on the way shows up.
NON_DEFAULTS = {
    "adapters": ADAPTERS,
    "hidden_size": 32,
    "enable_softmax": False,
    "enable_softmax_topk": True,
    "layerwise_scalings": True,
    "xlora_depth": 3,
    "xlora_size": 16,
    "xlora_dropout_p": 0.1,
    "enable_relu_and_dropout": False,
    "use_bias": False,
    "use_trainable_adapters": True,
    "softmax_temperature": 0.5,
    "top_k_lora": 2,
    "scaling_pass_value": 0.25,
    "global_scaling_weight": 0.7,
}


# Fields of the original `xlora` package that peft's config does not have.
ORIGINAL_ONLY = {"enable_relu_and_dropout", "use_bias"}


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_non_defaults_cover_every_field() -> None:
    assert set(NON_DEFAULTS) == field_names(XLoraConfig)
    defaults = {f.name: f.default for f in dataclasses.fields(XLoraConfig)}
    assert all(NON_DEFAULTS[name] != defaults[name] for name in NON_DEFAULTS)


# ------------------------------------------------------------------ peft defaults


def test_every_field_exists_in_peft_or_the_original_package() -> None:
    assert field_names(XLoraConfig) - ORIGINAL_ONLY <= field_names(peft.XLoraConfig)
    assert not ORIGINAL_ONLY & field_names(peft.XLoraConfig)


def test_original_only_fields_default_to_the_original_packages_defaults() -> None:
    config = XLoraConfig(adapters={"a": "a"})
    assert config.enable_relu_and_dropout is True and config.use_bias is True


def test_defaults_equal_peft_defaults() -> None:
    ours = {f.name: f for f in dataclasses.fields(XLoraConfig)}
    theirs = {f.name: f for f in dataclasses.fields(peft.XLoraConfig)}
    shared = sorted(set(ours) & set(theirs))
    assert len(shared) == 13
    for name in shared:
        if name == "adapters":  # peft: None (then {} with a warning); loramix: {} by factory
            assert theirs[name].default is None
            assert ours[name].default_factory() == {}
            continue
        assert ours[name].default == theirs[name].default, name


def test_constructed_values_equal_peft_constructed_values() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.XLoraConfig(hidden_size=32, adapters=dict(ADAPTERS))
    ours = XLoraConfig(adapters=dict(ADAPTERS), hidden_size=32)
    for name in field_names(XLoraConfig) - ORIGINAL_ONLY:
        assert getattr(ours, name) == getattr(theirs, name), name


# --------------------------------------------------------------------- round trip


def test_json_round_trip(tmp_path: Path) -> None:
    config = XLoraConfig(**NON_DEFAULTS)
    path = tmp_path / "sub" / CONFIG_NAME  # the folder is created
    config.save(path)
    assert XLoraConfig.from_file(path) == config
    assert XLoraConfig.from_file(path.parent) == config  # a folder is searched
    assert os.listdir(path.parent) == [CONFIG_NAME]  # no temporary file left behind
    assert json.loads(path.read_text()) == config.to_dict()


def test_round_trip_keeps_expert_order(tmp_path: Path) -> None:
    adapters = {"z": "z", "a": "a", "m": "m"}
    XLoraConfig(adapters=adapters).save(tmp_path / "c.json")
    assert XLoraConfig.from_file(tmp_path / "c.json").expert_names == ["z", "a", "m"]


def test_path_adapters_are_written_as_strings(tmp_path: Path) -> None:
    config = XLoraConfig(adapters={"a": tmp_path / "a"})
    config.save(tmp_path / "c.json")
    assert json.loads((tmp_path / "c.json").read_text())["adapters"] == {"a": str(tmp_path / "a")}


def test_save_replaces_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / CONFIG_NAME
    first = XLoraConfig(adapters={"a": "a"})
    first.save(path)
    second = XLoraConfig(adapters={"b": "b"}, top_k_lora=1)
    second.save(path)
    assert XLoraConfig.from_file(path) == second
    assert os.listdir(tmp_path) == [CONFIG_NAME]

    def failing_replace(*_args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(config_module.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        first.save(path)
    assert XLoraConfig.from_file(path) == second  # the old file is intact
    assert os.listdir(tmp_path) == [CONFIG_NAME]  # and the temporary file is gone


# ------------------------------------------------------------------ foreign files


def test_reads_peft_adapter_config(tmp_path: Path) -> None:
    options = {k: v for k, v in NON_DEFAULTS.items() if k != "adapters" and k not in ORIGINAL_ONLY}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.XLoraConfig(task_type="CAUSAL_LM", adapters=dict(ADAPTERS), **options)
    theirs.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == "XLORA"  # what peft writes: checked, then dropped
    assert {"task_type", "peft_version", "base_model_name_or_path"} <= set(written)
    ours = XLoraConfig.from_file(tmp_path)  # the folder: adapter_config.json is found
    assert ours == XLoraConfig(**{**options, "adapters": ADAPTERS})
    for name in field_names(XLoraConfig) - ORIGINAL_ONLY:
        assert getattr(ours, name) == getattr(theirs, name), name


def test_reads_peft_to_dict() -> None:
    """peft's `to_dict()` holds `peft_type` as a `PeftType` enum, not a string."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=32, adapters=dict(ADAPTERS))
    ours = XLoraConfig.from_dict(theirs.to_dict())
    assert ours == XLoraConfig(adapters=ADAPTERS, hidden_size=32)


def original_xlora_config() -> dict:
    """A `xlora_config.json` as the original `xlora` package writes it."""
    return {
        "hidden_size": 32,
        "base_model_id": "mistralai/Mistral-7B-Instruct-v0.1",
        "adapters": dict(ADAPTERS),
        "enable_softmax": True,
        "enable_softmax_topk": False,
        "layerwise_scalings": True,
        "xlora_depth": 2,
        "xlora_size": 64,
        "enable_relu_and_dropout": True,
        "use_bias": True,
        "xlora_dropout_p": 0.3,
        "stop_token_id": None,
        "use_trainable_adapters": False,
        "softmax_temperature": 2.0,
        "top_k_lora": None,
        "scaling_pass_value": 0.0,
        "global_scaling_weight": 1.5,
    }


def test_reads_original_xlora_config(tmp_path: Path) -> None:
    (tmp_path / "xlora_config.json").write_text(json.dumps(original_xlora_config()))
    config = XLoraConfig.from_file(tmp_path)
    assert config == XLoraConfig(
        adapters=ADAPTERS,
        hidden_size=32,
        layerwise_scalings=True,
        xlora_depth=2,
        xlora_size=64,
        xlora_dropout_p=0.3,
        softmax_temperature=2.0,
        global_scaling_weight=1.5,
    )


def test_original_gate_options_are_kept(tmp_path: Path) -> None:
    data = {**original_xlora_config(), "enable_relu_and_dropout": False, "use_bias": False}
    (tmp_path / "xlora_config.json").write_text(json.dumps(data))
    config = XLoraConfig.from_file(tmp_path)
    assert config.enable_relu_and_dropout is False and config.use_bias is False


def test_adapter_list_takes_folder_names() -> None:
    config = XLoraConfig.from_dict({"adapters": ["/a/math_lora", "code_lora"]})
    assert config.adapters == {"math_lora": "/a/math_lora", "code_lora": "code_lora"}


def test_adapter_list_with_duplicate_folder_names_refused() -> None:
    """Two folders with one base name must not collapse silently into one expert."""
    with pytest.raises(ValueError, match="lora"):
        XLoraConfig.from_dict({"adapters": ["/a/lora", "/b/lora"]})


def test_folder_search_order(tmp_path: Path) -> None:
    XLoraConfig(adapters={"ours": "x"}).save(tmp_path / CONFIG_NAME)
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "XLORA", "adapters": {"peft": "y"}})
    )
    assert XLoraConfig.from_file(tmp_path).expert_names == ["ours"]


# ------------------------------------------------------------------------ errors

INVALID_VALUES = [
    ("adapters", {"": "path"}, "expert name"),
    ("adapters", {"a": 3}, "PEFT adapter folder"),
    ("adapters", ["a"], "dict of expert name"),
    ("adapters", None, "dict of expert name"),
    ("adapters", {}, "at least one expert"),
    ("hidden_size", 0, "positive int, or None"),
    ("hidden_size", 32.0, "positive int, or None"),
    ("hidden_size", True, "positive int, or None"),
    ("enable_softmax", "yes", "True or False"),
    ("enable_softmax_topk", 1, "True or False"),
    ("layerwise_scalings", None, "True or False"),
    ("enable_relu_and_dropout", "yes", "True or False"),
    ("use_bias", 0, "True or False"),
    ("use_trainable_adapters", "no", "bool"),
    ("xlora_depth", 0, "int >= 1"),
    ("xlora_depth", 2.0, "int >= 1"),
    ("xlora_size", 0, "int >= 1"),
    ("xlora_dropout_p", 1.0, "probability in [0, 1)"),
    ("xlora_dropout_p", -0.1, "probability in [0, 1)"),
    ("softmax_temperature", 0, "number > 0"),
    ("softmax_temperature", "1", "number > 0"),
    ("top_k_lora", 0, "between 1 and the number of experts (2)"),
    ("top_k_lora", 3, "between 1 and the number of experts (2)"),
    ("top_k_lora", True, "between 1 and the number of experts (2)"),
    ("scaling_pass_value", None, "a number"),
    ("global_scaling_weight", "1", "a number"),
]


@pytest.mark.parametrize(("name", "value", "fix"), INVALID_VALUES)
def test_invalid_field_names_field_value_and_fix(name: str, value: object, fix: str) -> None:
    kwargs = {"adapters": {"a": "a", "b": "b"}, name: value}
    with pytest.raises(ValueError) as error:
        XLoraConfig(**kwargs)
    message = str(error.value)
    assert f"{name}={value!r}" in message
    assert fix in message


def test_all_problems_in_one_error() -> None:
    with pytest.raises(ValueError) as error:
        XLoraConfig(
            adapters={"a": "a"},
            hidden_size=-1,
            xlora_depth=0,
            softmax_temperature=-1.0,
            top_k_lora=5,
            enable_softmax="no",
        )
    message = str(error.value)
    for name in ("hidden_size", "xlora_depth", "softmax_temperature", "top_k_lora"):
        assert f"{name}=" in message
    assert "enable_softmax='no'" in message
    assert message.count("\n") == 5  # a header line and one line per problem


def test_validate_catches_later_mutation() -> None:
    config = XLoraConfig(adapters={"a": "a"})
    config.top_k_lora = 2
    with pytest.raises(ValueError, match="top_k_lora=2"):
        config.validate()


def test_unknown_keys_named() -> None:
    with pytest.raises(ValueError) as error:
        XLoraConfig.from_dict(
            {"adapters": {"a": "a"}, "xlora_dept": 2, "topk": 1}, source="my.json"
        )
    message = str(error.value)
    assert message.startswith("my.json:")
    assert "['topk', 'xlora_dept']" in message
    assert "xlora_depth" in message  # the known keys are listed


def test_invalid_value_in_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / CONFIG_NAME
    path.write_text(json.dumps({"adapters": {"a": "a"}, "xlora_depth": 0}))
    with pytest.raises(ValueError) as error:
        XLoraConfig.from_file(path)
    assert str(path) in str(error.value) and "xlora_depth=0" in str(error.value)


def test_non_xlora_peft_type_refused(tmp_path: Path) -> None:
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16}))
    with pytest.raises(ValueError) as error:
        XLoraConfig.from_file(tmp_path)
    message = str(error.value)
    assert str(path) in message and "'LORA'" in message
    assert "list it under `adapters`" in message


@pytest.mark.parametrize(
    "content", [b"{not json", b"", b"\xff\xfe\x00\x81 binary"], ids=["broken", "empty", "binary"]
)
def test_bad_json_names_the_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / CONFIG_NAME
    path.write_bytes(content)
    with pytest.raises(ValueError) as error:
        XLoraConfig.from_file(path)
    assert str(path) in str(error.value)


def test_json_that_is_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / CONFIG_NAME
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object, got list") as error:
        XLoraConfig.from_file(path)
    assert str(path) in str(error.value)


def test_missing_file_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        XLoraConfig.from_file(tmp_path / "nowhere.json")
    assert str(tmp_path / "nowhere.json") in str(error.value)
    with pytest.raises(FileNotFoundError) as error:
        XLoraConfig.from_file(tmp_path)
    for name in (CONFIG_NAME, "adapter_config.json"):
        assert name in str(error.value)
