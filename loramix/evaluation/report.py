"""The evaluation report: scores per system and test set, rendered as Markdown and JSON.

`loramix.evaluation.runner.evaluate` fills an `EvalReport`; this module renders its table
(rows are systems, columns test sets, cells "NLL / accuracy"), the expert-usage table, and
writes `eval.json` and `eval.md` (atomically). `TargetCheck` is one claim checked on a report;
the science case study's targets are computed by `loramix.science.targets`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loramix.atomic import write_text_atomic
from loramix.records import REPORT_FORMAT, REPORT_JSON, REPORT_MD  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class Score:
    """One system on one test set.

    Attributes:
        nll: Mean NLL per completion token.
        accuracy: Share of verified greedy answers, or None when nothing was generated.
        n_examples: Test examples.
        n_tokens: Completion tokens the NLL averages over.
        n_correct: Verified answers (0 when nothing was generated).
        seconds: Wall time of the NLL pass and the generation together.
        nll_ci: 95% bootstrap interval of `nll` over the examples, or None.
        accuracy_ci: 95% bootstrap interval of `accuracy`, or None.
        example_nlls: Each example's summed completion-token NLL `(N,)`, in the test file's
            order (`nll` is their sum over the sum of `example_tokens`), or None (a report
            written before they were kept). Two systems' values on the same examples give
            the paired interval of their difference (`nll_difference_interval`).
        example_tokens: Each example's completion tokens `(N,)`, or None.
    """

    nll: float
    accuracy: float | None
    n_examples: int
    n_tokens: int
    n_correct: int = 0
    seconds: float = 0.0
    nll_ci: tuple[float, float] | None = None
    accuracy_ci: tuple[float, float] | None = None
    example_nlls: tuple[float, ...] | None = None
    example_tokens: tuple[int, ...] | None = None

    def interval_cell(self) -> str:
        """ "0.123 [0.110, 0.140] / 45% [35, 55]" (the bootstrap intervals, where known)."""
        nll = f"{self.nll:.3f}"
        if self.nll_ci is not None:
            nll += f" [{self.nll_ci[0]:.3f}, {self.nll_ci[1]:.3f}]"
        if self.accuracy is None:
            return f"{nll} / -"
        accuracy = f"{100 * self.accuracy:.0f}%"
        if self.accuracy_ci is not None:
            low, high = self.accuracy_ci
            accuracy += f" [{100 * low:.0f}, {100 * high:.0f}]"
        return f"{nll} / {accuracy}"

    def cell(self) -> str:
        """ "0.123 / 45%" ("0.123 / -" without generation)."""
        accuracy = "-" if self.accuracy is None else f"{100 * self.accuracy:.0f}%"
        return f"{self.nll:.3f} / {accuracy}"


@dataclass(frozen=True)
class TargetCheck:
    """One target of the science case study, checked on a report.

    Attributes:
        target: What is claimed, e.g. "biology: X-LoRA NLL within 10% of expert:biology".
        status: "pass", "fail", or "missing" (the report lacks a system or test set it needs).
        detail: The numbers behind the verdict.
    """

    target: str
    status: str
    detail: str

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    def line(self) -> str:
        return f"{self.status.upper():7} {self.target}: {self.detail}"


@dataclass
class EvalReport:
    """The scores of every system on every test set, and X-LoRA's expert usage.

    Attributes:
        expert_names: The experts, in the model's order (the E axis).
        test_sets: Test set name -> its file (as given).
        systems: System names, in evaluation order (rows of the table).
        scores: System -> test set -> score.
        usage: Test set -> expert -> X-LoRA's mean scaling (empty without the xlora system).
        settings: How the numbers were made (verifier, max_new_tokens, chat, limit, ...).
    """

    expert_names: list[str]
    test_sets: dict[str, str]
    systems: list[str]
    scores: dict[str, dict[str, Score]]
    usage: dict[str, dict[str, float]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def score(self, system: str, test_set: str) -> Score:
        return self.scores[system][test_set]

    def add_system(self, name: str, scores: dict[str, Score]) -> None:
        """Add the scores of a system evaluated on another model (e.g. a multitask LoRA).

        The system may cover only some of the report's test sets (its other cells stay
        empty), never a set the report does not have.

        Raises:
            ValueError: If the name is taken or the scores name a test set not in the report.
        """
        if name in self.systems:
            raise ValueError(f"the report already holds a system named {name!r}; rename it")
        if not scores or set(scores) - set(self.test_sets):
            raise ValueError(
                f"system {name!r} has scores for {sorted(scores)}, but the report's test sets "
                f"are {sorted(self.test_sets)}; evaluate it on (some of) the same files"
            )
        self.systems.append(name)
        self.scores[name] = dict(scores)

    # ------------------------------------------------------------------ rendering

    def table(self, intervals: bool = False) -> str:
        """Markdown: rows are systems, columns test sets, cells "NLL / accuracy".

        The lowest NLL of each column is bold; `intervals` adds the 95% bootstrap intervals.
        """
        names = list(self.test_sets)
        best = {
            name: min(self.scores[s][name].nll for s in self.systems if name in self.scores[s])
            for name in names
        }
        lines = [
            "| system | " + " | ".join(names) + " |",
            "|:--|" + "--:|" * len(names),
        ]
        for system in self.systems:
            cells = []
            for name in names:
                score = self.scores[system].get(name)
                if score is None:
                    cells.append("")
                    continue
                cell = score.interval_cell() if intervals else score.cell()
                if score.nll == best[name]:
                    nll, _, rest = cell.partition(" / ")
                    cell = f"**{nll}** / {rest}"
                cells.append(cell)
            lines.append(f"| {system} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def paired_table(self, reference: str) -> str:
        """Markdown: rows are the other systems, columns test sets, cells the row's NLL minus
        `reference`'s with the paired 95% bootstrap interval of that difference
        (`nll_difference_interval`): above 0, `reference` is better; an interval that holds
        0 cannot tell the two apart on these examples. A cell is empty where either system
        was not scored on the set, and "-0.013 (unpaired)" where the scores keep no
        per-example values or were made on other examples.

        Raises:
            ValueError: If `reference` is not one of the report's systems.
        """
        if reference not in self.systems or reference not in self.scores:
            raise ValueError(
                f"reference system {reference!r} is not in the report; choose one of "
                f"{', '.join(self.systems)}"
            )
        names = list(self.test_sets)
        lines = [
            "| system | " + " | ".join(names) + " |",
            "|:--|" + "--:|" * len(names),
        ]
        for system in self.systems:
            if system == reference:
                continue
            cells = []
            for name in names:
                ours = self.scores.get(system, {}).get(name)
                theirs = self.scores[reference].get(name)
                if ours is None or theirs is None:
                    cells.append("")
                    continue
                interval = nll_difference_interval(ours, theirs)
                difference = f"{ours.nll - theirs.nll:+.3f}"
                if interval is None:
                    cells.append(f"{difference} (unpaired)")
                else:
                    cells.append(f"{difference} [{interval[0]:+.3f}, {interval[1]:+.3f}]")
            lines.append(f"| {system} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def usage_table(self) -> str:
        """Markdown: rows are test sets, columns experts, cells X-LoRA's mean scalings."""
        if not self.usage:
            return ""
        lines = [
            "| test set | " + " | ".join(self.expert_names) + " |",
            "|:--|" + "--:|" * len(self.expert_names),
        ]
        for name, by_expert in self.usage.items():
            top = max(by_expert.values())
            cells = [
                f"**{by_expert[e]:.3f}**" if by_expert[e] == top else f"{by_expert[e]:.3f}"
                for e in self.expert_names
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def to_markdown(self, targets: Sequence[TargetCheck] = (), reference: str | None = None) -> str:
        """The whole report: scores, intervals, the other systems against `reference` (if
        given, `paired_table`), expert usage, targets (if given) and settings."""
        sizes = ", ".join(
            f"{name} {next(iter(self.scores.values()))[name].n_examples}" for name in self.test_sets
        )
        parts = [
            "# Evaluation",
            "",
            self.table(),
            "",
            "Cells: mean NLL per completion token (teacher forcing; lower is better; lowest in "
            "bold) / share of greedy answers the verifier "
            f"({self.settings.get('verifier', '?')}) accepts. Examples per test set: {sizes}.",
        ]
        if any(
            score.nll_ci is not None for by_set in self.scores.values() for score in by_set.values()
        ):
            parts += [
                "",
                "## 95% confidence intervals",
                "",
                self.table(intervals=True),
                "",
                "Percentile bootstrap over the examples of each set (2000 resamples, seed 0).",
            ]
        if reference is not None:
            parts += [
                "",
                f"## Against {reference}, paired",
                "",
                self.paired_table(reference),
                "",
                f"Cells: the system's NLL minus {reference}'s (above 0: {reference} is better) "
                "and the 95% interval of that difference, both systems scored on the same "
                "resampled examples (percentile bootstrap, 2000 resamples, seed 0). An interval "
                'that holds 0 cannot tell the two apart on these examples. "(unpaired)": no '
                "interval, as a score keeps no per-example values or was made on other "
                "examples; empty: one of the two was not scored on the set.",
            ]
        if self.usage:
            parts += [
                "",
                "## X-LoRA expert usage",
                "",
                self.usage_table(),
                "",
                "Mean scalings (after the gate's softmax, before top-k) over adapted layers and "
                "over the prompt and completion tokens of each test set.",
            ]
        if targets:
            parts += ["", "## Targets", ""] + [
                f"- **{t.status.upper()}** {t.target}: {t.detail}" for t in targets
            ]
        settings = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        parts += ["", f"Settings: {settings}.", ""]
        return "\n".join(parts)

    # ------------------------------------------------------------------ files

    def to_dict(self, targets: Sequence[TargetCheck] = ()) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": REPORT_FORMAT,
            "expert_names": self.expert_names,
            "test_sets": self.test_sets,
            "systems": self.systems,
            "scores": {
                system: {name: asdict(score) for name, score in by_set.items()}
                for system, by_set in self.scores.items()
            },
            "usage": self.usage,
            "settings": self.settings,
        }
        if targets:
            data["targets"] = [asdict(t) for t in targets]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalReport:
        """Rebuild a report from `to_dict()` output (e.g. a parsed `eval.json`).

        Raises:
            ValueError: If the data is not a loramix evaluation report.
        """
        if data.get("format") != REPORT_FORMAT:
            raise ValueError(
                f"not a loramix evaluation report (format {data.get('format')!r}, expected "
                f"{REPORT_FORMAT!r}); was it written by `EvalReport.write`?"
            )
        try:
            return cls(
                expert_names=list(data["expert_names"]),
                test_sets=dict(data["test_sets"]),
                systems=list(data["systems"]),
                scores={
                    system: {name: _score_from_dict(score) for name, score in by_set.items()}
                    for system, by_set in data["scores"].items()
                },
                usage={k: dict(v) for k, v in data.get("usage", {}).items()},
                settings=dict(data.get("settings", {})),
            )
        except (KeyError, TypeError) as error:
            raise ValueError(f"malformed evaluation report ({error!r})") from None

    def write(
        self,
        out_dir: str | os.PathLike[str],
        targets: Sequence[TargetCheck] = (),
        reference: str | None = None,
    ) -> dict:
        """Writes `eval.json` and `eval.md` into `out_dir` (created if missing), atomically;
        `reference` adds the paired table to `eval.md` (`to_markdown`).

        Returns:
            File name -> path.
        """
        markdown = self.to_markdown(targets, reference)  # checks `reference` before any write
        data = json.dumps(self.to_dict(targets), indent=2) + "\n"
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        return {
            REPORT_JSON: write_text_atomic(out / REPORT_JSON, data),
            REPORT_MD: write_text_atomic(out / REPORT_MD, markdown),
        }

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> EvalReport:
        """Reads `eval.json` (or the folder holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / REPORT_JSON
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))


def format_targets(checks: Sequence[TargetCheck]) -> str:
    """One line per target: "PASS    target: numbers"."""
    return "\n".join(check.line() for check in checks)


def nll_difference_interval(
    ours: Score, theirs: Score, *, relative: bool = False
) -> tuple[float, float] | None:
    """The 95% paired bootstrap interval of `ours.nll - theirs.nll` (with `relative`,
    of `ours.nll / theirs.nll - 1`), both scored on the same examples
    (`loramix.evaluation.bootstrap.paired_interval`).

    None when either score lacks its per-example values, or when their examples differ (the
    counts of examples or of each example's completion tokens do not match), so that no
    interval pairs unrelated examples.
    """
    from loramix.evaluation.bootstrap import paired_interval

    kept = (ours.example_nlls, ours.example_tokens, theirs.example_nlls, theirs.example_tokens)
    if any(values is None for values in kept) or ours.example_tokens != theirs.example_tokens:
        return None
    return paired_interval(
        (ours.example_nlls, ours.example_tokens),
        (theirs.example_nlls, theirs.example_tokens),
        relative=relative,
    )


_TUPLES = ("nll_ci", "accuracy_ci", "example_nlls", "example_tokens")


def _score_from_dict(data: Mapping[str, Any]) -> Score:
    """A `Score` from its `asdict` form (JSON turns the tuples into lists)."""
    tuples = {key: tuple(data[key]) for key in _TUPLES if data.get(key) is not None}
    return Score(**{**data, **tuples})
