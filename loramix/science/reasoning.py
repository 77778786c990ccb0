"""Reasoning: orderings and who-is-where puzzles solved by z3, and ordering design.

    ordering      "Ann, Ben, Cal and Dan stand in a row. Dan is last. Ann is directly left of
                   Ben. Ben is left of Cal. Who stands where, from left to right?"
                                                                        -> "Ann Ben Cal Dan"
    where         "Ann, Ben and Cal live in Rome, Paris and London, one each. Ann does not
                   live in Paris. Cal lives in Rome. Where does Ann live?"     -> "London"
    design_order  "In which order, from left to right, can Ann, Ben, Cal and Dan stand so that
                   Cal is left of Ann and Ben is not first?"            -> "Cal Ann Ben Dan"
                  (any order that z3 finds consistent with the clues is right)

Puzzles are drawn from a hidden solution: random clues true of it are added, each only if it
rules out some of the remaining candidates (no clue is redundant when added), until one
answer is left; then z3 solves the puzzle from the clues alone, and its unique answer (which
must be the hidden one) is the reference. Solutions are sorted, as z3's order of models is
not reproducible.
Design questions keep clues that leave several orders open. Names and cities are one token
each on the SmolLM2 tokenizer, with or without a leading space (an answer starts without).
"""

from __future__ import annotations

import itertools
import random
from typing import Any

from loramix.science.formats import answer_text, format_names, parse_names
from loramix.science.task import Task, require

DOMAIN = "reasoning"
NAMES = ("Ann", "Ben", "Cal", "Dan", "Tom", "Max")
CITIES = ("Rome", "Paris", "London", "Boston", "Chicago")
MIN_PEOPLE, MAX_PEOPLE = 3, 4

Clue = list[Any]
"""[kind, *arguments]: ("left", a, b) a somewhere left of b, ("next", a, b) a directly left of
b, ("at", a, k) a at position k (0 first), ("not_at", a, k); for cities ("in", a, c) and
("not_in", a, c)."""


def _listing(items: list[str]) -> str:
    return f"{', '.join(items[:-1])} and {items[-1]}"


def _position_word(k: int, n: int) -> str:
    return "first" if k == 0 else "last" if k == n - 1 else f"in place {k + 1}"


def clue_text(clue: Clue, n: int) -> str:
    """One clue as a sentence: ["next", "Ann", "Ben"] -> "Ann is directly left of Ben."."""
    kind, a, b = clue
    if kind == "left":
        return f"{a} is left of {b}."
    if kind == "next":
        return f"{a} is directly left of {b}."
    if kind == "at":
        return f"{a} is {_position_word(b, n)}."
    if kind == "not_at":
        return f"{a} is not {_position_word(b, n)}."
    if kind == "in":
        return f"{a} lives in {b}."
    if kind == "not_in":
        return f"{a} does not live in {b}."
    raise ValueError(f"unknown clue kind {kind!r}")


def _order_solver(people: list[str], clues: list[Clue]) -> tuple[Any, dict[str, Any]]:
    """A z3 solver over each person's position (0..n-1, all different) with the clues."""
    z3 = require("z3")
    n = len(people)
    pos = {p: z3.Int(p) for p in people}
    solver = z3.Solver()
    solver.add(z3.Distinct(*pos.values()))
    solver.add(*[z3.And(v >= 0, v < n) for v in pos.values()])
    for clue in clues:
        solver.add(_order_constraint(pos, clue))
    return solver, pos


def _order_constraint(pos: dict[str, Any], clue: Clue) -> Any:
    kind, a, b = clue
    if kind == "left":
        return pos[a] < pos[b]
    if kind == "next":
        return pos[a] + 1 == pos[b]
    if kind == "at":
        return pos[a] == b
    if kind == "not_at":
        return pos[a] != b
    raise ValueError(f"not an ordering clue: {kind!r}")


def solve_order(people: list[str], clues: list[Clue], limit: int = 1000) -> list[list[str]]:
    """Up to `limit` orders (left to right) consistent with the clues, as z3 finds them."""
    z3 = require("z3")
    solver, pos = _order_solver(people, clues)
    orders = []
    while len(orders) < limit and solver.check() == z3.sat:
        model = solver.model()
        places = {p: model[v].as_long() for p, v in pos.items()}
        orders.append(sorted(people, key=places.__getitem__))
        solver.add(z3.Or(*[v != places[p] for p, v in pos.items()]))
    return sorted(orders)  # z3's order of models is not reproducible


def satisfies(people: list[str], clues: list[Clue], order: list[str]) -> bool:
    """Whether z3 finds `order` (a permutation of `people`) consistent with the clues."""
    if sorted(order) != sorted(people):
        return False
    z3 = require("z3")
    solver, pos = _order_solver(people, clues)
    solver.add(*[pos[p] == i for i, p in enumerate(order)])
    return solver.check() == z3.sat


def _order_clue(rng: random.Random, order: list[str]) -> Clue:
    n = len(order)
    kind = rng.choice(("left", "left", "next", "at", "not_at"))
    if kind in ("left", "next"):
        i = rng.randrange(n - 1)
        j = i + 1 if kind == "next" else rng.randrange(i + 1, n)
        return [kind, order[i], order[j]]
    k = rng.randrange(n)
    if kind == "at":
        return ["at", order[k], k]
    other = rng.choice([i for i in range(n) if i != k])
    return ["not_at", order[k], other]


def _people(rng: random.Random) -> list[str]:
    return sorted(rng.sample(NAMES, rng.randint(MIN_PEOPLE, MAX_PEOPLE)), key=NAMES.index)


def _holds(clue: Clue, order: list[str] | tuple[str, ...]) -> bool:
    """Whether a clue is true of an order (a quick filter; z3 has the last word)."""
    kind, a, b = clue
    if kind == "left":
        return order.index(a) < order.index(b)
    if kind == "next":
        return order.index(a) + 1 == order.index(b)
    if kind == "at":
        return order.index(a) == b
    return order.index(a) != b


def _gen_ordering(rng: random.Random) -> tuple[str, str, dict[str, Any]]:
    people = _people(rng)
    order = rng.sample(people, len(people))
    clues: list[Clue] = []
    candidates = list(itertools.permutations(people))
    while len(candidates) > 1:  # add a random true clue whenever it rules out some order
        clue = _order_clue(rng, order)
        narrowed = [c for c in candidates if _holds(clue, c)]
        if len(narrowed) < len(candidates):
            clues.append(clue)
            candidates = narrowed
    solutions = solve_order(people, clues)  # z3's proof of uniqueness, and the answer
    if solutions != [order]:
        raise RuntimeError(f"z3 finds {solutions} for {clues}, not {order}; this is a bug")
    solution = order
    n = len(people)
    prompt = (
        f"{_listing(people)} stand in a row. {' '.join(clue_text(c, n) for c in clues)} "
        "Who stands where, from left to right?"
    )
    return prompt, format_names(solution), {"people": people, "clues": clues, "order": solution}


def _check_ordering(answer: dict[str, Any], generated: str) -> bool:
    order = parse_names(generated)
    return order == answer["order"] and satisfies(answer["people"], answer["clues"], order)


def _city_solver(people: list[str], cities: list[str], clues: list[Clue]) -> tuple[Any, dict]:
    z3 = require("z3")
    where = {p: z3.Int(p) for p in people}
    solver = z3.Solver()
    solver.add(z3.Distinct(*where.values()))
    solver.add(*[z3.And(v >= 0, v < len(cities)) for v in where.values()])
    for clue in clues:
        solver.add(_city_constraint(where, cities, clue))
    return solver, where


def _city_constraint(where: dict[str, Any], cities: list[str], clue: Clue) -> Any:
    kind, person, city = clue
    if kind == "in":
        return where[person] == cities.index(city)
    if kind == "not_in":
        return where[person] != cities.index(city)
    raise ValueError(f"not a city clue: {kind!r}")


def solve_cities(people: list[str], cities: list[str], clues: list[Clue]) -> list[dict[str, str]]:
    """Every assignment person -> city (one each) consistent with the clues (z3)."""
    z3 = require("z3")
    solver, where = _city_solver(people, cities, clues)
    found = []
    while solver.check() == z3.sat:
        model = solver.model()
        chosen = {p: model[v].as_long() for p, v in where.items()}
        found.append({p: cities[i] for p, i in chosen.items()})
        solver.add(z3.Or(*[v != chosen[p] for p, v in where.items()]))
    return sorted(found, key=lambda f: [f[p] for p in people])


def _gen_where(rng: random.Random) -> tuple[str, str, dict[str, Any]]:
    people = _people(rng)
    cities = sorted(rng.sample(CITIES, len(people)), key=CITIES.index)
    truth = dict(zip(people, rng.sample(cities, len(cities)), strict=True))
    asked = rng.choice(people)
    clues: list[Clue] = []
    candidates = [dict(zip(people, c, strict=True)) for c in itertools.permutations(cities)]
    while len({c[asked] for c in candidates}) > 1:  # add a true clue whenever it rules some out
        person = rng.choice(people)
        if rng.random() < 0.3 and person != asked:  # never names the answer outright
            clue = ["in", person, truth[person]]
        else:
            clue = ["not_in", person, rng.choice([c for c in cities if c != truth[person]])]
        narrowed = [c for c in candidates if (c[person] == clue[2]) == (clue[0] == "in")]
        if len(narrowed) < len(candidates):
            clues.append(clue)
            candidates = narrowed
    found = solve_cities(people, cities, clues)  # z3's answer
    answers = {f[asked] for f in found}
    if answers != {truth[asked]}:  # z3's re-check of the answer
        raise RuntimeError(f"z3 finds {answers} for {asked}, not {truth[asked]}; this is a bug")
    prompt = (
        f"{_listing(people)} live in {_listing(cities)}, one each. "
        f"{' '.join(clue_text(c, len(people)) for c in clues)} Where does {asked} live?"
    )
    answer = {"people": people, "cities": cities, "clues": clues, "person": asked}
    answer["city"] = truth[asked]
    return prompt, answer["city"], answer


def _check_where(answer: dict[str, Any], generated: str) -> bool:
    words = answer_text(generated).replace(",", " ").split()
    return bool(words) and words[0] == answer["city"]


def _gen_design_order(rng: random.Random) -> tuple[str, str, dict[str, Any]]:
    while True:
        people = _people(rng)
        order = rng.sample(people, len(people))
        clues = [_order_clue(rng, order) for _ in range(rng.randint(1, 2))]
        if clues[0] in clues[1:]:
            continue
        if len(solve_order(people, clues)) > 1:
            break
    n = len(people)
    text = " and ".join(clue_text(c, n).removesuffix(".") for c in clues)
    prompt = f"In which order, from left to right, can {_listing(people)} stand so that {text}?"
    return prompt, format_names(order), {"people": people, "clues": clues, "example": order}


def _check_design_order(answer: dict[str, Any], generated: str) -> bool:
    return satisfies(answer["people"], answer["clues"], parse_names(generated))


TASKS: tuple[Task, ...] = (
    Task(DOMAIN, "ordering", _gen_ordering, _check_ordering),
    Task(DOMAIN, "where", _gen_where, _check_where),
    Task(DOMAIN, "design_order", _gen_design_order, _check_design_order),
)
