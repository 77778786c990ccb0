"""write_datasets: determinism, held-out splits, file layout and input validation."""

from __future__ import annotations

import json

import pytest

for _module in ("Bio", "periodictable", "pint"):
    pytest.importorskip(
        _module, reason="science extra not installed: pip install 'loramix[science]'"
    )

from loramix.science import DOMAINS, verify, write_datasets  # noqa: E402
from loramix.science.datasets import LIBRARIES, check_disjoint  # noqa: E402

SIZES = {"n_train": 24, "n_test": 8}


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("science")
    return out, write_datasets(out, seed=0, **SIZES)


def test_writes_every_file_and_nothing_else(written):
    out, paths = written
    expected = {f"{d}_{split}.jsonl" for d in DOMAINS for split in ("train", "dev", "test")}
    expected |= {f"{s}_{split}.jsonl" for s in ("composite", "mixed") for split in ("dev", "test")}
    expected |= {"manifest.json"}
    assert set(paths) == expected
    assert {p.name for p in out.iterdir()} == expected  # no temporary files left behind
    assert len(_read(paths["biology_train.jsonl"])) == SIZES["n_train"]
    assert len(_read(paths["mixed_test.jsonl"])) == SIZES["n_test"]
    manifest = json.loads(paths["manifest.json"].read_text())
    assert set(manifest["versions"]) == set(LIBRARIES)


def test_same_seed_gives_byte_identical_files(written, tmp_path):
    _, first = written
    again = write_datasets(tmp_path, seed=0, **SIZES)
    for name, path in first.items():
        assert again[name].read_bytes() == path.read_bytes(), name
    other = write_datasets(tmp_path / "other", seed=1, **SIZES)
    assert other["biology_train.jsonl"].read_bytes() != first["biology_train.jsonl"].read_bytes()


def test_splits_share_no_prompt(written):
    _, paths = written
    prompts = {}
    for split in ("train", "dev", "test"):
        files = [p for name, p in paths.items() if name.endswith(f"_{split}.jsonl")]
        prompts[split] = {ex["prompt"] for p in files for ex in _read(p)}
    assert not prompts["train"] & prompts["test"]
    assert not prompts["train"] & prompts["dev"]
    assert not prompts["dev"] & prompts["test"]
    assert len(_read(paths["mixed_dev.jsonl"])) == SIZES["n_test"]  # n_dev defaults to n_test


def test_check_disjoint_names_both_files():
    example = {"prompt": "p", "completion": "c", "domain": "d", "task": "t", "answer": 1}
    with pytest.raises(RuntimeError, match="a_dev.jsonl and a_test.jsonl share"):
        check_disjoint({"a_dev.jsonl": [example], "a_test.jsonl": [example]})
    check_disjoint({"a_test.jsonl": [example], "mixed_test.jsonl": [example]})  # same split


def test_composite_tasks_follow_the_domains(tmp_path):
    paths = write_datasets(tmp_path, n_train=6, n_test=4, domains=["biology", "proteins"])
    tasks = {ex["task"] for ex in _read(paths["composite_test.jsonl"])}
    assert tasks == {"translate_charge", "translate_weight", "design_dna_charge"}
    alone = write_datasets(tmp_path / "alone", n_train=6, n_test=4, domains=["mathematics"])
    assert "composite_test.jsonl" not in alone  # nothing chains mathematics with itself


def test_domains_are_balanced_and_examples_verify(written):
    _, paths = written
    mixed = _read(paths["mixed_test.jsonl"])
    assert {ex["domain"] for ex in mixed} == set(DOMAINS)
    for domain in DOMAINS:
        train = _read(paths[f"{domain}_train.jsonl"])
        counts = {}
        for ex in train:
            counts[ex["task"]] = counts.get(ex["task"], 0) + 1
        assert max(counts.values()) - min(counts.values()) <= 1, counts
    composite = _read(paths["composite_test.jsonl"])
    assert {ex["task"] for ex in composite} >= {"smiles_mass", "foam_stress"}  # new domains too
    for ex in mixed + composite + _read(paths["mixed_dev.jsonl"]):
        assert verify(ex, ex["completion"]), ex


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_train": 0}, "n_train=0 must be a positive integer"),
        ({"domains": ["physics"]}, "choose one or more of"),
        ({"n_test": 2}, "n_test=2 is smaller than the 8 domains"),
        ({"n_dev": 0}, "n_dev=0 must be a positive integer"),
    ],
)
def test_bad_arguments_name_the_fix_and_write_nothing(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        write_datasets(tmp_path / "out", **{**SIZES, **kwargs})
    assert not (tmp_path / "out").exists()


def test_exhausted_task_says_to_ask_for_fewer(tmp_path):
    with pytest.raises(ValueError, match="ask for fewer examples"):
        write_datasets(tmp_path, n_train=5000, n_test=8, domains=["chemistry"])
