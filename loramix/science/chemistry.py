"""Chemistry: molar mass and atom counts of small formulas, and formula design (periodictable).

    molar_mass      "What is the molar mass in g/mol of C2 H6 O?"          -> "46.1"
    atom_count      "How many atoms are in one molecule of C2 H6 O?"       -> "9"
    design_formula  "Which formula made of C, H and O has a molar mass between 40 and 50 g/mol?"
                                                                           -> "C2 H6 O"
                    (any formula of exactly those elements in that range is right)

Formulas have 1-6 carbons and up to two of O, N, S, Cl, written in Hill order with a space
between elements. Masses are periodictable's (IUPAC standard atomic weights).
"""

from __future__ import annotations

import random
from typing import Any

from loramix.science.formats import (
    format_fixed,
    format_formula,
    parse_formula,
    parse_int,
    parse_number,
)
from loramix.science.task import Task, close, require

DOMAIN = "chemistry"
HETEROATOMS = {"O": (1, 3), "N": (1, 2), "S": (1, 1), "Cl": (1, 2)}  # symbol -> count range
DESIGN_ELEMENTS = (("C", "H", "O"), ("C", "H", "N"), ("C", "H", "N", "O"), ("C", "H", "Cl"))
MASS_DECIMALS = 1
MASS_ABS_TOL = 0.1  # g/mol: right to the first decimal, up to rounding
DESIGN_WIDTHS = (5, 10)  # g/mol, widths of the design range


def molar_mass(counts: dict[str, int]) -> float:
    """periodictable's molar mass in g/mol: {"H": 2, "O": 1} -> 18.015."""
    return float(_formula(counts).mass)


def atom_count(counts: dict[str, int]) -> int:
    """Atoms in one molecule, as periodictable counts them."""
    return int(sum(_formula(counts).atoms.values()))


def hill_order(counts: dict[str, int]) -> dict[str, int]:
    """C first, then H, then the other elements alphabetically (as in "C2 H5 Cl O")."""
    rest = sorted(el for el in counts if el not in ("C", "H"))
    return {el: counts[el] for el in ("C", "H", *rest) if el in counts}


def random_formula(rng: random.Random, heteroatoms: tuple[str, ...] | None = None) -> dict:
    """A small formula in Hill order: 1-6 C, some H, and heteroatoms.

    Args:
        rng: The random source.
        heteroatoms: Exactly these heteroatoms (each at least once); None draws up to two.
    """
    carbons = rng.randint(1, 6)
    if heteroatoms is None:
        heteroatoms = tuple(sorted(rng.sample(sorted(HETEROATOMS), rng.randint(0, 2))))
    counts = {"C": carbons, "H": rng.randint(1, 2 * carbons + 2)}
    for el in heteroatoms:
        counts[el] = rng.randint(*HETEROATOMS[el])
    return hill_order(counts)


def _formula(counts: dict[str, int]) -> Any:
    if not counts or any(n <= 0 for n in counts.values()):
        raise ValueError(f"not a formula: {counts}")
    return require("periodictable").formula("".join(f"{el}{n}" for el, n in counts.items()))


def _gen_molar_mass(rng: random.Random) -> tuple[str, str, float]:
    counts = random_formula(rng)
    mass = molar_mass(counts)
    prompt = f"What is the molar mass in g/mol of {format_formula(counts)}?"
    return prompt, format_fixed(mass, MASS_DECIMALS), mass


def _check_molar_mass(answer: float, generated: str) -> bool:
    return close(parse_number(generated), answer, abs_tol=MASS_ABS_TOL)


def _gen_atom_count(rng: random.Random) -> tuple[str, str, int]:
    counts = random_formula(rng)
    atoms = atom_count(counts)
    prompt = f"How many atoms are in one molecule of {format_formula(counts)}?"
    return prompt, str(atoms), atoms


def _check_atom_count(answer: int, generated: str) -> bool:
    return parse_int(generated) == answer


def _gen_design_formula(rng: random.Random) -> tuple[str, str, dict[str, Any]]:
    elements = rng.choice(DESIGN_ELEMENTS)
    counts = random_formula(rng, heteroatoms=elements[2:])
    mass = molar_mass(counts)
    width = rng.choice(DESIGN_WIDTHS)
    low = int(mass) - rng.randint(0, width - 1)  # an integer range that holds `mass`
    high = low + width
    names = f"{', '.join(elements[:-1])} and {elements[-1]}"
    prompt = f"Which formula made of {names} has a molar mass between {low} and {high} g/mol?"
    answer = {"elements": list(elements), "low": low, "high": high, "example": counts}
    return prompt, format_formula(counts), answer


def _check_design_formula(answer: dict[str, Any], generated: str) -> bool:
    counts = parse_formula(generated)
    if set(counts) != set(answer["elements"]):
        return False
    return answer["low"] <= molar_mass(counts) <= answer["high"]


TASKS: tuple[Task, ...] = (
    Task(DOMAIN, "molar_mass", _gen_molar_mass, _check_molar_mass),
    Task(DOMAIN, "atom_count", _gen_atom_count, _check_atom_count),
    Task(DOMAIN, "design_formula", _gen_design_formula, _check_design_formula),
)
