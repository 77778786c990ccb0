"""Protein tasks: net charge, molecular weight and peptide design, cross-checked with ProtParam."""

from __future__ import annotations

import random

import pytest

pytest.importorskip("Bio", reason="science extra not installed: pip install 'loramix[science]'")

from loramix.science import proteins  # noqa: E402
from loramix.science.registry import get_task  # noqa: E402


def test_library_cross_checks():
    assert proteins.molecular_weight("G") == pytest.approx(75.07, abs=0.01)  # glycine
    assert round(proteins.net_charge("KKKK")) == 4
    assert round(proteins.net_charge("DDDD")) == -4
    with pytest.raises(ValueError, match="standard residues"):
        proteins.net_charge("MAB")


def test_generated_charges_are_never_near_a_half_integer():
    rng = random.Random(0)
    for _ in range(50):
        charge = proteins.net_charge(proteins.random_peptide(rng))
        assert abs(charge - round(charge)) <= 0.5 - proteins.AMBIGUOUS_BAND
    assert proteins.is_ambiguous(-0.4996)  # Biopython's charge of M-A-F


@pytest.mark.parametrize("task", proteins.TASKS, ids=lambda t: t.name)
def test_ground_truth_verifies_and_garbage_does_not(task):
    rng = random.Random(0)
    for _ in range(20):
        example = task.sample(rng)
        assert example["prompt"].endswith("?")
        assert task.verify(example, example["completion"]), example
        assert not task.verify(example, "I do not know")


def test_net_charge_is_exact():
    task = get_task("proteins", "net_charge")
    example = {"domain": "proteins", "task": "net_charge", "answer": 2}
    assert task.verify(example, "+2")
    assert task.verify(example, "2")
    assert not task.verify(example, "-2")
    assert not task.verify(example, "+1")


def test_molecular_weight_tolerance_is_one_dalton():
    task = get_task("proteins", "molecular_weight")
    example = {"domain": "proteins", "task": "molecular_weight", "answer": 621.69}
    assert task.verify(example, "622")
    assert not task.verify(example, "624")


def test_design_peptide_accepts_any_valid_design():
    task = get_task("proteins", "design_peptide")
    answer = {"length": 6, "first": "K", "charge": 2}
    example = {"domain": "proteins", "task": "design_peptide", "answer": answer}
    assert task.verify(example, "K-K-G-G-G-G")
    assert task.verify(example, "K-R-A-S-T-G")  # another valid design
    assert not task.verify(example, "K-K-G-G-G")  # 5 residues
    assert not task.verify(example, "G-K-K-G-G-G")  # does not start with K
    assert not task.verify(example, "K-D-G-G-G-G")  # charge 0
