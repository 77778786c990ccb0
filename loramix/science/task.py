"""A science task: a seeded generator of question/answer examples plus the verifier of answers.

Every example is a plain JSON-able dict (`Example`): the question (`prompt`), the reference
answer as the model should write it (`completion`), where it comes from (`domain`, `task`) and
the ground truth (`answer`), always computed by a library (Biopython, periodictable, pint),
never written by hand. A `Task` pairs one generator with one checker, so that the text a model
generates is judged by the same rule that made the data: exact match for symbolic answers, a
tolerance for numbers, and a library re-check for design questions (any valid design counts).
"""

from __future__ import annotations

import importlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypedDict

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "pip install 'loramix[science]'  (biopython, periodictable, pint, sympy, z3-solver, rdkit, "
    "tblite)"
)


class Example(TypedDict):
    """One question with its reference answer; written as one JSON Lines record."""

    prompt: str
    completion: str
    domain: str
    task: str
    answer: Any


Generator = Callable[[random.Random], tuple[str, str, Any]]
"""rng -> (prompt, completion, answer)."""

Checker = Callable[[Any, str], bool]
"""(answer, generated text) -> whether the text answers the question."""


@dataclass(frozen=True)
class Task:
    """One kind of question of one domain.

    Attributes:
        domain: The domain (one expert's training data), e.g. "biology", or "composite".
        name: The task name, unique within its domain, e.g. "translate".
        generate: Draws one (prompt, completion, answer) from a `random.Random`.
        check: Judges generated text against the example's `answer`.
    """

    domain: str
    name: str
    generate: Generator
    check: Checker

    def sample(self, rng: random.Random) -> Example:
        """Draw one example; the same rng state always gives the same example."""
        prompt, completion, answer = self.generate(rng)
        return Example(
            prompt=prompt, completion=completion, domain=self.domain, task=self.name, answer=answer
        )

    def verify(self, example: Example, generated: str) -> bool:
        """Return whether `generated` answers `example`; unparsable text is simply wrong."""
        try:
            return bool(self.check(example["answer"], generated))
        except Exception as err:  # a library rejecting garbage text: the answer is wrong
            logger.debug("%s/%s: %r rejected: %s", self.domain, self.name, generated, err)
            return False


def require(module: str) -> ModuleType:
    """Import an optional dependency of `loramix.science`, naming the extra if it is missing.

    Raises:
        ImportError: If the module is not installed; the message says how to install it.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"loramix.science needs `{module.split('.')[0]}`, which is not installed; "
            f"install the science extra: {INSTALL_HINT}"
        ) from err


def close(value: float, truth: float, *, abs_tol: float = 0.0, rel_tol: float = 0.0) -> bool:
    """Return whether |value - truth| <= max(abs_tol, rel_tol * |truth|)."""
    return abs(value - truth) <= max(abs_tol, rel_tol * abs(truth))
