"""Choose the multitask LoRA's schedule on the dev split, as the gate's settings are chosen.

A retrain always trains the baseline the task defines: one LoRA on the union of the training
files for E x `expert_steps` steps, as many training examples as the E experts together
(`OUT/experts/multitask`). More epochs can overfit it, so `RetrainSettings.multitask_candidates`
adds other schedules to choose from, each a full schedule of its own length (warmup and decay
over all its steps), spelled by its settings:

    s4000        4000 steps, kept at its last step
    s4000-best   4000 steps, kept at its checkpoint with the lowest dev loss (`keep_best`)

Each trains into `OUT/experts/multitask-<name>` (the step `multitask-candidates`). The step
`multitask-select` then scores every multitask LoRA, the run's own included, on the dev files
(mean NLL per completion token over the dev sets, equal weight per set, as for the gate;
`check_dev_files` refuses any other file) and keeps the lowest in
`OUT/multitask_selection.json`. The final report scores that one as its multitask LoRA
(`chosen_multitask`). Without candidates, the run's own is the multitask LoRA.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loramix.atomic import write_text_atomic
from loramix.science.lora_jobs import MULTITASK, multitask_schedule

if TYPE_CHECKING:
    from loramix.science.pipeline import RetrainPaths, RetrainSettings

logger = logging.getLogger(__name__)

MULTITASK_SELECTION_JSON = "multitask_selection.json"
CANDIDATE_NAME = re.compile(r"s(?P<steps>[1-9]\d*)(?P<best>-best)?")
"""`s<steps>` (trained to its last step) or `s<steps>-best` (kept at its best on dev)."""


def parse_candidate(name: str) -> tuple[int, bool] | None:
    """(steps, keep the best checkpoint on dev) that `name` spells; None if it spells none."""
    match = CANDIDATE_NAME.fullmatch(name)
    return None if match is None else (int(match["steps"]), match["best"] is not None)


def candidate_folder(name: str) -> str:
    """The folder under `OUT/experts` of the candidate `name` (`s4000` -> `multitask-s4000`)."""
    return f"{MULTITASK}-{name}"


def candidate_problems(settings: RetrainSettings) -> list[str]:
    """What is wrong with `settings.multitask_candidates`, one line per problem."""
    names = settings.multitask_candidates
    if isinstance(names, str):
        return [f"multitask_candidates={names!r}: give a tuple of names, e.g. ('s4000',)."]
    if names and not settings.multitask:
        return ["multitask_candidates: the run trains no multitask LoRA (multitask=False)."]
    found = []
    own = multitask_schedule(MULTITASK, settings)
    for name in names:
        spelled = parse_candidate(name) if isinstance(name, str) else None
        if spelled is None:
            found.append(
                f"multitask candidate {name!r}: spell it s<steps> (trained to its end) or "
                "s<steps>-best (kept at its best checkpoint on dev), e.g. s4000"
            )
        elif spelled == own:
            found.append(
                f"multitask candidate {name!r} is the run's own multitask LoRA ({own[0]} steps, "
                f"keep_best={own[1]}), which is always a candidate; leave it out"
            )
    if len(set(names)) != len(names):
        found.append(f"multitask_candidates={list(names)}: a name is repeated.")
    return found


def multitask_folders(paths: RetrainPaths, settings: RetrainSettings) -> dict[str, Path]:
    """Every multitask LoRA of the run, name -> folder: its own (`MULTITASK`), then the
    candidates in the order given."""
    folders = {MULTITASK: paths.multitask}
    for name in settings.multitask_candidates:
        folders[name] = paths.expert(candidate_folder(name))
    return folders


def chosen_multitask(paths: RetrainPaths, settings: RetrainSettings) -> tuple[str, Path]:
    """(name, folder) of the multitask LoRA the report scores: the one chosen on dev when
    the run has candidates, else the run's own.

    Raises:
        ValueError: If the run has candidates but no selection among them yet.
    """
    folders = multitask_folders(paths, settings)
    if not settings.multitask_candidates:
        return MULTITASK, folders[MULTITASK]
    chosen = _read(paths.out / MULTITASK_SELECTION_JSON).get("chosen")
    if chosen not in folders or not selection_is_current(paths, settings):
        raise ValueError(
            f"{paths.out / MULTITASK_SELECTION_JSON}: no choice among the current files of "
            f"{list(folders)}; the retrain's multitask-select step makes it."
        )
    return chosen, folders[chosen]


def recorded_choice(paths: RetrainPaths) -> str:
    """The multitask LoRA a finished run's report scored: the one in its
    `multitask_selection.json` if its `run.json` still lists that candidate, else its own."""
    from loramix.science.retrain_jobs import RUN_JSON

    chosen = _read(paths.out / MULTITASK_SELECTION_JSON).get("chosen")
    listed = _read(paths.out / RUN_JSON).get("multitask_candidates")
    return chosen if isinstance(listed, list) and chosen in listed else MULTITASK


def selection_is_current(paths: RetrainPaths, settings: RetrainSettings) -> bool:
    """Whether `multitask_selection.json` chose among exactly these candidates' files."""
    from loramix.training.outputs import folder_digest

    record = _read(paths.out / MULTITASK_SELECTION_JSON).get("candidates", {})
    folders = multitask_folders(paths, settings)
    return set(record) == set(folders) and all(
        isinstance(record[name], dict) and record[name].get("digest") == folder_digest(folder)
        for name, folder in folders.items()
    )


def select_multitask(paths: RetrainPaths, settings: RetrainSettings) -> dict[str, Any]:
    """Score every multitask LoRA on the dev files and record the lowest mean NLL.

    Scores already in `multitask_selection.json` for the same files (their digest) are kept.
    """
    from loramix.science.retrain_jobs import worker_plan
    from loramix.science.selection import choose, mean_nll
    from loramix.training.outputs import folder_digest

    folders = multitask_folders(paths, settings)
    digests = {name: folder_digest(folder) for name, folder in folders.items()}
    earlier = _read(paths.out / MULTITASK_SELECTION_JSON).get("candidates", {})
    scores = {
        name: entry["dev_nll"]
        for name, entry in earlier.items()
        if name in folders and isinstance(entry, dict) and entry.get("digest") == digests[name]
    }
    missing = {name: folder for name, folder in folders.items() if name not in scores}
    if missing:
        workers, threads = worker_plan(settings, len(missing))
        scores |= score_loras(
            settings.base,
            missing,
            paths.dev_sets(settings.domains),
            max_length=settings.max_length,
            workers=workers,
            threads=threads,
        )
    chosen = choose({name: scores[name] for name in folders}, what="multitask LoRA")
    record = {
        "criterion": "mean NLL per completion token over the dev sets, equal weight per set",
        "chosen": chosen,
        "candidates": {
            name: {
                "folder": str(folder.relative_to(paths.out)),
                **multitask_plan(folder),
                "dev_nll": scores[name],
                "mean": mean_nll(scores[name]),
                "digest": digests[name],
            }
            for name, folder in folders.items()
        },
    }
    write_text_atomic(paths.out / MULTITASK_SELECTION_JSON, json.dumps(record, indent=2) + "\n")
    logger.info(
        "multitask LoRA %s chosen on dev (mean NLL %.4f; %s)",
        chosen,
        record["candidates"][chosen]["mean"],
        ", ".join(f"{n} {c['mean']:.4f}" for n, c in record["candidates"].items()),
    )
    return {"chosen": chosen}


def score_loras(
    base: str,
    folders: Mapping[str, Path],
    dev_files: Mapping[str, Path],
    *,
    max_length: int = 1024,
    workers: int = 1,
    threads: int = 1,
) -> dict[str, dict[str, float]]:
    """Each LoRA's mean NLL per completion token on every dev file (teacher forcing only).

    Raises:
        ValueError: If a file is not a dev file (before any model is loaded).
    """
    from loramix.science.selection import check_dev_files
    from loramix.training.jobs import run_jobs

    check_dev_files(dev_files)
    files = {name: str(path) for name, path in dev_files.items()}
    jobs = {name: (base, str(folder), files, max_length) for name, folder in folders.items()}
    found = {
        done.name: done.value
        for done in run_jobs(_score_lora, jobs, workers=workers, threads=threads)
    }
    return {name: found[name] for name in folders}


def _score_lora(
    base: str, folder: str, dev_files: dict[str, str], max_length: int
) -> dict[str, float]:
    """One LoRA's NLL on every dev file (a job of `score_loras`): alone at scaling 1, as the
    final report scores it."""
    from loramix.config import XLoraConfig
    from loramix.evaluation.runner import EXPERT_PREFIX, evaluate
    from loramix.model import XLoraModel
    from loramix.smollm2 import load_base_model

    base_model, tokenizer = load_base_model(base)
    alone = XLoraModel(base_model, XLoraConfig(adapters={MULTITASK: folder}, xlora_size=8))
    system = EXPERT_PREFIX + MULTITASK
    report = evaluate(
        alone, tokenizer, dev_files, [system], chat=False, max_new_tokens=0, max_length=max_length
    )
    return {name: score.nll for name, score in report.scores[system].items()}


def multitask_plan(folder: Path) -> dict[str, Any]:
    """The steps, kept step and keep_best of a multitask LoRA (from its multitask.json)."""
    from loramix.science.lora_jobs import MULTITASK_JSON

    plan = _read(folder / MULTITASK_JSON)
    return {key: plan[key] for key in ("steps", "kept_step", "keep_best") if key in plan}


def _read(path: Path) -> dict[str, Any]:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}
