"""Cross-domain composite questions and their verifiers."""

from __future__ import annotations

import random

import pytest

for _module in ("Bio", "periodictable", "pint"):
    pytest.importorskip(
        _module, reason="science extra not installed: pip install 'loramix[science]'"
    )

from loramix.science import biology, composite, proteins  # noqa: E402
from loramix.science.registry import get_task  # noqa: E402


@pytest.mark.parametrize("task", composite.TASKS, ids=lambda t: t.name)
def test_ground_truth_verifies_and_garbage_does_not(task):
    rng = random.Random(0)
    for _ in range(20):
        example = task.sample(rng)
        assert example["prompt"].endswith("?")
        assert task.verify(example, example["completion"]), example
        assert not task.verify(example, "I do not know")


def test_translate_charge_chains_translation_and_charge():
    assert round(proteins.net_charge(biology.translate("AAAAAAAAA"))) == 3  # K-K-K
    task = get_task("composite", "translate_charge")
    example = {"domain": "composite", "task": "translate_charge", "answer": 3}
    assert task.verify(example, "+3")
    assert task.verify(example, "K-K-K +3")
    assert not task.verify(example, "+2")


def test_design_dna_charge_accepts_any_valid_design():
    task = get_task("composite", "design_dna_charge")
    answer = {"codons": 3, "first": "K", "charge": 3}
    example = {"domain": "composite", "task": "design_dna_charge", "answer": answer}
    assert task.verify(example, "AAA AAA AAA")  # K-K-K
    assert task.verify(example, "AAG CGT AAA")  # K-R-K
    assert not task.verify(example, "AAA GGC AAA")  # K-G-K: +2
    assert not task.verify(example, "AAA AAA TAA")  # stop codon
    assert not task.verify(example, "AAA AAA AAA AAA")  # 4 codons


def test_moles_mass_reads_units_with_pint():
    task = get_task("composite", "moles_mass")
    example = {"domain": "composite", "task": "moles_mass", "answer": {"value": 138.2, "unit": "g"}}
    assert task.verify(example, "138.2 g")
    assert task.verify(example, "0.1382 kg")
    assert not task.verify(example, "138.2")  # no unit
    assert not task.verify(example, "138.2 g/mol")  # wrong dimension
    assert not task.verify(example, "150 g")


def test_needs_cover_every_task_and_filter_by_domain():
    assert set(composite.NEEDS) == {t.name for t in composite.TASKS}
    first_five = [
        t.name for t in composite.tasks_for(("biology", "chemistry", "proteins", "mechanics"))
    ]
    assert first_five == [t.name for t in composite.TASKS[:5]]  # the 4-domain set is unchanged
    assert composite.tasks_for(("mathematics",)) == ()


def test_smiles_mass_reads_hydrogens_from_rdkit():
    pytest.importorskip("rdkit", reason="science extra not installed")
    assert composite.formula_of_smiles("CCO") == {"C": 2, "H": 6, "O": 1}
    task = get_task("composite", "smiles_mass")
    example = {"domain": "composite", "task": "smiles_mass", "answer": 46.069}
    assert task.verify(example, "46.1")
    assert not task.verify(example, "45.1")


def test_foam_stress_chains_gibson_ashby_and_hooke():
    task = get_task("composite", "foam_stress")
    example = {"domain": "composite", "task": "foam_stress", "answer": 0.2}  # 20 MPa * 1%
    assert task.verify(example, "0.2")
    assert not task.verify(example, "20")
