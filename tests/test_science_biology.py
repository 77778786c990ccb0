"""Biology tasks: translation, reverse complement and DNA design, cross-checked with Biopython."""

from __future__ import annotations

import random

import pytest

pytest.importorskip("Bio", reason="science extra not installed: pip install 'loramix[science]'")

from loramix.science import biology  # noqa: E402
from loramix.science.registry import get_task  # noqa: E402


def test_library_cross_checks():
    assert biology.translate("ATGGCCTTT") == "MAF"
    assert biology.translate("ATGTGGTAA") == "MW*"
    assert biology.reverse_complement("ATGGCC") == "GGCCAT"
    assert len(biology.sense_codons()) == 61
    assert biology.synonymous_codons()["M"] == ("ATG",)


@pytest.mark.parametrize("task", biology.TASKS, ids=lambda t: t.name)
def test_ground_truth_verifies_and_garbage_does_not(task):
    rng = random.Random(0)
    for _ in range(20):
        example = task.sample(rng)
        assert example["prompt"].endswith("?")
        assert task.verify(example, example["completion"]), example
        assert task.verify(example, example["completion"] + "\nmore text")
        assert not task.verify(example, "I do not know")


def test_translate_is_exact():
    task = get_task("biology", "translate")
    example = {"domain": "biology", "task": "translate", "answer": "MAF"}
    assert task.verify(example, "M-A-F")
    assert not task.verify(example, "M-A-L")
    assert not task.verify(example, "M-A-F-K")


def test_reverse_complement_is_exact():
    task = get_task("biology", "reverse_complement")
    example = {"domain": "biology", "task": "reverse_complement", "answer": "AAAGGCCAT"}
    assert task.verify(example, "AAA GGC CAT")
    assert not task.verify(example, "ATG GCC TTT")


def test_design_dna_accepts_any_valid_design():
    task = get_task("biology", "design_dna")
    example = {"domain": "biology", "task": "design_dna", "answer": {"peptide": "MAF"}}
    assert task.verify(example, "ATG GCC TTT")
    assert task.verify(example, "ATG GCT TTC")  # synonymous codons
    assert not task.verify(example, "ATG GCC TTA")  # M-A-L
    assert not task.verify(example, "ATG GCC TT")  # partial codon
    assert not task.verify(example, "ATG GCC TTT TAA")  # extra stop codon
