"""Quantum domain: GFN2-xTB gaps and dipoles (tblite) from the shipped table, RDKit design."""

from __future__ import annotations

import random

import pytest

pytest.importorskip("rdkit", reason="science extra not installed: pip install 'loramix[science]'")

from loramix.science import quantum  # noqa: E402
from loramix.science.registry import get_task  # noqa: E402


def _example(task: str, answer):
    return {"domain": "quantum", "task": task, "answer": answer}


def test_table_holds_the_enumerated_molecules():
    table = quantum.molecules()
    assert [m.smiles for m in table] == quantum.enumerate_molecules()
    assert len(table) > 1000
    assert all(m.gap_ev > 0 and m.dipole_debye >= 0 for m in table)


def test_table_rows_are_recomputed_by_tblite():
    pytest.importorskip("tblite", reason="science extra not installed")
    table = quantum.molecules()
    for row in random.Random(0).sample(table, 3):
        again = quantum.compute_properties(row.smiles)
        assert again.smiles == row.smiles
        assert again.gap_ev == pytest.approx(row.gap_ev, abs=0.01)
        assert again.dipole_debye == pytest.approx(row.dipole_debye, abs=0.01)


def test_symmetric_molecules_have_no_dipole():
    pytest.importorskip("tblite", reason="science extra not installed")
    assert quantum.compute_properties("C#C").dipole_debye == pytest.approx(0, abs=0.01)
    water = quantum.compute_properties("O")
    assert 1.5 < water.dipole_debye < 2.6  # experiment 1.85 D; GFN2-xTB close
    assert water.gap_ev > quantum.compute_properties("C=CC=O").gap_ev  # conjugation narrows


@pytest.mark.parametrize("task", quantum.TASKS, ids=lambda t: t.name)
def test_ground_truth_verifies_and_garbage_does_not(task):
    rng = random.Random(0)
    for _ in range(20):
        example = task.sample(rng)
        assert example["prompt"].endswith("?")
        assert task.verify(example, example["completion"]), example
        assert not task.verify(example, "I do not know")


def test_values_are_read_to_a_tenth():
    task = get_task("quantum", "homo_lumo_gap")
    example = _example("homo_lumo_gap", 7.186)
    assert task.verify(example, "7.2")
    assert task.verify(example, "7.19 eV")
    assert not task.verify(example, "7.4")


def test_design_molecule_accepts_any_molecule_rdkit_confirms():
    task = get_task("quantum", "design_molecule")
    example = _example("design_molecule", {"atoms": {"C": 3, "O": 1}, "group": "hydroxyl"})
    assert task.verify(example, "C C C O")  # propan-1-ol
    assert task.verify(example, "CC(C)O")  # propan-2-ol
    assert not task.verify(example, "C C O C")  # an ether, no hydroxyl
    assert not task.verify(example, "C C O")  # two carbons
    assert not task.verify(example, "C C ( C O")  # RDKit cannot read it


def test_heavy_atoms_and_groups_come_from_rdkit():
    assert quantum.heavy_atoms("OC(=O)c1ccccc1Cl") == {"C": 7, "Cl": 1, "O": 2}
    assert quantum.has_group("CC(=O)O", "carboxylic acid")
    assert not quantum.has_group("CCO", "carbonyl")
    with pytest.raises(ValueError, match="RDKit cannot read"):
        quantum.heavy_atoms("C1CC")


def test_same_seed_same_examples():
    for task in quantum.TASKS:
        first = [task.sample(random.Random(9)) for _ in range(3)]
        assert first == [task.sample(random.Random(9)) for _ in range(3)]
