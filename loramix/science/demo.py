"""The main job: the bundled science X-LoRA answers questions from every domain, and is scored.

`run_demo` loads SmolLM2-135M-Instruct and the bundled experts and gate
(`models/science-xlora`, float16 weights converted to the base model's dtype, float32
unless `dtype` says otherwise; the gate computes in float32), then:

1. answers one held-out question of each domain and one composite question, greedily, and
   returns every answer token with the expert that dominates it (the largest scaling, averaged
   over the adapted modules, of the forward call that wrote the token, as
   `loramix generate --show-experts` colours them) and the verdict of the domain library's
   verifier;
2. reads the bundle's full evaluation verdicts (its `eval.json`, written by the retrain on
   every held-out example): these say whether the targets are met;
3. scores base, their uniform average and X-LoRA on the first `n_eval` examples of every
   test set, and each expert on those of its own domain, the composite and the mixed set (as
   the retrain's report does): a sample that shows the evaluation running here, too small to
   judge the targets on, so it carries no pass/fail;
4. writes the heatmaps of the scalings (per layer and per token, for each question and its
   answer; expert usage per test set) into the output folder.

The test sets are regenerated from the seed and sizes recorded in the bundle's
`retrain.json`, so they are the held-out sets of the run that trained the bundle.
Library code does not print: progress goes to `log`, results come back as `DemoResult`, and
the CLI (`loramix science demo`) renders them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from loramix.science.bundle import DEFAULT_BUNDLE, RETRAIN_JSON
from loramix.science.pipeline import MIXED, read_json
from loramix.science.registry import COMPOSITE, DOMAINS

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from loramix.evaluation.report import EvalReport, TargetCheck
    from loramix.evaluation.runner import EvalExample
    from loramix.model import XLoraModel

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path("runs/demo")


@dataclass(frozen=True)
class Answer:
    """One question answered by X-LoRA.

    Attributes:
        test_set: The test set the question comes from (a domain, or "composite").
        prompt: The question.
        reference: The reference answer.
        text: The generated answer (special tokens removed).
        token_ids: The generated tokens, without the end-of-sequence token.
        experts: `(N,)` for each generated token, the index of the expert with the largest
            scaling (averaged over the adapted modules) in the forward call that wrote it.
        correct: The verifier's verdict.
    """

    test_set: str
    prompt: str
    reference: str
    text: str
    token_ids: list[int]
    experts: list[int]
    correct: bool


@dataclass
class DemoResult:
    """What `run_demo` made.

    Attributes:
        expert_names: The E axis (index -> expert), for the token colours.
        answers: One answer per domain and one composite answer.
        report: The sample evaluation (first `n_eval` examples per set), or None if `n_eval`
            was 0. It has no verdicts: too few examples to judge the targets on.
        verdicts: The targets as the bundle's full evaluation (`eval.json`) checked them;
            empty if the folder has none.
        verdict_examples: Held-out examples per test set behind `verdicts` (the smallest
            count over the sets), or None.
        plots: The PNG files written.
        seconds: Wall time of each part.
    """

    expert_names: list[str]
    answers: list[Answer]
    report: EvalReport | None
    verdicts: list[TargetCheck]
    verdict_examples: int | None
    plots: list[Path]
    seconds: dict[str, float] = field(default_factory=dict)


def run_demo(
    model_dir: str | os.PathLike[str] = DEFAULT_BUNDLE,
    out_dir: str | os.PathLike[str] = DEFAULT_OUT,
    *,
    base: str = "smollm2",
    n_eval: int = 4,
    max_new_tokens: int = 16,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    log: Callable[[str], None] = logger.info,
) -> DemoResult:
    """Answer, evaluate and draw with the bundled science X-LoRA (see the module docstring).

    Args:
        model_dir: The X-LoRA folder (default: the repository's bundle).
        out_dir: Where the test data, `eval.json`/`eval.md` and the heatmaps go.
        base: The base model the bundle was trained on.
        n_eval: Examples per test set in the quick evaluation; 0 skips it.
        max_new_tokens: Greedy tokens per answer.
        dtype: Weights of the base model and the experts (the gate stays float32).
        device: Where the model runs ("auto", "cpu", "cuda", "mps").
        log: Receives one line per finished part (the CLI prints them).

    Raises:
        FileNotFoundError: If `model_dir` is not an X-LoRA folder (the message says how to
            make one).
    """
    from loramix.config import CONFIG_NAME
    from loramix.evaluation.plots import write_eval_plots
    from loramix.evaluation.runner import BASE, UNIFORM, XLORA, evaluate, load_test_set
    from loramix.model import XLoraModel
    from loramix.science.final_eval import score_experts_on_their_sets
    from loramix.science.targets import science_verifier
    from loramix.smollm2 import load_base_model

    model_dir, out = Path(model_dir), Path(out_dir)
    if not (model_dir / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"{model_dir} holds no {CONFIG_NAME}, so it is not an X-LoRA model. Use the "
            "repository's bundle (models/science-xlora), or make one with "
            "`loramix science retrain`."
        )
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    base_model, tokenizer = load_base_model(base, dtype=dtype, device_map=device)
    model = XLoraModel.from_pretrained(base_model, model_dir)
    seconds["load"] = _lap(clock)
    log(
        f"loaded {base} with {model.n_experts} experts ({', '.join(model.expert_names)}) on "
        f"{model.n_layers} adapted modules from {model_dir} in {seconds['load']:.1f} s"
    )

    clock = time.perf_counter()
    test_sets = write_test_sets(model_dir, out / "data", model.expert_names)
    seconds["data"] = _lap(clock)

    clock = time.perf_counter()
    answers = []
    samples: dict[str, list[int]] = {}
    for name in [n for n in test_sets if n != MIXED]:
        example = load_test_set(test_sets[name], tokenizer, chat=False, limit=1)[0]
        answer, ids = answer_question(model, tokenizer, example, name, max_new_tokens)
        answers.append(answer)
        samples[name] = ids
    seconds["answers"] = _lap(clock)
    log(f"answered {len(answers)} questions in {seconds['answers']:.1f} s")

    verdicts, verdict_examples = bundle_verdicts(model_dir)
    report = None
    if n_eval > 0:
        clock = time.perf_counter()
        sets = {name: str(path) for name, path in test_sets.items()}
        options = dict(
            chat=False, verifier=science_verifier, limit=n_eval, max_new_tokens=max_new_tokens
        )
        report = evaluate(model, tokenizer, sets, [BASE, UNIFORM, XLORA], **options)
        experts = score_experts_on_their_sets(model, tokenizer, sets, model.expert_names, options)
        for system, scores in experts.items():
            report.add_system(system, scores)
        report.systems = [BASE, *experts, UNIFORM, XLORA]
        report.settings["systems_on_subsets"] = "expert:<d> on <d>, composite and mixed only"
        report.write(out)  # a sample: no verdicts
        seconds["eval"] = _lap(clock)
        log(f"scored a sample of {n_eval} examples per test set in {seconds['eval']:.1f} s")

    clock = time.perf_counter()
    plots = write_eval_plots(
        model, tokenizer, samples, out, usage=report.usage if report is not None else None
    )
    seconds["plots"] = _lap(clock)
    return DemoResult(
        list(model.expert_names), answers, report, verdicts, verdict_examples, plots, seconds
    )


def bundle_verdicts(model_dir: Path) -> tuple[list[TargetCheck], int | None]:
    """The targets as checked by the bundle's full evaluation, from its `eval.json`.

    Returns:
        The checks (empty without `eval.json`), and the fewest held-out examples of any test
        set behind them (None if not recorded).
    """
    from loramix.evaluation.report import TargetCheck

    recorded = read_json(model_dir / "eval.json")
    checks = [TargetCheck(**entry) for entry in recorded.get("targets", [])]
    counts = [
        score["n_examples"]
        for per_set in recorded.get("scores", {}).values()
        for score in per_set.values()
        if "n_examples" in score
    ]
    return checks, (min(counts) if counts else None)


def write_test_sets(model_dir: Path, data_dir: Path, domains: Sequence[str]) -> dict[str, Path]:
    """Regenerate the bundle's held-out test sets from its `retrain.json` into `data_dir`.

    Falls back to the retrain defaults (seed 0) for a folder without `retrain.json`.

    Returns:
        Test set name -> file: each domain the registry knows, "composite" (when a
        composite task chains two of them) and "mixed". Experts of the bundle that the
        registry does not know get no test set; domains of the registry that the bundle has
        no expert for are left out.
    """
    from loramix.science.datasets import write_datasets
    from loramix.science.pipeline import RetrainSettings

    recorded = read_json(model_dir / RETRAIN_JSON)
    defaults = RetrainSettings()
    settings = recorded.get("settings", {})
    known = [d for d in domains if d in DOMAINS]
    wanted = {
        "seed": int(recorded.get("seed", 0)),
        "n_train": int(settings.get("n_train", defaults.n_train)),
        "n_test": int(settings.get("n_test", defaults.n_test)),
    }
    manifest = read_json(data_dir / "manifest.json")
    if any(manifest.get(key) != value for key, value in wanted.items()):  # missing or stale
        write_datasets(data_dir, domains=known, **wanted)
    from loramix.science.composite import tasks_for

    names = [*known, *([COMPOSITE] if tasks_for(known) else []), MIXED]
    return {name: data_dir / f"{name}_test.jsonl" for name in names}


@torch.no_grad()
def answer_question(
    model: XLoraModel,
    tokenizer: PreTrainedTokenizerBase,
    example: EvalExample,
    test_set: str,
    max_new_tokens: int,
) -> tuple[Answer, list[int]]:
    """Greedy answer to one test example, each token tagged with its dominant expert.

    Returns:
        The answer, and the token ids of prompt and answer (for the heatmaps).
    """
    from loramix.generation import dominant_experts, generated_token_scalings
    from loramix.science.registry import verify

    prompt = example.input_ids[: example.prompt_length]
    ids = torch.tensor([prompt], device=model.device)  # (1, P)
    eos = tokenizer.eos_token_id
    model.clear_scalings_log()
    model.enable_scalings_logging()
    try:
        output = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
            eos_token_id=eos,
        )  # (1, P + N)
        new = output[0, len(prompt) :].tolist()
        scalings = generated_token_scalings(model.get_scalings_log(), len(new))  # (1, N, L, E)
    finally:
        model.disable_scalings_logging()
        model.clear_scalings_log()
    experts = dominant_experts(scalings)[0].tolist()  # (N,)
    while new and new[-1] == eos:
        new.pop()
    text = tokenizer.decode(new, skip_special_tokens=True)
    record = example.record
    answer = Answer(
        test_set=test_set,
        prompt=record["prompt"],
        reference=record["completion"],
        text=text.strip(),
        token_ids=new,
        experts=experts[: len(new)],
        correct=verify(record, text),
    )
    return answer, prompt + new


def _lap(start: float) -> float:
    return round(time.perf_counter() - start, 1)
