"""Start a retrain run from another run's finished work.

`reuse_run(source, out, seed, settings)` fills a new run folder with every output of the
finished or partial run in `source` that the new settings would reproduce: the data when
the seed, domains and split sizes match; each expert and the multitask LoRA when their
training settings match too; each multitask candidate (`s4000`) that the source trained,
as a candidate or as its own multitask LoRA of that schedule; each gate candidate whose own
settings (and the gate's shared ones) match. Gate selection and the evaluation always run
again, since they depend on every candidate. So trying more gate settings costs the gates,
not the experts:

    loramix science retrain --out runs/retrain-2 --reuse runs/retrain

Several runs may be named (`--reuse runs/a runs/b`): each later one fills in what the ones
before left out, such as a multitask LoRA of another schedule, when its data files are the
same.

Nothing in `source` changes. Files are hard-linked (copied where links are not possible):
`retrain` never writes into a finished step's folder, and every file it writes is written
atomically (a new file renamed over the old), which replaces a link instead of writing
through it. The links are made in a staging folder beside `out` and renamed into place, so
an interrupted call leaves no half-linked step behind. The dev scores of reused gates come
along (`dev_scores.json`: the same gate files on the same dev files), so the selection
scores only the new candidates. What was reused, what was not and why (the settings that
differ), and the times the reused steps took in `source` (marked "reused_from") are kept in
`OUT/reused.json` and `OUT/timings.json`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loramix.atomic import write_text_atomic
from loramix.config import CONFIG_NAME
from loramix.science.multitask_choice import candidate_folder, parse_candidate
from loramix.science.pipeline import (
    MULTITASK,
    MULTITASK_CANDIDATES,
    SELECTION_JSON,
    RetrainPaths,
    RetrainSettings,
)
from loramix.science.retrain_jobs import (
    DEV_SCORES_JSON,
    REUSED_JSON,
    RUN_JSON,
    TIMINGS_JSON,
    check_run_settings,
    read_json,
    recorded_run,
    run_record,
)

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
    "keep_best",
    "lr_scheduler",
    "batch_size",
    "max_length",
    "train_dtype",
)
MULTITASK_FIELDS = EXPERT_FIELDS + ("multitask", "multitask_lr")
# A multitask candidate's name spells its steps and keep_best.
CANDIDATE_FIELDS = tuple(f for f in MULTITASK_FIELDS if f not in ("expert_steps", "keep_best"))
GATE_FIELDS = EXPERT_FIELDS + ("gate_size", "layerwise")


def reuse_run(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    seed: int,
    settings: RetrainSettings,
) -> dict[str, Any]:
    """Link the reusable outputs of the run in `source` into the new run folder `out`; see
    the module docstring.

    `source` may name several runs: each later one fills in only what the ones before left
    out, and only when its data files (`*.jsonl`) are the same bytes as those already linked
    (and, for its gates, its experts too). Each reused job's time in `timings.json` says
    which run it was timed in ("reused_from").

    Returns:
        What was reused from the first source: {"from", "data", "experts", "multitask",
        "multitask_candidates", "gates", "not_reused"}, and under "also" the same record of
        each later source: "multitask_candidates" maps each reused candidate to its folder in
        that source; "not_reused" names, per step left out, the settings that differ
        (`seed: 3 -> 0`).

    Raises:
        FileNotFoundError: If a source holds no run (no run.json).
        FileExistsError: If `out` already holds a run (resume it without `--reuse`).
        ValueError: If a source is `out` itself, or none is given.
    """
    names = [source] if isinstance(source, str | os.PathLike) else list(source)
    out_paths = RetrainPaths(Path(out))
    if not names:
        raise ValueError("--reuse: name one or more finished runs' folders.")
    sources = []
    for name in names:
        source_paths = RetrainPaths(Path(name))
        recorded = recorded_run(source_paths.out / RUN_JSON)
        if not recorded:
            raise FileNotFoundError(
                f"{source_paths.out / RUN_JSON}: missing or unreadable; --reuse takes the "
                "folder of an earlier retrain run (its --out)."
            )
        if out_paths.out.resolve() == source_paths.out.resolve():
            raise ValueError(f"--reuse {name}: that is the run's own folder; give another --out.")
        sources.append((source_paths, recorded))
    if out_paths.out.exists() and any(out_paths.out.iterdir()):
        raise FileExistsError(
            f"{out_paths.out} is not empty; --reuse starts a new run folder. Give another "
            "--out, or run without --reuse to resume the run in it."
        )
    created = not out_paths.out.exists()
    staging = out_paths.out.with_name(f".{out_paths.out.name}.reusing")
    shutil.rmtree(staging, ignore_errors=True)  # a leftover of an interrupted call
    try:
        records = [
            _link_reusable(source_paths, RetrainPaths(staging), recorded, seed, settings)
            for source_paths, recorded in sources
        ]
        reused = {**records[0], **({"also": records[1:]} if len(records) > 1 else {})}
        write_text_atomic(staging / REUSED_JSON, json.dumps(reused, indent=2) + "\n")
        out_paths.out.mkdir(parents=True, exist_ok=True)
        for item in staging.iterdir():  # each a complete tree: a rename each
            item.rename(out_paths.out / item.name)
    except BaseException:
        if created:
            shutil.rmtree(out_paths.out, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    check_run_settings(out_paths.out, seed, settings)  # writes the new run.json
    for record in records:
        logger.info(
            "reused from %s: data %s, experts %s, multitask LoRA %s%s, gates %s%s",
            record["from"],
            "yes" if record["data"] else "no",
            record["experts"] or "none",
            "yes" if record["multitask"] else "no",
            "".join(
                f", multitask {n} (its {f})" for n, f in record["multitask_candidates"].items()
            ),
            record["gates"] or "none",
            "".join(f"; {step} not reused ({why})" for step, why in record["not_reused"].items()),
        )
    return reused


def _link_reusable(
    source: RetrainPaths,
    out: RetrainPaths,
    recorded: dict[str, Any],
    seed: int,
    settings: RetrainSettings,
) -> dict[str, Any]:
    """Link what `settings` would reproduce from `source` into `out` (a staging folder) and
    is not there yet (from an earlier source), with their times in `timings.json` (marked
    "reused_from") and their dev scores in `dev_scores.json`; return what was linked."""
    from loramix.science.selection import recorded_candidate
    from loramix.training.outputs import folder_digest

    current = run_record(seed, settings)
    reused: dict[str, Any] = {
        "from": str(source.out.resolve()),
        "data": False,
        "experts": [],
        "multitask": False,
        "multitask_candidates": {},
        "gates": [],
        "not_reused": {},
    }
    source_timings = read_json(source.out / TIMINGS_JSON)
    timings: dict[str, Any] = {}

    def matches(step: str, fields: tuple[str, ...]) -> bool:
        differ = [f for f in fields if recorded.get(f) != current.get(f)]
        if differ:
            reused["not_reused"][step] = ", ".join(
                f"{f}: {recorded.get(f)!r} -> {current.get(f)!r}" for f in differ
            )
        return not differ

    def keep_time(step: str, record: Any) -> None:
        if isinstance(record, dict):
            timings[step] = {**record, "reused_from": reused["from"]}

    out.out.mkdir(parents=True, exist_ok=True)
    same_data = matches("data", DATA_FIELDS) and _finished(source.data, "manifest.json")
    if same_data and _finished(out.data, "manifest.json"):  # from an earlier source
        same_data = _data_digest(source.data) == _data_digest(out.data)
        if not same_data:
            reused["not_reused"]["data"] = f"its *.jsonl files differ from those in {out.data}"
    elif same_data:
        _link_tree(source.data, out.data)
        reused["data"] = True
        keep_time("data", source_timings.get("data"))
    if same_data and matches("experts", EXPERT_FIELDS):
        for domain in settings.domains:
            if (
                _finished(source.expert(domain), "adapter_config.json")
                and not out.expert(domain).exists()
            ):
                _link_tree(source.expert(domain), out.expert(domain))
                reused["experts"].append(domain)
        record = source_timings.get("experts", {})
        each = record.get("each", {}) if isinstance(record, dict) else {}
        if len(reused["experts"]) == len(settings.domains):
            keep_time("experts", record)
        elif reused["experts"]:  # the others train in the new run; their times add up
            timings["experts"] = {"each": {d: each[d] for d in reused["experts"] if d in each}}
    if (
        settings.multitask
        and same_data
        and matches(MULTITASK, MULTITASK_FIELDS)
        and _finished(source.multitask, "adapter_config.json")
        and not out.multitask.exists()
    ):
        _link_tree(source.multitask, out.multitask)
        reused["multitask"] = True
        keep_time(MULTITASK, source_timings.get(MULTITASK))
    if (
        settings.multitask_candidates
        and same_data
        and matches(MULTITASK_CANDIDATES, CANDIDATE_FIELDS)
    ):
        _link_candidates(source, out, recorded, settings, reused, source_timings, timings)
    same_experts = set(reused["experts"]) == set(settings.domains) or (
        same_data
        and all(
            _finished(source.expert(d), "adapter_config.json")
            and _finished(out.expert(d), "adapter_config.json")
            and folder_digest(source.expert(d)) == folder_digest(out.expert(d))
            for d in settings.domains
        )
    )
    if same_experts and matches("gates", GATE_FIELDS):
        old = {
            c.get("name"): recorded_candidate(c)
            for c in recorded.get("gate_candidates", [])
            if isinstance(c, dict)
        }
        for candidate in current["gate_candidates"]:
            name = candidate["name"]
            if (
                old.get(name) == candidate
                and _finished(source.gate(name), CONFIG_NAME)
                and not out.gate(name).exists()
            ):
                _link_tree(source.gate(name), out.gate(name))
                reused["gates"].append(name)
        if reused["gates"]:
            each = source_timings.get("gates", {}).get("each", {})
            timings["gates"] = {
                "each": {n: each[n] for n in reused["gates"] if n in each},
                "reused_from": reused["from"],
            }
            scores = _dev_scores(source, reused["gates"])
            if scores:  # the same gate files on the same dev files: the selection keeps them
                scores = {**read_json(out.out / DEV_SCORES_JSON), **scores}
                write_text_atomic(out.out / DEV_SCORES_JSON, json.dumps(scores, indent=2) + "\n")
    _add_timings(out.out / TIMINGS_JSON, timings)
    return reused


def _add_timings(path: Path, timings: dict[str, Any]) -> None:
    """Add a source's `timings` to those in `path` (an earlier source's): new steps, and the
    jobs of a step's "each" that `path` lacks."""
    merged = read_json(path)
    for step, record in timings.items():
        before = merged.get(step)
        if isinstance(before, dict) and isinstance(before.get("each"), dict):
            before["each"] = {**record.get("each", {}), **before["each"]}
        elif before is None:
            merged[step] = record
    write_text_atomic(path, json.dumps(merged, indent=2) + "\n")


def _link_candidates(
    source: RetrainPaths,
    out: RetrainPaths,
    recorded: dict[str, Any],
    settings: RetrainSettings,
    reused: dict[str, Any],
    source_timings: dict[str, Any],
    timings: dict[str, Any],
) -> None:
    """Link each multitask candidate of `settings` that `source` trained: as a candidate of
    its own, or as its own multitask LoRA when that had the candidate's schedule (`s4000`
    from a run of 8 domains x 500 expert steps, trained to its end). Records the source
    folder per candidate in `reused` and their times in `timings`."""
    try:
        own = (len(recorded["domains"]) * recorded["expert_steps"], recorded["keep_best"])
    except (KeyError, TypeError):
        own = None
    earlier = source_timings.get(MULTITASK_CANDIDATES, {})
    earlier = earlier.get("each", {}) if isinstance(earlier, dict) else {}
    each: dict[str, Any] = {}  # folder -> its time, marked with the run it was timed in
    for name in settings.multitask_candidates:
        folder = candidate_folder(name)
        if out.expert(folder).exists():  # from an earlier source
            continue
        if _finished(source.expert(folder), "adapter_config.json"):
            _link_tree(source.expert(folder), out.expert(folder))
            reused["multitask_candidates"][name] = folder
            record = earlier.get(folder)
            if isinstance(record, dict):  # its own "reused_from", if it has one, wins
                each[folder] = {"reused_from": reused["from"], **record}
        elif parse_candidate(name) == own and _finished(source.multitask, "adapter_config.json"):
            _link_tree(source.multitask, out.expert(folder))
            reused["multitask_candidates"][name] = MULTITASK
            job = source_timings.get(MULTITASK, {})
            job = job.get("job") if isinstance(job, dict) else None
            if isinstance(job, dict):
                each[folder] = {"reused_from": reused["from"], **job}
    if each:
        timings[MULTITASK_CANDIDATES] = {"each": each}


def _dev_scores(source: RetrainPaths, gates: list[str]) -> dict[str, Any]:
    """`dev_scores.json` entries for the reused `gates`: the source's own (made for the
    same gate files), or, for a run made before that file existed, the scores in its
    selection record with the digest of the gate files they were made for."""
    from loramix.science.selection import valid_score_entry
    from loramix.training.outputs import folder_digest

    scores = read_json(source.out / DEV_SCORES_JSON)
    selected = read_json(source.out / SELECTION_JSON).get("candidates", {})
    found = {}
    for name in gates:
        if valid_score_entry(scores.get(name)):
            found[name] = scores[name]
        elif isinstance(selected.get(name), dict) and "dev_nll" in selected[name]:
            entry = {
                "gate_digest": folder_digest(source.gate(name)),
                "dev_nll": selected[name]["dev_nll"],
            }
            if valid_score_entry(entry):
                found[name] = entry
    return found


def _data_digest(folder: Path) -> dict[str, str]:
    """The SHA-256 of each data file (`*.jsonl`) in `folder`; the manifest, which also records
    the library versions that made them, is left out."""
    from loramix.training.outputs import file_digest

    return {path.name: file_digest(path) for path in sorted(folder.glob("*.jsonl"))}


def _finished(folder: Path, marker: str) -> bool:
    return (folder / marker).is_file()


def _link_tree(source: Path, dest: Path) -> None:
    """Hard-link every file of `source` into `dest` (copy where linking fails)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, dest, copy_function=_link_or_copy)  # into the staging folder


def _link_or_copy(source: str, dest: str) -> None:
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)
