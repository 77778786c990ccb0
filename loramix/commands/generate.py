"""`loramix generate`: generate text with an X-LoRA folder; optionally colour tokens by expert.

loramix generate runs/xlora --prompt "What is the pH of pure water?" --chat --show-experts
loramix generate runs/xlora --prompt "..." --mode merged --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, TextIO

from loramix.commands.flags import (
    add_device_argument,
    add_dtype_argument,
    add_progress_argument,
    add_threads_argument,
    apply_threads,
    dtype_from_args,
)
from loramix.errors import UsageError
from loramix.modes import SCALINGS_MODES

# ANSI foreground colours, one per expert (cycled when there are more experts).
PALETTE = (31, 32, 33, 34, 35, 36, 91, 92, 93, 94, 95, 96)
RESET = "\x1b[0m"
COLOUR_CHOICES = ("auto", "always", "never")


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Declare the `generate` subcommand and its flags."""
    parser = subparsers.add_parser(
        "generate",
        help="generate text with an X-LoRA model",
        description=(
            "Generate a continuation of --prompt with an X-LoRA folder written by "
            "XLoraModel.save_pretrained. --mode picks how the experts' scalings are formed: "
            "granular (per token), frozen (fixed per sequence after the prompt) or merged "
            "(fixed and folded into the base weights for the call). --show-experts colours "
            "each generated token by the expert with the largest scaling (averaged over the "
            "adapted modules) when it was written."
        ),
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="an X-LoRA folder (save_pretrained)")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap the prompt as a user turn of the chat template (default: as in training, "
        "from MODEL_DIR/training_args.json; plain if unrecorded)",
    )
    parser.add_argument("--mode", choices=SCALINGS_MODES, default="granular", help="scalings mode")
    parser.add_argument(
        "--freeze-after",
        type=int,
        default=0,
        metavar="K",
        help="frozen/merged: average the first K generated tokens' scalings (0: the prompt's)",
    )
    parser.add_argument(
        "--show-experts", action="store_true", help="colour each token by its dominant expert"
    )
    add_colour_argument(parser)
    parser.add_argument(
        "--base",
        default=None,
        help="'smollm2' (embedded) or a local transformers folder (default: the base recorded "
        "in MODEL_DIR, else smollm2)",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=128, help="tokens to generate at most"
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sampling")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with sampling)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    add_dtype_argument(parser)
    add_device_argument(parser)
    add_threads_argument(parser)
    add_progress_argument(parser)


def run(args: argparse.Namespace) -> int:
    """Load the model, generate, print the continuation (coloured with --show-experts)."""

    from loramix.records import choose_chat

    _check_args(args)
    apply_threads(args)
    model, tokenizer = _load(args.model_dir, args.base, dtype_from_args(args), args.device)
    chat = choose_chat(args.model_dir, args.chat, tokenizer, fallback=False)
    ids = encode_prompt(tokenizer, args.prompt, chat=chat).to(model.device)
    new_ids, experts = _generate(model, tokenizer, ids, args)
    if args.show_experts:
        pieces = token_pieces(tokenizer, new_ids)
        coloured = use_colour(args.colour)
        print(legend(model.expert_names) if coloured else plain_legend(model.expert_names))
        print(colour_tokens(pieces, experts) if coloured else tagged_tokens(pieces, experts))
    return 0


def _check_args(args: argparse.Namespace) -> None:
    problems = []
    if not args.prompt.strip():
        problems.append("--prompt is empty: give the text to continue")
    if args.max_new_tokens < 1:
        problems.append(f"--max-new-tokens={args.max_new_tokens}: use an int >= 1")
    if args.freeze_after < 0:
        problems.append(f"--freeze-after={args.freeze_after}: use an int >= 0")
    elif args.freeze_after > 0 and args.mode == "granular":
        problems.append(
            f"--freeze-after={args.freeze_after} needs --mode frozen or --mode merged (granular "
            "mixes each token afresh and would ignore it); add one or drop --freeze-after"
        )
    if not math.isfinite(args.temperature) or args.temperature < 0:
        problems.append(f"--temperature={args.temperature}: use 0 (greedy) or a number > 0")
    if not 0 < args.top_p <= 1:
        problems.append(f"--top-p={args.top_p}: use a number in (0, 1]")
    if problems:
        raise UsageError("; ".join(problems))


def _load(
    model_dir: str, base_name: str | None, dtype: Any, device: str | None = None
) -> tuple[Any, Any]:
    from pathlib import Path

    from loramix.config import XLoraConfig
    from loramix.model import XLoraModel
    from loramix.records import base_to_load
    from loramix.smollm2 import load_base_model

    if not Path(model_dir).is_dir():
        raise FileNotFoundError(
            f"{model_dir}: no such folder; MODEL_DIR is a folder written by "
            "XLoraModel.save_pretrained (e.g. by `loramix train-gate`)"
        )
    XLoraConfig.from_file(model_dir)  # a bad folder fails before the base model loads
    base, tokenizer = load_base_model(base_to_load(model_dir, base_name), dtype, device_map=device)
    return XLoraModel.from_pretrained(base, model_dir), tokenizer


def encode_prompt(tokenizer: Any, prompt: str, chat: bool) -> Any:
    """`(1, T)` prompt ids; with `chat`, the prompt as a user turn plus the assistant header."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError("--chat: this tokenizer has no chat template; pass --no-chat")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    ids = tokenizer(prompt, return_tensors="pt").input_ids  # (1, T)
    if ids.shape[1] == 0:
        raise UsageError(f"--prompt {prompt!r} gives no tokens; give some text to continue")
    return ids


def _generate(model: Any, tokenizer: Any, ids: Any, args: argparse.Namespace) -> tuple[list, list]:
    """Generated token ids and, with --show-experts, each token's dominant expert index."""
    import torch
    from transformers import TextStreamer

    from loramix.generation import dominant_experts, generated_token_scalings

    eos = tokenizer.eos_token_id
    sampling = args.temperature > 0
    options: dict[str, Any] = dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=sampling,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
    )
    if sampling:
        options.update(temperature=args.temperature, top_p=args.top_p)
        torch.manual_seed(args.seed)
    if args.show_experts:
        model.clear_scalings_log()
        model.enable_scalings_logging()
    else:  # print as the tokens come
        options["streamer"] = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        scalings_mode=args.mode,
        freeze_after=args.freeze_after,
        **options,
    )
    new_ids = out[0, ids.shape[1] :].tolist()
    if not args.show_experts:
        return new_ids, []
    model.disable_scalings_logging()
    scalings = generated_token_scalings(model.get_scalings_log(), len(new_ids))  # (1, N, L, E)
    model.clear_scalings_log()
    return new_ids, dominant_experts(scalings)[0].tolist()


def token_pieces(tokenizer: Any, ids: list[int]) -> list[str]:
    """The text each token adds to the decoded output (decoded incrementally, like a streamer).

    A token that ends in the middle of a multi-byte character adds nothing; the completed
    character goes to the token that completes it.
    """
    pieces, shown = [], 0
    for end in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:end], skip_special_tokens=True)
        if text.endswith("\ufffd") or len(text) < shown:
            pieces.append("")
            continue
        pieces.append(text[shown:])
        shown = len(text)
    return pieces


def add_colour_argument(parser: argparse.ArgumentParser) -> None:
    """`--colour auto|always|never`."""
    parser.add_argument(
        "--colour",
        "--color",
        choices=COLOUR_CHOICES,
        default="auto",
        help="colour tokens by expert: auto = only on a terminal and without NO_COLOR set",
    )


def use_colour(choice: str, stream: TextIO | None = None) -> bool:
    """Whether to print ANSI colours: `auto` means only on a terminal, and not if the
    `NO_COLOR` environment variable is set (https://no-color.org)."""
    if choice != "auto":
        return choice == "always"
    stream = sys.stdout if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return not os.environ.get("NO_COLOR") and isatty is not None and bool(isatty())


def colour(index: int) -> str:
    return f"\x1b[{PALETTE[index % len(PALETTE)]}m"


def legend(names: list[str]) -> str:
    """One coloured square and name per expert."""
    return "experts: " + "  ".join(
        f"{colour(i)}\u25a0 {name}{RESET}" for i, name in enumerate(names)
    )


def colour_tokens(pieces: list[str], experts: list[int]) -> str:
    """The pieces joined, each in its expert's colour."""
    return "".join(f"{colour(e)}{piece}{RESET}" for piece, e in zip(pieces, experts, strict=True))


def plain_legend(names: list[str]) -> str:
    """The legend without colours: each expert's index in brackets."""
    return "experts: " + "  ".join(f"[{i}] {name}" for i, name in enumerate(names))


def tagged_tokens(pieces: list[str], experts: list[int]) -> str:
    """The pieces joined, each followed by its expert's index in brackets."""
    return "".join(f"{piece}[{e}]" for piece, e in zip(pieces, experts, strict=True))
