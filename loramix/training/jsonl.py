"""Reading JSON Lines data files: `FILE[:WEIGHT]` sources and every bad line in one error.

`DataSource` is one file and its sampling weight in a mixture (parsed from "FILE:WEIGHT");
`existing_sources` checks that all of them exist before anything is loaded. `read_records`
yields the JSON objects of a file's non-blank lines; `BadLines` collects the lines that are
not (or that a caller rejects later), so that one error names all of them. What the objects
mean (prompt/completion, messages, text) is `loramix.training.data`'s business.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SHAPES = '{"prompt", "completion"}, {"messages"} or {"text"}'
"""The shapes a data line may take, for errors."""


@dataclass(frozen=True)
class DataSource:
    """A JSON Lines file and its sampling weight in a mixture.

    Attributes:
        path: The `.jsonl` file.
        weight: Relative share of the mixture; any positive number.
    """

    path: Path
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.weight, int | float) and math.isfinite(self.weight)):
            raise ValueError(f"weight={self.weight!r} for {self.path}: use a positive number.")
        if self.weight <= 0:
            raise ValueError(
                f"weight={self.weight!r} for {self.path}: weights must be > 0; leave the "
                "file out instead of giving it weight 0."
            )

    @classmethod
    def parse(cls, spec: str | os.PathLike[str]) -> DataSource:
        """Parse "FILE" or "FILE:WEIGHT" (e.g. "math.jsonl:2").

        The text after the last colon is a weight only if it reads as a number, so paths that
        contain colons still work.

        Raises:
            ValueError: If the weight is not a positive number.
        """
        text = os.fspath(spec)
        path, sep, weight = text.rpartition(":")
        if sep and path:
            try:
                value = float(weight)
            except ValueError:
                pass
            else:
                return cls(Path(path), value)
        return cls(Path(text))


def existing_sources(data: Sequence[str | os.PathLike[str] | DataSource]) -> list[DataSource]:
    """Parses `FILE[:WEIGHT]` entries and checks that every file exists, before any loading.

    Raises:
        FileNotFoundError: naming the first data file that does not exist.
    """
    sources = [s if isinstance(s, DataSource) else DataSource.parse(s) for s in data]
    for source in sources:
        if not source.path.is_file():
            raise FileNotFoundError(f"Data file {source.path} does not exist.")
    return sources


MAX_REPORTED_LINES = 20
"""Bad lines named in one data-file error; the rest are counted."""


class BadLines:
    """Collects the problems of a data file's lines, to report them all in one error.

    Args:
        path: The file, named in the error.
        what: What the lines were expected to be, for the error's first line.
    """

    def __init__(self, path: str | os.PathLike[str], what: str = "line") -> None:
        self.path = Path(path)
        self.what = what
        self.problems: list[tuple[int, str]] = []

    def add(self, number: int, problem: str) -> None:
        """Record that line `number` is bad and why."""
        self.problems.append((number, problem))

    def check(self) -> None:
        """Raise one `ValueError` naming every bad line (the first `MAX_REPORTED_LINES`).

        Raises:
            ValueError: `FILE: N bad lines` (or `FILE, line K: problem` for one), then
                `  line K: problem` per line and `  ... and M more bad lines`.
        """
        if not self.problems:
            return
        if len(self.problems) == 1:
            number, problem = self.problems[0]
            raise ValueError(f"{self.path}, line {number}: {problem}")
        shown = self.problems[:MAX_REPORTED_LINES]
        lines = [f"{self.path}: {len(self.problems)} bad lines:"]
        lines += [f"  line {number}: {problem}" for number, problem in shown]
        if len(self.problems) > len(shown):
            lines.append(f"  ... and {len(self.problems) - len(shown)} more bad lines")
        raise ValueError("\n".join(lines))


def read_records(
    path: str | os.PathLike[str], bad: BadLines | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, JSON object) for each non-blank line of a JSON Lines file.

    Args:
        path: The file.
        bad: Collects the lines that are not JSON objects (they are skipped); None raises on
            the first one.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: Without `bad`, on a line that is not valid JSON or not a JSON object,
            naming the file, the line and the column.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Data file {path} does not exist (expected a .jsonl file).")
    report = BadLines(path) if bad is None else bad
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:  # -sig: a byte-order mark is fine
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                report.add(
                    number,
                    f"not UTF-8 (byte {raw[error.start]:#04x} at byte {error.start + 1} of the "
                    "line); save the file as UTF-8.",
                )
                if bad is None:
                    report.check()
                continue
            if not line.strip():
                continue
            try:  # without its newline, so that an error at the end has this line's column
                record = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as error:
                hint = "Each line must be one JSON object."
                if line.strip() in ("{", "[") or line.lstrip().startswith("[{"):
                    hint = (
                        "This looks like one JSON document (an array, or an object spread over "
                        "lines); JSON Lines needs each object on one line."
                    )
                report.add(number, f"not valid JSON ({error.msg} at column {error.colno}). {hint}")
            else:
                if isinstance(record, dict):
                    yield number, record
                    continue
                report.add(
                    number,
                    f"expected a JSON object of shape {SHAPES}, got a JSON "
                    f"{type(record).__name__}.",
                )
            if bad is None:
                report.check()
