"""Protein biophysics: net charge and molecular weight of peptides, and charge design (ProtParam).

    net_charge        "What is the net charge at pH 7 of the peptide K-R-D-G?"     -> "+1"
    molecular_weight  "What is the molecular weight in Da of the peptide M-A-F-K?" -> "495"
    design_peptide    "Which peptide of 6 residues starting with K has a net charge of +2 at
                       pH 7?"                                                     -> "K-K-G-A-S-G"
                      (any such 6-residue peptide whose rounded charge is +2 is right)

All values come from Biopython's `ProteinAnalysis`: the net charge is `charge_at_pH(7.0)`
rounded to the nearest integer, the weight is the average mass in Da rounded to an integer.
Generated peptides (4-8 residues) whose charge lies within `AMBIGUOUS_BAND` of a half-integer
are redrawn, so that no reference answer hangs on a rounding coin toss, and target charges are
drawn uniformly from `CHARGES` (random peptides are mostly neutral).
"""

from __future__ import annotations

import random
from typing import Any

from loramix.science.formats import (
    format_peptide,
    format_signed,
    parse_int,
    parse_number,
    parse_peptide,
)
from loramix.science.task import Task, close, require

DOMAIN = "proteins"
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
MIN_RESIDUES, MAX_RESIDUES = 4, 8
PH = 7.0
AMBIGUOUS_BAND = 0.1  # redraw when |charge - (k + 0.5)| < this
CHARGES = (-2, -1, 0, 1, 2)  # targets drawn uniformly, so no answer is a safe guess
WEIGHT_ABS_TOL = 1.0  # Da


def net_charge(sequence: str) -> float:
    """Biopython's net charge of a peptide at pH 7 (unrounded)."""
    return float(_analysis(sequence).charge_at_pH(PH))


def molecular_weight(sequence: str) -> float:
    """Biopython's average molecular weight of a peptide in Da."""
    return float(_analysis(sequence).molecular_weight())


def is_ambiguous(charge: float) -> bool:
    """Whether a charge lies so close to a half-integer that rounding it is a coin toss."""
    return abs(charge - (charge // 1 + 0.5)) < AMBIGUOUS_BAND


def random_peptide(rng: random.Random, charge: int | None = None) -> str:
    """A random 4-8 residue peptide whose charge rounds unambiguously (to `charge` if given)."""
    while True:
        n = rng.randint(MIN_RESIDUES, MAX_RESIDUES)
        sequence = "".join(rng.choice(AMINO_ACIDS) for _ in range(n))
        value = net_charge(sequence)
        if not is_ambiguous(value) and (charge is None or round(value) == charge):
            return sequence


def _analysis(sequence: str) -> Any:
    if not sequence or set(sequence) - set(AMINO_ACIDS):
        raise ValueError(f"not a peptide of the 20 standard residues: {sequence!r}")
    return require("Bio.SeqUtils.ProtParam").ProteinAnalysis(sequence)


def _gen_net_charge(rng: random.Random) -> tuple[str, str, int]:
    charge = rng.choice(CHARGES)
    sequence = random_peptide(rng, charge)
    prompt = f"What is the net charge at pH 7 of the peptide {format_peptide(sequence)}?"
    return prompt, format_signed(charge), charge


def _check_net_charge(answer: int, generated: str) -> bool:
    return parse_int(generated) == answer


def _gen_molecular_weight(rng: random.Random) -> tuple[str, str, float]:
    sequence = random_peptide(rng)
    weight = molecular_weight(sequence)
    prompt = f"What is the molecular weight in Da of the peptide {format_peptide(sequence)}?"
    return prompt, str(round(weight)), weight


def _check_molecular_weight(answer: float, generated: str) -> bool:
    return close(parse_number(generated), answer, abs_tol=WEIGHT_ABS_TOL)


def _gen_design_peptide(rng: random.Random) -> tuple[str, str, dict[str, Any]]:
    charge = rng.choice(CHARGES)
    sequence = random_peptide(rng, charge)
    n, first = len(sequence), sequence[0]
    prompt = (
        f"Which peptide of {n} residues starting with {first} has a net charge of "
        f"{format_signed(charge)} at pH 7?"
    )
    answer = {"length": n, "first": first, "charge": charge, "example": sequence}
    return prompt, format_peptide(sequence), answer


def _check_design_peptide(answer: dict[str, Any], generated: str) -> bool:
    sequence = parse_peptide(generated)
    if len(sequence) != answer["length"] or sequence[0] != answer["first"]:
        return False
    return round(net_charge(sequence)) == answer["charge"]


TASKS: tuple[Task, ...] = (
    Task(DOMAIN, "net_charge", _gen_net_charge, _check_net_charge),
    Task(DOMAIN, "molecular_weight", _gen_molecular_weight, _check_molecular_weight),
    Task(DOMAIN, "design_peptide", _gen_design_peptide, _check_design_peptide),
)
