"""Bio-inspired materials: cellular solids and composites, every quantity through pint.

    foam_modulus     "What is the Young's modulus in MPa of an open-cell foam of relative
                      density 0.1 made of a solid with a modulus of 2 GPa?"        -> "20.0"
    foam_strength    "What is the collapse strength in MPa of an open-cell foam of relative
                      density 0.2 made of a solid with a yield strength of 300 MPa?" -> "8.0"
    mixture_modulus  "What is the Young's modulus in GPa along the fibres of a composite of 40%
                      fibres of 200 GPa in a matrix of 3 GPa?"                      -> "81.8"
    nacre_modulus    "What is the Young's modulus in GPa of a nacre-like composite of 90%
                      platelets of 100 GPa with aspect ratio 10 in a protein of shear modulus
                      1 GPa?"                                                       -> "..."
    design_density   "Which relative density gives an open-cell foam of a solid of 2 GPa a
                      modulus between 10 and 30 MPa?"                               -> "0.1"
                     (any relative density in (0, 1] whose foam modulus is in range is right)
    design_fraction  "Which fibre volume fraction in % gives a composite of fibres of 200 GPa
                      in a matrix of 3 GPa a modulus between 50 and 70 GPa along the fibres?"
                                                                                    -> "30"

Models (Gibson & Ashby, Cellular Solids, 1997; Gao et al., PNAS 2003):

    open-cell foam modulus    E* = E_s (rho*/rho_s)^2
    open-cell foam strength   sigma* = 0.3 sigma_ys (rho*/rho_s)^(3/2)
    rule of mixtures (Voigt)  E = f E_f + (1 - f) E_m
    tension-shear chain       1/E = 4 (1 - f) / (G_p f^2 s^2) + 1 / (f E_m)   (platelet
                              volume fraction f, aspect ratio s, mineral modulus E_m,
                              protein shear modulus G_p)

Answers have 3 significant digits and are read within 1%; each input is drawn from a short
list so that questions stay short.
"""

from __future__ import annotations

import random
from typing import Any

from loramix.science.formats import format_plain, format_significant, parse_number
from loramix.science.mechanics import quantity
from loramix.science.task import Task, close

DOMAIN = "bioinspired"
DENSITIES = tuple(round(0.01 * k, 2) for k in range(1, 31))
SOLID_MODULI_GPA = (0.5, 1, 2, 3, 4, 5, 10, 20, 50, 70, 100, 200)
YIELD_MPA = (30, 50, 80, 100, 150, 200, 250, 300, 400, 500)
FIBRE_GPA = (70, 100, 150, 200, 230, 400)
MATRIX_GPA = (1, 2, 3, 4, 5)
FRACTIONS_PERCENT = tuple(range(10, 75, 5))
PLATELET_PERCENT = (75, 80, 85, 90, 95)
ASPECT_RATIOS = (5, 8, 10, 12, 15, 20, 25, 30)
MINERAL_GPA = (50, 70, 100)
PROTEIN_SHEAR_GPA = (0.5, 1, 1.5, 2)
REL_TOL = 0.01
DIGITS = 3  # significant digits of the answers (1% tolerance)
GIBSON_ASHBY_STRENGTH = 0.3  # the constant C2 of open-cell foams


def foam_modulus_mpa(density: float, solid_gpa: float) -> float:
    """Gibson-Ashby E* = E_s (rho*/rho_s)^2, in MPa."""
    return float((quantity(solid_gpa, "GPa") * density**2).to("MPa").magnitude)


def foam_strength_mpa(density: float, yield_mpa: float) -> float:
    """Gibson-Ashby sigma* = 0.3 sigma_ys (rho*/rho_s)^1.5, in MPa."""
    strength = GIBSON_ASHBY_STRENGTH * quantity(yield_mpa, "MPa") * density**1.5
    return float(strength.to("MPa").magnitude)


def mixture_modulus_gpa(fraction_percent: float, fibre_gpa: float, matrix_gpa: float) -> float:
    """Voigt rule of mixtures E = f E_f + (1 - f) E_m, in GPa."""
    f = float(quantity(fraction_percent, "percent").to("dimensionless").magnitude)
    modulus = f * quantity(fibre_gpa, "GPa") + (1 - f) * quantity(matrix_gpa, "GPa")
    return float(modulus.to("GPa").magnitude)


def nacre_modulus_gpa(
    platelet_percent: float, aspect_ratio: float, mineral_gpa: float, protein_shear_gpa: float
) -> float:
    """Tension-shear chain model of a staggered platelet composite (Gao et al. 2003), in GPa."""
    f = float(quantity(platelet_percent, "percent").to("dimensionless").magnitude)
    shear, mineral = quantity(protein_shear_gpa, "GPa"), quantity(mineral_gpa, "GPa")
    compliance = 4 * (1 - f) / (shear * f**2 * aspect_ratio**2) + 1 / (f * mineral)
    return float((1 / compliance).to("GPa").magnitude)


def _check_number(answer: float, generated: str) -> bool:
    return close(parse_number(generated), answer, rel_tol=REL_TOL)


def _gen_foam_modulus(rng: random.Random) -> tuple[str, str, float]:
    density, solid = rng.choice(DENSITIES), rng.choice(SOLID_MODULI_GPA)
    value = foam_modulus_mpa(density, solid)
    prompt = (
        f"What is the Young's modulus in MPa of an open-cell foam of relative density "
        f"{format_plain(density)} made of a solid with a modulus of {format_plain(solid)} GPa?"
    )
    return prompt, format_significant(value, DIGITS), value


def _gen_foam_strength(rng: random.Random) -> tuple[str, str, float]:
    density, strength = rng.choice(DENSITIES), rng.choice(YIELD_MPA)
    value = foam_strength_mpa(density, strength)
    prompt = (
        f"What is the collapse strength in MPa of an open-cell foam of relative density "
        f"{format_plain(density)} made of a solid with a yield strength of {strength} MPa?"
    )
    return prompt, format_significant(value, DIGITS), value


def _gen_mixture_modulus(rng: random.Random) -> tuple[str, str, float]:
    fraction = rng.choice(FRACTIONS_PERCENT)
    fibre, matrix = rng.choice(FIBRE_GPA), rng.choice(MATRIX_GPA)
    value = mixture_modulus_gpa(fraction, fibre, matrix)
    prompt = (
        f"What is the Young's modulus in GPa along the fibres of a composite of {fraction}% "
        f"fibres of {fibre} GPa in a matrix of {matrix} GPa?"
    )
    return prompt, format_significant(value, DIGITS), value


def _gen_nacre_modulus(rng: random.Random) -> tuple[str, str, float]:
    platelets, ratio = rng.choice(PLATELET_PERCENT), rng.choice(ASPECT_RATIOS)
    mineral, shear = rng.choice(MINERAL_GPA), rng.choice(PROTEIN_SHEAR_GPA)
    value = nacre_modulus_gpa(platelets, ratio, mineral, shear)
    prompt = (
        f"What is the Young's modulus in GPa of a nacre-like composite of {platelets}% "
        f"platelets of {mineral} GPa with aspect ratio {ratio} in a protein of shear modulus "
        f"{format_plain(shear)} GPa?"
    )
    return prompt, format_significant(value, DIGITS), value


def _gen_design_density(rng: random.Random) -> tuple[str, str, dict[str, Any]]:
    density, solid = rng.choice(DENSITIES), rng.choice(SOLID_MODULI_GPA)
    modulus = foam_modulus_mpa(density, solid)
    low, high = float(f"{modulus * 0.7:.2g}"), float(f"{modulus * 1.4:.2g}")  # holds `modulus`
    prompt = (
        f"Which relative density gives an open-cell foam of a solid of {format_plain(solid)} GPa "
        f"a modulus between {format_plain(low)} and {format_plain(high)} MPa?"
    )
    answer = {"solid_gpa": solid, "low_mpa": low, "high_mpa": high, "example": density}
    return prompt, format_plain(density), answer


def _check_design_density(answer: dict[str, Any], generated: str) -> bool:
    density = parse_number(generated)
    if not 0 < density <= 1:
        return False
    modulus = foam_modulus_mpa(density, answer["solid_gpa"])
    return answer["low_mpa"] <= modulus <= answer["high_mpa"]


def _gen_design_fraction(rng: random.Random) -> tuple[str, str, dict[str, Any]]:
    fraction = rng.choice(FRACTIONS_PERCENT)
    fibre, matrix = rng.choice(FIBRE_GPA), rng.choice(MATRIX_GPA)
    modulus = mixture_modulus_gpa(fraction, fibre, matrix)
    low = 5 * int(modulus // 5 - rng.randint(0, 2))  # a multiple of 5 GPa below `modulus`
    high = low + 15
    prompt = (
        f"Which fibre volume fraction in % gives a composite of fibres of {fibre} GPa in a "
        f"matrix of {matrix} GPa a modulus between {low} and {high} GPa along the fibres?"
    )
    answer = {
        "fibre_gpa": fibre,
        "matrix_gpa": matrix,
        "low_gpa": low,
        "high_gpa": high,
        "example": fraction,
    }
    return prompt, str(fraction), answer


def _check_design_fraction(answer: dict[str, Any], generated: str) -> bool:
    fraction = parse_number(generated)
    if not 0 <= fraction <= 100:
        return False
    modulus = mixture_modulus_gpa(fraction, answer["fibre_gpa"], answer["matrix_gpa"])
    return answer["low_gpa"] <= modulus <= answer["high_gpa"]


TASKS: tuple[Task, ...] = (
    Task(DOMAIN, "foam_modulus", _gen_foam_modulus, _check_number),
    Task(DOMAIN, "foam_strength", _gen_foam_strength, _check_number),
    Task(DOMAIN, "mixture_modulus", _gen_mixture_modulus, _check_number),
    Task(DOMAIN, "nacre_modulus", _gen_nacre_modulus, _check_number),
    Task(DOMAIN, "design_density", _gen_design_density, _check_design_density),
    Task(DOMAIN, "design_fraction", _gen_design_fraction, _check_design_fraction),
)
