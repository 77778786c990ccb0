"""Start a retrain run from another run's finished work.

`reuse_run(source, out, seed, settings)` fills a new run folder with every output of the
finished or partial run in `source` that the new settings would reproduce: the data when
the seed, domains and split sizes match; each expert and the multitask LoRA when their
training settings match too; each gate candidate whose own settings (and the gate's
shared ones) match. Gate selection and the evaluation always run again, since they depend
on every candidate. So trying more gate settings costs the gates, not the experts:

    loramix science retrain --out runs/retrain-2 --reuse runs/retrain

Nothing in `source` changes. Files are hard-linked (copied where links are not possible):
`retrain` never writes into a finished step's folder, and every file it writes is written
atomically (a new file renamed over the old), which replaces a link instead of writing
through it. The dev scores of reused gates come along (`dev_scores.json`: the same gate
files on the same dev files), so the selection scores only the new candidates. What was
reused, and the times those steps took in `source`, are kept in `OUT/reused.json` and
`OUT/timings.json`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loramix.atomic import write_text_atomic
from loramix.config import CONFIG_NAME
from loramix.science.retrain_jobs import (
    DEV_SCORES_JSON,
    REUSED_JSON,
    RUN_JSON,
    TIMINGS_JSON,
    check_run_settings,
    read_json,
)

if TYPE_CHECKING:
    from loramix.science.pipeline import RetrainSettings

logger = logging.getLogger(__name__)

# The settings each step's output depends on (besides the outputs of the steps before).
DATA_FIELDS = ("seed", "domains", "n_train", "n_test", "n_dev")
EXPERT_FIELDS = DATA_FIELDS + (
    "base",
    "rank",
    "alpha",
    "targets",
    "expert_steps",
    "expert_lr",
    "lr_scheduler",
    "batch_size",
    "max_length",
    "train_dtype",
)
MULTITASK_FIELDS = EXPERT_FIELDS + ("multitask", "multitask_lr")
GATE_FIELDS = EXPERT_FIELDS + ("gate_size", "layerwise")


def reuse_run(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    seed: int,
    settings: RetrainSettings,
) -> dict[str, Any]:
    """Link `source`'s reusable outputs into the new run folder `out`; see the module
    docstring.

    Returns:
        What was reused: {"from", "data", "experts", "multitask", "gates"}.

    Raises:
        FileNotFoundError: If `source` holds no run (no run.json).
        FileExistsError: If `out` already holds a run (resume it without `--reuse`).
        ValueError: If `source` and `out` are the same folder.
    """
    from loramix.science.pipeline import MULTITASK, RetrainPaths
    from loramix.science.selection import recorded_candidate

    source_paths, out_paths = RetrainPaths(Path(source)), RetrainPaths(Path(out))
    recorded = read_json(source_paths.out / RUN_JSON)
    if not recorded:
        raise FileNotFoundError(
            f"{source_paths.out / RUN_JSON}: missing or unreadable; --reuse takes the folder "
            "of an earlier retrain run (its --out)."
        )
    if out_paths.out.resolve() == source_paths.out.resolve():
        raise ValueError(f"--reuse {source}: that is the run's own folder; give another --out.")
    if out_paths.out.exists() and any(out_paths.out.iterdir()):
        raise FileExistsError(
            f"{out_paths.out} is not empty; --reuse starts a new run folder. Give another "
            "--out, or run without --reuse to resume the run in it."
        )
    current = _as_recorded(seed, settings)
    reused: dict[str, Any] = {
        "from": str(source_paths.out),
        "data": False,
        "experts": [],
        "multitask": False,
        "gates": [],
    }
    source_timings = read_json(source_paths.out / TIMINGS_JSON)
    timings: dict[str, Any] = {}
    if _same(recorded, current, DATA_FIELDS) and _finished(source_paths.data, "manifest.json"):
        _link_tree(source_paths.data, out_paths.data)
        reused["data"] = True
        _keep(timings, source_timings, "data")
    if reused["data"] and _same(recorded, current, EXPERT_FIELDS):
        for domain in settings.domains:
            if _finished(source_paths.expert(domain), "adapter_config.json"):
                _link_tree(source_paths.expert(domain), out_paths.expert(domain))
                reused["experts"].append(domain)
        if reused["experts"]:
            each = source_timings.get("experts", {}).get("each", {})
            timings["experts"] = {
                "each": {d: each[d] for d in reused["experts"] if d in each},
                **(
                    {k: v for k, v in source_timings.get("experts", {}).items() if k != "each"}
                    if len(reused["experts"]) == len(settings.domains)
                    else {}
                ),
            }
    if (
        settings.multitask
        and reused["data"]
        and _same(recorded, current, MULTITASK_FIELDS)
        and _finished(source_paths.multitask, "adapter_config.json")
    ):
        _link_tree(source_paths.multitask, out_paths.multitask)
        reused["multitask"] = True
        _keep(timings, source_timings, MULTITASK)
    if set(reused["experts"]) == set(settings.domains) and _same(recorded, current, GATE_FIELDS):
        old = {c["name"]: recorded_candidate(c) for c in recorded.get("gate_candidates", [])}
        each = source_timings.get("gates", {}).get("each", {})
        for candidate in current["gate_candidates"]:
            name = candidate["name"]
            gate = source_paths.gate(name)
            if old.get(name) == candidate and _finished(gate, CONFIG_NAME):
                _link_tree(gate, out_paths.gate(name))
                reused["gates"].append(name)
        if reused["gates"]:
            timings["gates"] = {"each": {n: each[n] for n in reused["gates"] if n in each}}
            dev_scores = _dev_scores(source_paths.out, reused["gates"])
            if dev_scores:  # same gate files, same dev files: the selection keeps them
                write_text_atomic(
                    out_paths.out / DEV_SCORES_JSON, json.dumps(dev_scores, indent=2) + "\n"
                )
    out_paths.out.mkdir(parents=True, exist_ok=True)
    check_run_settings(out_paths.out, seed, settings)  # writes the new run.json
    write_text_atomic(out_paths.out / TIMINGS_JSON, json.dumps(timings, indent=2) + "\n")
    write_text_atomic(out_paths.out / REUSED_JSON, json.dumps(reused, indent=2) + "\n")
    logger.info(
        "reused from %s: data %s, experts %s, multitask LoRA %s, gates %s",
        source_paths.out,
        "yes" if reused["data"] else "no",
        reused["experts"] or "none",
        "yes" if reused["multitask"] else "no",
        reused["gates"] or "none",
    )
    return reused


def _dev_scores(source: Path, gates: list[str]) -> dict[str, Any]:
    """The dev scores `source` computed for `gates` (from its dev-score record, or from
    its selection record), by gate name."""
    from loramix.science.pipeline import SELECTION_JSON

    scores = read_json(source / DEV_SCORES_JSON)
    selected = read_json(source / SELECTION_JSON).get("candidates", {})
    for name, record in selected.items():
        if name not in scores and isinstance(record, dict) and "dev_nll" in record:
            scores[name] = record["dev_nll"]
    return {name: scores[name] for name in gates if name in scores}


def _as_recorded(seed: int, settings: RetrainSettings) -> dict[str, Any]:
    """The settings as run.json holds them (tuples as lists, dataclasses as dicts)."""
    return json.loads(json.dumps({"seed": seed, **dataclasses.asdict(settings)}))


def _same(recorded: dict[str, Any], current: dict[str, Any], fields: tuple[str, ...]) -> bool:
    return all(recorded.get(field) == current.get(field) for field in fields)


def _finished(folder: Path, marker: str) -> bool:
    return (folder / marker).is_file()


def _keep(timings: dict[str, Any], source: dict[str, Any], step: str) -> None:
    if step in source:
        timings[step] = source[step]


def _link_tree(source: Path, dest: Path) -> None:
    """Hard-link every file of `source` into `dest` (copy where linking fails)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, dest, copy_function=_link_or_copy)


def _link_or_copy(source: str, dest: str) -> None:
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)
