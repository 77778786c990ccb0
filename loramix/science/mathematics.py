"""Mathematics: derivatives, linear equations, expansion, and polynomial design (SymPy).

    derivative        "What is the derivative with respect to x of 3*x^2 - 5*x + 1?" -> "6*x - 5"
    solve_linear      "What value of x solves 3*x + 5 = x - 2?"                       -> "-7/2"
    expand            "What is (x + 2)*(2*x - 3) expanded?"                     -> "2*x^2 + x - 6"
    design_quadratic  "Which quadratic in x with integer coefficients has the roots 2 and -3?"
                                                                                -> "x^2 + x - 6"
                      (any such quadratic, e.g. "2*x^2 + 2*x - 12", is right)

Expressions are written as SymPy prints them with `^` for powers (one token per symbol, digit
and operator). Answers are exact: SymPy parses the generated expression and checks that it
equals the reference (`expand` also requires an expanded polynomial, so that repeating the
question's product is wrong). Only the characters of a polynomial in x are parsed, so no
generated text reaches SymPy's parser otherwise.
"""

from __future__ import annotations

import random
import re
from functools import cache
from typing import Any

from loramix.science.formats import answer_text
from loramix.science.task import Task, require

DOMAIN = "mathematics"
COEFFICIENTS = tuple(c for c in range(-9, 10) if c)
ROOTS = range(-20, 21)  # 820 pairs: enough distinct questions for 1200 examples
_EXPRESSION = re.compile(r"[-+*/^().\dx ]+")


@cache
def symbol() -> Any:
    """SymPy's symbol x."""
    return require("sympy").Symbol("x")


def to_text(expr: Any) -> str:
    """SymPy's printed form with `^` powers: 3*x**2 - 5 -> "3*x^2 - 5"."""
    return str(expr).replace("**", "^")


def parse_expression(generated: str) -> Any:
    """The SymPy expression at the start of the answer line ("6*x - 5 is it" -> 6*x - 5).

    Raises:
        ValueError: If the line does not start with a polynomial expression in x.
    """
    match = _EXPRESSION.match(answer_text(generated))
    text = match.group().strip() if match else ""
    if not text:
        raise ValueError(f"no expression in x at the start of {generated!r}")
    parser = require("sympy.parsing.sympy_parser")
    transformations = (
        *parser.standard_transformations,
        parser.implicit_multiplication,
        parser.convert_xor,
    )
    try:
        return parser.parse_expr(text, local_dict={"x": symbol()}, transformations=transformations)
    except (SyntaxError, TypeError, ValueError, ZeroDivisionError) as err:
        raise ValueError(f"SymPy cannot read {text!r}: {err}") from err


def equal(a: Any, b: Any) -> bool:
    """Whether SymPy simplifies a - b to 0."""
    return bool(require("sympy").simplify(a - b) == 0)


def random_polynomial(rng: random.Random, terms: int) -> Any:
    """A sum of `terms` terms c*x^k with distinct powers 0-4 and nonzero coefficients."""
    powers = rng.sample(range(5), terms)
    return sum(rng.choice(COEFFICIENTS) * symbol() ** k for k in sorted(powers, reverse=True))


def _gen_derivative(rng: random.Random) -> tuple[str, str, str]:
    while True:
        expr = random_polynomial(rng, rng.randint(2, 3))
        derivative = require("sympy").diff(expr, symbol())
        if derivative != 0:
            break
    prompt = f"What is the derivative with respect to x of {to_text(expr)}?"
    return prompt, to_text(derivative), to_text(derivative)


def _check_equal(answer: str, generated: str) -> bool:
    return equal(parse_expression(generated), parse_expression(answer))


def _gen_solve_linear(rng: random.Random) -> tuple[str, str, str]:
    sympy, x = require("sympy"), symbol()
    while True:
        a, c = rng.choice(COEFFICIENTS), rng.choice(COEFFICIENTS)
        b, d = rng.randint(-20, 20), rng.randint(-20, 20)
        if a != c:
            break
    left, right = a * x + b, c * x + d
    (solution,) = sympy.solve(sympy.Eq(left, right), x)
    prompt = f"What value of x solves {to_text(left)} = {to_text(right)}?"
    return prompt, to_text(solution), to_text(solution)


def _check_solution(answer: str, generated: str) -> bool:
    value = parse_expression(generated)
    return bool(value.is_number) and equal(value, parse_expression(answer))


def _gen_expand(rng: random.Random) -> tuple[str, str, str]:
    x = symbol()
    factors = [rng.choice((1, 1, 2, 3)) * x + rng.choice(COEFFICIENTS) for _ in range(2)]
    expanded = require("sympy").expand(factors[0] * factors[1])
    prompt = f"What is ({to_text(factors[0])})*({to_text(factors[1])}) expanded?"
    return prompt, to_text(expanded), to_text(expanded)


def _check_expand(answer: str, generated: str) -> bool:
    value = parse_expression(generated)
    return value == require("sympy").expand(value) and _check_equal(answer, generated)


def _gen_design_quadratic(rng: random.Random) -> tuple[str, str, dict[str, Any]]:
    sympy, x = require("sympy"), symbol()
    roots = sorted(rng.sample(ROOTS, 2))
    scale = rng.choice((1, 1, 1, 2, 3))
    poly = sympy.expand(scale * (x - roots[0]) * (x - roots[1]))
    prompt = (
        f"Which quadratic in x with integer coefficients has the roots {roots[0]} and {roots[1]}?"
    )
    return prompt, to_text(poly), {"roots": roots, "example": to_text(poly)}


def _check_design_quadratic(answer: dict[str, Any], generated: str) -> bool:
    sympy = require("sympy")
    poly = sympy.Poly(parse_expression(generated), symbol())
    if poly.degree() != 2 or not all(c.is_integer for c in poly.all_coeffs()):
        return False
    found = sympy.roots(poly, multiple=True)
    return all(r.is_integer for r in found) and sorted(int(r) for r in found) == answer["roots"]


TASKS: tuple[Task, ...] = (
    Task(DOMAIN, "derivative", _gen_derivative, _check_equal),
    Task(DOMAIN, "solve_linear", _gen_solve_linear, _check_solution),
    Task(DOMAIN, "expand", _gen_expand, _check_expand),
    Task(DOMAIN, "design_quadratic", _gen_design_quadratic, _check_design_quadratic),
)
