"""X-LoRA over bases of different precisions: weight memory, peak memory, forward and
generation speed as ratios to the same base alone, in one run.

Setup: a random-weight model with SmolLM2-135M's shape (benchmarks/common.py) loaded as
`float32` or quantized by bitsandbytes (`nf4`, `fp4`: 4-bit with float32 compute; `int8`),
through transformers' `from_pretrained` as a user would; `bfloat16` loads the same weights in
bfloat16. 8 random rank-8 experts on all seven projections (float32 files). Forward: batch 1 x
`--prompt-tokens`, X-LoRA time over the base's. Generation: `--new-tokens` greedy tokens after
the prompt, tokens/s over the base's, granular and frozen modes (merged where the base is not
quantized; it is refused on quantized bases). Each configuration runs `--repeats` times,
interleaved; ratios use best times. Peak memory: growth of the resident set during one X-LoRA
granular generate call (as benchmarks/generate.py measures it), plus the weights.

    PYTHONPATH=. .venv/bin/python benchmarks/precision.py                  # float32 and nf4
    PYTHONPATH=. .venv/bin/python benchmarks/precision.py --bases float32 bfloat16 nf4 int8
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as benchmarks/generate.py; see there

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import make_experts, random_base  # noqa: E402
from generate import measure, weight_bytes  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from loramix import XLoraConfig, XLoraModel  # noqa: E402

QUANTIZED = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}
FLOAT = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def loader(kind: str, folder: Path) -> Callable[[], torch.nn.Module]:
    """Loads the saved random base in precision `kind`."""
    if kind in FLOAT:
        return lambda: AutoModelForCausalLM.from_pretrained(folder, dtype=FLOAT[kind]).eval()
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(**QUANTIZED[kind])
    return lambda: AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=config, device_map="cpu"
    ).eval()


def best(fn: Callable[[], object], repeats: int) -> tuple[float, int]:
    """(best seconds, largest peak RSS growth) over `repeats` runs."""
    runs = [measure(fn)[:2] for _ in range(repeats)]
    return min(s for s, _ in runs), max(m for _, m in runs)


def bench(kind: str, folder: Path, adapters: dict[str, str], args: argparse.Namespace) -> dict:
    load = loader(kind, folder)
    base = load()
    base.generation_config.eos_token_id = None
    model = XLoraModel(load(), XLoraConfig(adapters=adapters))
    model.generation_config.eos_token_id = None
    torch.manual_seed(1)
    with torch.no_grad():
        torch.nn.init.normal_(model.gate.layers[-1].weight, std=0.05)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, base.config.vocab_size, (1, args.prompt_tokens), generator=generator)
    gen = dict(max_new_tokens=args.new_tokens, do_sample=False)
    runs = {
        "base forward": lambda: base(input_ids=ids).logits,
        "X-LoRA forward": lambda: model(input_ids=ids).logits,
        "base generate": lambda: base.generate(ids, **gen),
        "granular": lambda: model.generate(ids, scalings_mode="granular", **gen),
        "frozen": lambda: model.generate(ids, scalings_mode="frozen", **gen),
    }
    if kind in FLOAT:
        runs["merged"] = lambda: model.generate(ids, scalings_mode="merged", **gen)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    memory: dict[str, int] = {}
    with torch.inference_mode():
        for run in runs.values():  # warm-up
            run()
        for _ in range(args.repeats):  # interleaved
            for name, run in runs.items():
                took, grown = best(run, 1)
                seconds[name].append(took)
                memory[name] = max(memory.get(name, 0), grown)
    t = {name: min(values) for name, values in seconds.items()}
    result = dict(
        base=kind,
        base_weights_mib=weight_bytes(base) / 2**20,
        xlora_weights_mib=weight_bytes(model) / 2**20,
        base_forward_s=t["base forward"],
        forward_x_base=t["X-LoRA forward"] / t["base forward"],
        base_tokens_per_s=args.new_tokens / t["base generate"],
        peak_rss_growth_mib=memory["granular"] / 2**20,
        base_peak_rss_growth_mib=memory["base generate"] / 2**20,
    )
    for mode in ("granular", "frozen", "merged"):
        if mode in t:
            result[f"{mode}_x_base"] = t["base generate"] / t[mode]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bases", nargs="+", default=["float32", "nf4"])
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    unknown = [b for b in args.bases if b not in FLOAT and b not in QUANTIZED]
    if unknown:
        parser.error(f"--bases {unknown}: choose from {sorted(FLOAT) + sorted(QUANTIZED)}")
    torch.set_num_threads(args.threads)
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()}")
    adapters = make_experts(args.experts, args.rank)
    results = []
    with tempfile.TemporaryDirectory(prefix="loramix-precision-") as tmp:
        random_base().save_pretrained(tmp)
        for kind in args.bases:
            results.append(bench(kind, Path(tmp), adapters, args))
            print(json.dumps(results[-1]))
    print()
    header = (
        f"{'base':<9} {'weights MiB':>11} {'+experts':>8} {'peak +MiB':>9} {'fwd x base':>10} "
        f"{'granular':>8} {'frozen':>7} {'merged':>7}"
    )
    print(f"prompt {args.prompt_tokens}, {args.new_tokens} new tokens, generation as x base tok/s")
    print(header)
    print("-" * len(header))
    for r in results:
        merged = f"{r['merged_x_base']:.2f}" if "merged_x_base" in r else "refused"
        print(
            f"{r['base']:<9} {r['base_weights_mib']:>11.0f} "
            f"{r['xlora_weights_mib'] - r['base_weights_mib']:>8.1f} "
            f"{r['peak_rss_growth_mib']:>9.0f} {r['forward_x_base']:>10.2f} "
            f"{r['granular_x_base']:>8.2f} {r['frozen_x_base']:>7.2f} {merged:>7}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
