"""Mechanics and materials: stress, Hooke's law, unit conversion and section design (pint).

    stress       "What is the stress in MPa when a force of 12 kN acts on an area of 40 mm^2?"
                                                                        -> "300.0"
    hooke        "What is the stress in MPa in a material with Young's modulus 200 GPa at a
                  strain of 0.15%?"                                     -> "300.0"
    convert      "What is 2.5 kN in N?"                                 -> "2500"
    design_area  "Which cross-sectional area in mm^2 gives a stress between 40 and 60 MPa under
                  a force of 12 kN?"                                    -> "240"
                 (any area whose stress pint computes inside the range is right)

Every quantity is computed with pint; inputs are drawn from short lists so that answers stay
a few digits long.
"""

from __future__ import annotations

import random
from functools import cache
from typing import Any

from loramix.science.formats import format_fixed, format_plain, parse_number
from loramix.science.task import Task, close, require

DOMAIN = "mechanics"
AREAS_MM2 = (10, 20, 25, 40, 50, 80, 100, 125, 200, 250, 400, 500)
MODULI_GPA = tuple(range(5, 301, 5))
STRAINS_PERCENT = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5, 2.0)
MAX_FORCE_KN = 99
# (from unit, to unit, whether to draw values with one decimal)
CONVERSIONS = (
    ("kN", "N", True),
    ("N", "kN", False),
    ("MPa", "kPa", True),
    ("kPa", "MPa", False),
    ("GPa", "MPa", True),
    ("mm", "m", False),
    ("m", "mm", True),
    ("cm", "mm", True),
    ("kg", "g", True),
    ("g", "kg", False),
)
STRESS_DECIMALS = 1
STRESS_REL_TOL = 0.01
CONVERT_REL_TOL = 1e-6


@cache
def units() -> Any:
    """The shared pint `UnitRegistry` (building one takes a while)."""
    return require("pint").UnitRegistry()


def quantity(value: float, unit: str) -> Any:
    """A pint quantity: quantity(12, "kN")."""
    return units().Quantity(value, unit)


def stress_mpa(force_kn: float, area_mm2: float) -> float:
    """sigma = F / A in MPa."""
    return float((quantity(force_kn, "kN") / quantity(area_mm2, "mm**2")).to("MPa").magnitude)


def hooke_stress_mpa(modulus_gpa: float, strain_percent: float) -> float:
    """sigma = E * epsilon in MPa."""
    return float((quantity(modulus_gpa, "GPa") * quantity(strain_percent, "percent")).to("MPa").m)


def convert(value: float, source: str, target: str) -> float:
    """pint's conversion of `value` from unit `source` to unit `target`."""
    return float(quantity(value, source).to(target).magnitude)


def _gen_stress(rng: random.Random) -> tuple[str, str, float]:
    force, area = rng.randint(1, MAX_FORCE_KN), rng.choice(AREAS_MM2)
    stress = stress_mpa(force, area)
    prompt = f"What is the stress in MPa when a force of {force} kN acts on an area of {area} mm^2?"
    return prompt, format_fixed(stress, STRESS_DECIMALS), stress


def _check_stress(answer: float, generated: str) -> bool:
    return close(parse_number(generated), answer, rel_tol=STRESS_REL_TOL)


def _gen_hooke(rng: random.Random) -> tuple[str, str, float]:
    modulus, strain = rng.choice(MODULI_GPA), rng.choice(STRAINS_PERCENT)
    stress = hooke_stress_mpa(modulus, strain)
    prompt = (
        f"What is the stress in MPa in a material with Young's modulus {modulus} GPa "
        f"at a strain of {format_plain(strain)}%?"
    )
    return prompt, format_fixed(stress, STRESS_DECIMALS), stress


def _gen_convert(rng: random.Random) -> tuple[str, str, dict[str, Any]]:
    source, target, decimal = rng.choice(CONVERSIONS)
    value = rng.randint(1, 99) / 10 if decimal else float(rng.randint(1, 999))
    result = convert(value, source, target)
    prompt = f"What is {format_plain(value)} {source} in {target}?"
    return prompt, format_plain(result), {"value": result, "unit": target}


def _check_convert(answer: dict[str, Any], generated: str) -> bool:
    return close(parse_number(generated), answer["value"], rel_tol=CONVERT_REL_TOL)


def _gen_design_area(rng: random.Random) -> tuple[str, str, dict[str, Any]]:
    while True:
        force = rng.randint(1, 60)
        low = 10 * rng.randint(2, 30)
        high = low + low // 2
        area = round(stress_mpa(force, 1) / ((low + high) / 2))  # A = F / sigma_mid
        if area > 0 and low <= stress_mpa(force, area) <= high:
            break
    prompt = (
        f"Which cross-sectional area in mm^2 gives a stress between {low} and {high} MPa "
        f"under a force of {force} kN?"
    )
    answer = {"force_kn": force, "low_mpa": low, "high_mpa": high, "example_mm2": area}
    return prompt, str(area), answer


def _check_design_area(answer: dict[str, Any], generated: str) -> bool:
    area = parse_number(generated)
    return (
        area > 0 and answer["low_mpa"] <= stress_mpa(answer["force_kn"], area) <= answer["high_mpa"]
    )


TASKS: tuple[Task, ...] = (
    Task(DOMAIN, "stress", _gen_stress, _check_stress),
    Task(DOMAIN, "hooke", _gen_hooke, _check_stress),
    Task(DOMAIN, "convert", _gen_convert, _check_convert),
    Task(DOMAIN, "design_area", _gen_design_area, _check_design_area),
)
