"""Cross-domain questions that chain two domains' skills; held out from all expert training.

    translate_charge   "The DNA codons AAA GAT CGT encode a peptide. What is its net charge
                        at pH 7?"                                     -> "+1"   (biology+proteins)
    translate_weight   "... What is its molecular weight in Da?"
                                                           -> "389"      (biology+proteins)
    design_dna_charge  "Which 4 DNA codons encode a peptide that starts with K and has a net
                        charge of +2 at pH 7?"
                                                           -> "AAA CGT GGC TTT"
                        (any DNA whose translation has that rounded charge is right)
    moles_mass         "What is the mass of 3 mol of C2 H6 O, with units?"
                                                           -> "138.2 g"  (chemistry+units)
    moles_weight       "What is the weight in N of 40 mol of C6 H12 O6 under standard gravity?"
                                                           -> "70.7"     (chemistry+mechanics)
    smiles_mass        "What is the molar mass in g/mol of the molecule C C O?"
                                                           -> "46.1"     (quantum+chemistry:
                        read the SMILES with its hydrogens, then weigh the formula)
    foam_stress        "What is the stress in MPa in an open-cell foam of relative density 0.1
                        made of a solid of 2 GPa at a strain of 1%?"
                                                           -> "0.2"  (bioinspired+mechanics:
                        Gibson-Ashby modulus, then Hooke's law)

`NEEDS` names the expert domains each task draws on; `write_datasets` keeps only the tasks
whose domains are all among those written (so a 4-domain run gets the first five).

Answers with units are read back with pint, so "0.1382 kg" is as right as "138.2 g".
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any

from loramix.science import bioinspired, biology, chemistry, mechanics, proteins, quantum
from loramix.science.formats import (
    answer_text,
    format_codons,
    format_fixed,
    format_formula,
    format_plain,
    format_signed,
    format_significant,
    format_smiles,
    parse_dna,
    parse_int,
    parse_number,
)
from loramix.science.task import Task, close, require

DOMAIN = "composite"
MASS_REL_TOL = 0.005
WEIGHT_REL_TOL = 0.01
WEIGHT_ABS_TOL = 0.05  # N: half the last printed decimal
_QUANTITY = re.compile(r"([+-]?\d+(?:\.\d+)?)\s*([A-Za-z/]+)")


def _coding_dna_with_charge(rng: random.Random, charge: int) -> tuple[str, str]:
    """Random coding DNA whose peptide's charge rounds unambiguously to `charge`."""
    while True:
        dna = biology.random_coding_dna(rng)
        peptide = biology.translate(dna)
        value = proteins.net_charge(peptide)
        if not proteins.is_ambiguous(value) and round(value) == charge:
            return dna, peptide


def _gen_translate_charge(rng: random.Random) -> tuple[str, str, int]:
    charge = rng.choice(proteins.CHARGES)
    dna, peptide = _coding_dna_with_charge(rng, charge)
    prompt = (
        f"The DNA codons {format_codons(dna)} encode a peptide. What is its net charge at pH 7?"
    )
    return prompt, format_signed(charge), charge


def _check_int(answer: int, generated: str) -> bool:
    return parse_int(generated) == answer


def _gen_translate_weight(rng: random.Random) -> tuple[str, str, float]:
    dna = biology.random_coding_dna(rng)
    weight = proteins.molecular_weight(biology.translate(dna))
    prompt = (
        f"The DNA codons {format_codons(dna)} encode a peptide. What is its molecular weight in Da?"
    )
    return prompt, str(round(weight)), weight


def _check_weight(answer: float, generated: str) -> bool:
    return close(parse_number(generated), answer, abs_tol=proteins.WEIGHT_ABS_TOL)


def _gen_design_dna_charge(rng: random.Random) -> tuple[str, str, dict[str, Any]]:
    charge = rng.choice(proteins.CHARGES)
    dna, peptide = _coding_dna_with_charge(rng, charge)
    n = len(dna) // 3
    prompt = (
        f"Which {n} DNA codons encode a peptide that starts with {peptide[0]} and has a net "
        f"charge of {format_signed(charge)} at pH 7?"
    )
    answer = {"codons": n, "first": peptide[0], "charge": charge, "example": dna}
    return prompt, format_codons(dna), answer


def _check_design_dna_charge(answer: dict[str, Any], generated: str) -> bool:
    dna = parse_dna(generated)
    if len(dna) != 3 * answer["codons"]:
        return False
    peptide = biology.translate(dna)
    if "*" in peptide or peptide[0] != answer["first"]:
        return False
    return round(proteins.net_charge(peptide)) == answer["charge"]


def _gen_moles_mass(rng: random.Random) -> tuple[str, str, dict[str, Any]]:
    counts, moles = chemistry.random_formula(rng), rng.randint(2, 9)
    mass = (
        (
            mechanics.quantity(moles, "mol")
            * mechanics.quantity(chemistry.molar_mass(counts), "g/mol")
        )
        .to("g")
        .magnitude
    )
    prompt = f"What is the mass of {moles} mol of {format_formula(counts)}, with units?"
    return prompt, f"{format_fixed(mass, 1)} g", {"value": float(mass), "unit": "g"}


def _check_moles_mass(answer: dict[str, Any], generated: str) -> bool:
    match = _QUANTITY.search(answer_text(generated))
    if match is None:
        return False
    value = mechanics.quantity(float(match.group(1)), match.group(2)).to(answer["unit"])
    return close(float(value.magnitude), answer["value"], rel_tol=MASS_REL_TOL)


def _gen_moles_weight(rng: random.Random) -> tuple[str, str, float]:
    counts, moles = chemistry.random_formula(rng), 10 * rng.randint(1, 10)
    mass = mechanics.quantity(moles, "mol") * mechanics.quantity(
        chemistry.molar_mass(counts), "g/mol"
    )
    weight = float((mass * mechanics.quantity(1, "standard_gravity")).to("N").magnitude)
    prompt = (
        f"What is the weight in N of {moles} mol of {format_formula(counts)} "
        "under standard gravity?"
    )
    return prompt, format_fixed(weight, 1), weight


def _check_moles_weight(answer: float, generated: str) -> bool:
    return close(parse_number(generated), answer, abs_tol=WEIGHT_ABS_TOL, rel_tol=WEIGHT_REL_TOL)


def formula_of_smiles(smiles: str) -> dict[str, int]:
    """RDKit's molecular formula of a SMILES, hydrogens included, in Hill order."""
    chem = require("rdkit.Chem")
    mol = chem.AddHs(quantum.read_smiles(smiles))
    counts: dict[str, int] = {}
    for atom in mol.GetAtoms():
        counts[atom.GetSymbol()] = counts.get(atom.GetSymbol(), 0) + 1
    return chemistry.hill_order(counts)


def _gen_smiles_mass(rng: random.Random) -> tuple[str, str, float]:
    smiles = rng.choice(quantum.molecules()).smiles
    mass = chemistry.molar_mass(formula_of_smiles(smiles))
    prompt = f"What is the molar mass in g/mol of the molecule {format_smiles(smiles)}?"
    return prompt, format_fixed(mass, chemistry.MASS_DECIMALS), mass


def _check_smiles_mass(answer: float, generated: str) -> bool:
    return close(parse_number(generated), answer, abs_tol=chemistry.MASS_ABS_TOL)


def _gen_foam_stress(rng: random.Random) -> tuple[str, str, float]:
    density, solid = rng.choice(bioinspired.DENSITIES), rng.choice(bioinspired.SOLID_MODULI_GPA)
    strain = rng.choice(mechanics.STRAINS_PERCENT)
    modulus = mechanics.quantity(bioinspired.foam_modulus_mpa(density, solid), "MPa")
    stress = float((modulus * mechanics.quantity(strain, "percent")).to("MPa").magnitude)
    prompt = (
        f"What is the stress in MPa in an open-cell foam of relative density "
        f"{format_plain(density)} made of a solid of {format_plain(solid)} GPa at a strain of "
        f"{format_plain(strain)}%?"
    )
    return prompt, format_significant(stress, bioinspired.DIGITS), stress


def _check_foam_stress(answer: float, generated: str) -> bool:
    return close(parse_number(generated), answer, rel_tol=bioinspired.REL_TOL)


TASKS: tuple[Task, ...] = (
    Task(DOMAIN, "translate_charge", _gen_translate_charge, _check_int),
    Task(DOMAIN, "translate_weight", _gen_translate_weight, _check_weight),
    Task(DOMAIN, "design_dna_charge", _gen_design_dna_charge, _check_design_dna_charge),
    Task(DOMAIN, "moles_mass", _gen_moles_mass, _check_moles_mass),
    Task(DOMAIN, "moles_weight", _gen_moles_weight, _check_moles_weight),
    Task(DOMAIN, "smiles_mass", _gen_smiles_mass, _check_smiles_mass),
    Task(DOMAIN, "foam_stress", _gen_foam_stress, _check_foam_stress),
)

NEEDS: dict[str, tuple[str, ...]] = {
    "translate_charge": ("biology", "proteins"),
    "translate_weight": ("biology", "proteins"),
    "design_dna_charge": ("biology", "proteins"),
    "moles_mass": ("chemistry", "mechanics"),
    "moles_weight": ("chemistry", "mechanics"),
    "smiles_mass": ("quantum", "chemistry"),
    "foam_stress": ("bioinspired", "mechanics"),
}
"""Composite task -> the expert domains whose skills it chains."""


def tasks_for(domains: Sequence[str]) -> tuple[Task, ...]:
    """The composite tasks whose `NEEDS` are all in `domains`, in `TASKS` order."""
    return tuple(t for t in TASKS if set(NEEDS[t.name]) <= set(domains))
