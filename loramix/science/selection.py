"""Choose the gate's settings on the dev split, so that the test split cannot influence them.

The retrain trains one gate per `GateCandidate` (steps, learning rate, sampling weights of
the domains, depth, softmax temperature, layer-wise or shared scalings) over the same frozen
experts, scores each on the dev files (mean NLL per completion token under teacher forcing,
averaged over the dev sets with equal weight), and keeps the lowest. `score_candidates`
accepts only files named `*_dev.jsonl` and refuses anything else, so no test file can be
read while choosing: the test files are opened once, by the final evaluation.

`select_gate` does this step of a retrain run: `OUT/selection.json` records every
candidate's settings and dev scores and the choice, `OUT/xlora` is a copy of the chosen
gate's folder, and `OUT/dev_scores.json` keeps the scores, so that a run started from this
one (`loramix.science.reuse`) scores only its new candidates.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loramix.atomic import write_text_atomic

if TYPE_CHECKING:
    from loramix.science.pipeline import RetrainPaths, RetrainSettings

logger = logging.getLogger(__name__)

DEV_SUFFIX = "_dev.jsonl"


@dataclass(frozen=True)
class GateCandidate:
    """One setting of the gate to try.

    Attributes:
        name: Folder name of this candidate's gate (letters, digits, "-", "_" and ".").
        steps: Optimizer steps.
        lr: Peak learning rate.
        weights: Sampling weight of a domain's training file in the gate's data mix; domains
            not named weigh 1.
        depth: Linear layers in the gate (`xlora_depth`).
        temperature: Softmax temperature over the experts (`softmax_temperature`).
        layerwise: One set of scalings per adapted module (`layerwise_scalings`), or one
            shared by all modules (False); None takes the run's `layerwise` setting.
    """

    name: str
    steps: int = 300
    lr: float = 3e-3
    weights: dict[str, float] = field(default_factory=dict)
    depth: int = 2
    temperature: float = 1.0
    layerwise: bool | None = None

    def problems(self, domains: Sequence[str]) -> list[str]:
        """What is wrong with this candidate, one line per problem (empty when valid)."""
        where = f"gate candidate {self.name!r}"
        found = []
        if (
            not self.name
            or not self.name.replace("-", "").replace("_", "").replace(".", "").isalnum()
        ):
            found.append(f"{where}: name it with letters, digits, '-', '_' or '.'")
        for key in ("steps", "depth"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                found.append(f"{where}: {key}={value!r}, use a whole number >= 1")
        for key in ("lr", "temperature"):
            value = getattr(self, key)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not 0 < value < math.inf
            ):
                found.append(f"{where}: {key}={value!r}, use a positive number")
        if self.layerwise is not None and not isinstance(self.layerwise, bool):
            found.append(f"{where}: layerwise={self.layerwise!r}, use True, False or None")
        for domain, weight in self.weights.items():
            if domain not in domains:
                found.append(f"{where}: weights[{domain!r}] names no domain of {list(domains)}")
            if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
                found.append(f"{where}: weights[{domain!r}]={weight!r}, use a positive number")
        return found


DEFAULT_CANDIDATES: tuple[GateCandidate, ...] = (
    GateCandidate("lr3e-3-s1200", steps=1200, lr=3e-3),
    GateCandidate("lr3e-3-s600-shared", steps=600, lr=3e-3, layerwise=False),
)
"""Tried by the retrain, at the v1 bundle's learning rate: 1200 steps layer-wise, and 600 steps
with one set of scalings shared by all modules. Mean dev NLL over the ten dev sets, with the
experts of up to 1000 steps of the published run (`docs/science-v2/selection.json`): 1.020
(chosen) and 1.215 (the shared gate lost most on chemistry, 1.31 against 0.55). In the
earlier run with the same expert settings (`docs/science-v2/experts-1000-gates-600/`), 600
steps layer-wise scored 0.967 (chosen) and the shared gate 0.996; over the experts of 500
steps (`docs/science-v2/experts-500/selection.json`): 1.009 and 0.999 (chosen). With the
experts of 250 steps (`docs/science-v2/experts-250/selection.json`) 1200 steps scored 1.125,
the best, and 600 steps 1.131 (shared: 1.155); the others tried there lost on dev: 250 steps
(1.231: with eight experts a gate of 250 steps sees each domain in about 250 examples and
routes weakly), a softmax temperature of 0.5 at 600 steps (1.140) and a learning rate of
1e-2 (1.299 at 250 steps, `docs/science-v2/experts-250/first-run/selection.json`)."""


CANDIDATE_NAME = re.compile(
    r"lr(?P<lr>\d+(?:\.\d+)?(?:e-?\d+)?)-s(?P<steps>\d+)(?P<shared>-shared)?"
)
"""Names that spell a candidate's settings: `lr<learning rate>-s<steps>`, with `-shared` for
scalings shared by all modules (`lr3e-3-s1200`, `lr1e-3-s600-shared`); the defaults are
named this way."""


def candidate_from_name(name: str) -> GateCandidate | None:
    """The candidate that `name` spells (see `CANDIDATE_NAME`), with the other settings at
    their defaults; None if `name` is not of that form."""
    match = CANDIDATE_NAME.fullmatch(name)
    if match is None:
        return None
    layerwise = False if match["shared"] else None
    candidate = GateCandidate(
        name, steps=int(match["steps"]), lr=float(match["lr"]), layerwise=layerwise
    )
    return None if candidate.problems(()) else candidate  # e.g. 0 steps, lr 0 or inf


def recorded_candidate(record: Any) -> Any:
    """A candidate as a run's `run.json` holds it, with the defaults of fields added since
    (so that a run recorded before a field existed still matches its own settings);
    anything but a mapping is returned as it is (and then differs from every candidate)."""
    if not isinstance(record, Mapping):
        return record
    defaults = {
        f.name: f.default
        for f in fields(GateCandidate)
        if f.default is not MISSING and f.name not in record
    }
    return {**dict(record), **defaults}


def check_dev_files(files: Mapping[str, str | os.PathLike[str]]) -> None:
    """Refuse any file that is not a dev split.

    Raises:
        ValueError: Naming every file not called `*_dev.jsonl`; settings are chosen on dev.
    """
    wrong = sorted(str(path) for path in files.values() if not str(path).endswith(DEV_SUFFIX))
    if wrong or not files:
        raise ValueError(
            "gate settings are chosen on the dev split only; "
            + (f"not dev files: {', '.join(wrong)}" if wrong else "no dev file given")
            + f". Pass the *{DEV_SUFFIX} files written by `write_datasets`."
        )


def choose(scores: Mapping[str, Mapping[str, float]], what: str = "gate candidate") -> str:
    """The candidate with the lowest mean dev NLL over its sets (the first one on a tie).

    Args:
        scores: Candidate -> dev set -> NLL.
        what: What the candidates are, for the error.

    Raises:
        ValueError: If there is no candidate, or a candidate has no finite score.
    """
    means = {name: mean_nll(by_set) for name, by_set in scores.items()}
    bad = sorted(name for name, value in means.items() if not math.isfinite(value))
    if not means or bad:
        raise ValueError(f"no {what} to choose from (without finite dev NLL: {bad})")
    return min(means, key=lambda name: (means[name], list(means).index(name)))


def mean_nll(by_set: Mapping[str, float]) -> float:
    """The dev sets' NLLs averaged with equal weight (nan if there are none)."""
    return sum(by_set.values()) / len(by_set) if by_set else math.nan


def score_candidates(
    base: str,
    gates: Mapping[str, str | os.PathLike[str]],
    dev_files: Mapping[str, str | os.PathLike[str]],
    *,
    max_length: int = 1024,
    batch_size: int = 8,
    workers: int = 1,
    threads: int = 1,
) -> dict[str, dict[str, float]]:
    """X-LoRA's mean NLL per completion token of every gate on every dev file.

    Args:
        base: The base model ("smollm2" or a local folder).
        gates: Candidate -> its X-LoRA folder.
        dev_files: Dev set name -> `*_dev.jsonl` file.
        max_length: Examples are truncated to this many tokens.
        batch_size: Sequences per forward call.
        workers: Candidates scored side by side (`loramix.training.jobs`); 1 scores them
            one after the other here.
        threads: torch threads of each worker (ignored when `workers` is 1).

    Returns:
        Candidate -> dev set -> NLL, in the order of `gates`.

    Raises:
        ValueError: If a file is not a dev file (before any model is loaded).
    """
    check_dev_files(dev_files)
    from loramix.training.jobs import run_jobs

    jobs = {
        name: (base, str(folder), {k: str(v) for k, v in dev_files.items()}, max_length, batch_size)
        for name, folder in gates.items()
    }
    found = {
        done.name: done.value
        for done in run_jobs(_score_gate, jobs, workers=workers, threads=threads)
    }
    scores = {name: found[name] for name in gates}
    for name, by_set in scores.items():
        logger.info("gate %s: mean dev NLL %.4f", name, mean_nll(by_set))
    return scores


def _score_gate(
    base: str, folder: str, dev_files: dict[str, str], max_length: int, batch_size: int
) -> dict[str, float]:
    """One gate's NLL on every dev file (a job of `score_candidates`)."""
    from loramix.evaluation.runner import completion_nll, load_test_set
    from loramix.model import XLoraModel
    from loramix.smollm2 import load_base_model

    base_model, tokenizer = load_base_model(base)
    model = XLoraModel.from_pretrained(base_model, Path(folder))
    model.eval()
    scores = {}
    for set_name, path in dev_files.items():
        examples = load_test_set(path, tokenizer, chat=False, max_length=max_length)
        nll, _, _ = completion_nll(model, tokenizer, examples, batch_size)
        scores[set_name] = nll
    return scores


def selection_record(
    candidates: Sequence[GateCandidate], scores: Mapping[str, Mapping[str, float]], chosen: str
) -> dict[str, Any]:
    """The JSON-able record of a selection (for `selection.json`)."""
    from dataclasses import asdict

    return {
        "criterion": "mean NLL per completion token over the dev sets, equal weight per set",
        "chosen": chosen,
        "candidates": {
            c.name: {
                "settings": asdict(c),
                "dev_nll": dict(scores.get(c.name, {})),
                "mean": mean_nll(scores.get(c.name, {})),
            }
            for c in candidates
        },
    }


def select_gate(paths: RetrainPaths, settings: RetrainSettings) -> dict[str, Any]:
    """Score the candidates' gates on the dev files, keep the best as `OUT/xlora`.

    A score in `OUT/dev_scores.json` is used instead of scoring again only when it was
    made for the same gate files (their digest is kept beside it): a gate taken over by
    `--reuse`, or kept from an earlier selection of this run; a gate trained again is
    scored again.
    """
    from loramix.science.pipeline import SELECTION_JSON
    from loramix.science.retrain_jobs import DEV_SCORES_JSON, read_json, worker_plan
    from loramix.training.outputs import folder_digest

    gates = {c.name: paths.gate(c.name) for c in settings.gate_candidates}
    digests = {name: folder_digest(gate) for name, gate in gates.items()}
    dev = paths.dev_sets(settings.domains)  # dev files only: selection refuses others
    known = {
        name: entry["dev_nll"]
        for name, entry in read_json(paths.out / DEV_SCORES_JSON).items()
        if name in gates and valid_score_entry(entry) and entry["gate_digest"] == digests[name]
    }
    missing = {name: gate for name, gate in gates.items() if name not in known}
    if known:
        logger.info("dev scores kept (same gate files): %s", sorted(known))
    new_scores = {}
    if missing:
        workers, threads = worker_plan(settings, len(missing))
        new_scores = score_candidates(
            settings.base,
            missing,
            dev,
            max_length=settings.max_length,
            workers=workers,
            threads=threads,
        )
    scores = {name: known[name] if name in known else new_scores[name] for name in gates}
    kept = {name: {"gate_digest": digests[name], "dev_nll": scores[name]} for name in gates}
    write_text_atomic(paths.out / DEV_SCORES_JSON, json.dumps(kept, indent=2) + "\n")
    chosen = choose(scores)
    record = selection_record(settings.gate_candidates, scores, chosen)
    record["scores_kept"] = sorted(known)
    if paths.xlora.exists():
        shutil.rmtree(paths.xlora)
    shutil.copytree(paths.gate(chosen), paths.xlora)
    write_text_atomic(paths.out / SELECTION_JSON, json.dumps(record, indent=2) + "\n")
    logger.info(
        "gate %s chosen on dev (mean NLL %.4f)", chosen, record["candidates"][chosen]["mean"]
    )
    return {"chosen": chosen}


def valid_score_entry(entry: Any) -> bool:
    """Whether a `dev_scores.json` entry is {"gate_digest": str, "dev_nll": {set: number}}
    (anything else is scored again)."""
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("gate_digest"), str)
        and isinstance(entry.get("dev_nll"), dict)
        and all(isinstance(v, int | float) for v in entry["dev_nll"].values())
    )
