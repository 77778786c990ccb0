"""Write the science case study's JSON Lines files, deterministically and atomically.

`write_datasets(out_dir, seed, n_train, n_test)` writes, for each domain D in `DOMAINS`:

    D_train.jsonl, D_dev.jsonl, D_test.jsonl
                                  the domain's tasks in turn (balanced); no prompt in two
                                  splits. Dev is for every choice of settings, test is read
                                  once, for the final report.
    composite_{dev,test}.jsonl    cross-domain questions (`composite.tasks_for` the domains),
                                  in no training file, no prompt in both; not written when
                                  no composite task chains two of the domains
    mixed_{dev,test}.jsonl        n_dev / n_test examples drawn evenly from the domain files
    manifest.json                 seed, sizes, tasks and the library versions that made them

Each domain draws its test split first, then train, then dev, so adding the dev split left
the test and training files of earlier runs unchanged.

Each record is an `Example` ({"prompt", "completion", "domain", "task", "answer"}), which
`loramix.training.data` reads as a prompt/completion pair. Every random draw comes from a
`random.Random` seeded by (seed, domain), so the same seed gives byte-identical files.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path

from loramix.atomic import write_text_atomic
from loramix.science import composite
from loramix.science.registry import COMPOSITE, DOMAINS, TASKS
from loramix.science.task import Example, Task

logger = logging.getLogger(__name__)

MAX_DRAWS_PER_EXAMPLE = 200  # redraws allowed to find a prompt not seen before
LIBRARIES = ("biopython", "periodictable", "pint", "sympy", "z3-solver", "rdkit", "tblite")


def draw_unique(tasks: Sequence[Task], rng: random.Random, n: int, seen: set[str]) -> list[Example]:
    """Draw `n` examples, cycling through `tasks`, whose prompts are not in `seen`.

    Adds the new prompts to `seen`.

    Raises:
        ValueError: If a task runs out of new prompts; the message names it.
    """
    examples = []
    for i in range(n):
        task = tasks[i % len(tasks)]
        for _ in range(MAX_DRAWS_PER_EXAMPLE):
            example = task.sample(rng)
            if example["prompt"] not in seen:
                break
        else:
            raise ValueError(
                f"task {task.domain}/{task.name} found no new prompt in "
                f"{MAX_DRAWS_PER_EXAMPLE} draws after {i} examples; ask for fewer examples "
                "(n_train, n_test)"
            )
        seen.add(example["prompt"])
        examples.append(example)
    return examples


def write_datasets(
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    n_train: int = 1000,
    n_test: int = 100,
    *,
    n_dev: int | None = None,
    n_composite: int | None = None,
    domains: Sequence[str] = DOMAINS,
) -> dict[str, Path]:
    """Write the train/dev/test files of each domain, the composite and the mixed files.

    Args:
        out_dir: The folder to write into (created if missing); files there are replaced.
        seed: The seed of every draw.
        n_train: Training examples per domain.
        n_test: Test examples per domain, and in `mixed_test.jsonl`.
        n_dev: Dev examples per domain, and in `mixed_dev.jsonl` (default: n_test).
        n_composite: Examples in `composite_test.jsonl` and `composite_dev.jsonl`
            (default: n_test).
        domains: The domains to write, a subset of `DOMAINS`.

    Returns:
        File name -> path of every file written.

    Raises:
        ValueError: If a size is not positive or a domain is unknown (nothing is written).
    """
    n_dev = n_test if n_dev is None else n_dev
    n_composite = n_test if n_composite is None else n_composite
    _validate(n_train=n_train, n_test=n_test, n_dev=n_dev, n_composite=n_composite, domains=domains)

    files: dict[str, list[Example]] = {}
    for domain in domains:
        seen: set[str] = set()
        rng = random.Random(f"loramix.science:{seed}:{domain}")
        files[f"{domain}_test.jsonl"] = draw_unique(TASKS[domain], rng, n_test, seen)
        files[f"{domain}_train.jsonl"] = draw_unique(TASKS[domain], rng, n_train, seen)
        files[f"{domain}_dev.jsonl"] = draw_unique(TASKS[domain], rng, n_dev, seen)

    rng = random.Random(f"loramix.science:{seed}:{COMPOSITE}")
    seen = set()
    held_out = composite.tasks_for(domains)
    if held_out:  # no composite files for domains that no composite task chains
        files["composite_test.jsonl"] = draw_unique(held_out, rng, n_composite, seen)
        files["composite_dev.jsonl"] = draw_unique(held_out, rng, n_composite, seen)
    rng = random.Random(f"loramix.science:{seed}:mixed")
    files["mixed_test.jsonl"] = _mix([files[f"{d}_test.jsonl"] for d in domains], n_test, rng)
    rng = random.Random(f"loramix.science:{seed}:mixed-dev")
    files["mixed_dev.jsonl"] = _mix([files[f"{d}_dev.jsonl"] for d in domains], n_dev, rng)
    check_disjoint(files)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, examples in files.items():
        text = "".join(json.dumps(ex, ensure_ascii=True) + "\n" for ex in examples)
        paths[name] = write_text_atomic(out / name, text)
    manifest = {
        "seed": seed,
        "n_train": n_train,
        "n_test": n_test,
        "n_dev": n_dev,
        "n_composite": n_composite,
        "tasks": {
            **{d: [t.name for t in TASKS[d]] for d in domains},
            COMPOSITE: [t.name for t in held_out],
        },
        "files": {name: len(examples) for name, examples in files.items()},
        "versions": {lib: importlib.metadata.version(lib) for lib in LIBRARIES},
    }
    paths["manifest.json"] = write_text_atomic(
        out / "manifest.json", json.dumps(manifest, indent=2) + "\n"
    )
    logger.info("wrote %d science data files to %s", len(paths), out)
    return paths


def check_disjoint(files: dict[str, list[Example]]) -> None:
    """Refuse split files that share prompts across splits (train, dev, test).

    The mixed files repeat domain prompts of their own split, which is allowed.

    Raises:
        RuntimeError: Naming the two files, if a prompt is in two splits.
    """
    splits: dict[str, dict[str, str]] = {}  # split -> prompt -> file
    for name, examples in files.items():
        split = name.removesuffix(".jsonl").rsplit("_", 1)[-1]
        splits.setdefault(split, {}).update({e["prompt"]: name for e in examples})
    names = sorted(splits)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            shared = splits[first].keys() & splits[second].keys()
            if shared:
                prompt = min(shared)
                raise RuntimeError(
                    f"{splits[first][prompt]} and {splits[second][prompt]} share the prompt "
                    f"{prompt!r}; splits must be disjoint (this is a bug)"
                )


def _validate(
    *, n_train: int, n_test: int, n_dev: int, n_composite: int, domains: Sequence[str]
) -> None:
    sizes = (
        ("n_train", n_train),
        ("n_test", n_test),
        ("n_dev", n_dev),
        ("n_composite", n_composite),
    )
    problems = [
        f"{name}={value} must be a positive integer"
        for name, value in sizes
        if not isinstance(value, int) or value < 1
    ]
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown or not domains:
        problems.append(f"domains={list(domains)}: choose one or more of {list(DOMAINS)}")
    for name, value in (("n_test", n_test), ("n_dev", n_dev)):
        if isinstance(value, int) and 0 < value < len(domains):
            problems.append(
                f"{name}={value} is smaller than the {len(domains)} domains; "
                "the mixed file needs at least one example of each"
            )

    if problems:
        raise ValueError("cannot write the science data: " + "; ".join(problems))


def _mix(tests: Sequence[list[Example]], n: int, rng: random.Random) -> list[Example]:
    """n examples, an even share (first domains get the remainder) from each test list."""
    share, extra = divmod(n, len(tests))
    mixed = [ex for i, test in enumerate(tests) for ex in test[: share + (i < extra)]]
    rng.shuffle(mixed)
    return mixed
