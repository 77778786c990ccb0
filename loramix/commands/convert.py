"""`loramix convert`: rewrite an X-LoRA folder (or Hub repo) in another tool's format.

loramix convert someone/xlora-model my-xlora --to loramix
loramix convert my-xlora for-mistralrs --to mistralrs --base smollm2 --base-model-id ORG/NAME

Conversion to loramix, peft and xlora works on the files alone (no base model is loaded);
`--base` loads the model first, which checks experts and gate against the base, and is
needed for mistralrs (its ordering file lists modules in the base model's order).
"""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Declare the `convert` subcommand and its flags."""
    from loramix.formats import FORMATS

    parser = subparsers.add_parser(
        "convert",
        help="rewrite an X-LoRA model in loramix's, peft's, xlora's or mistral.rs's format",
        description=(
            "Read an X-LoRA folder or Hugging Face Hub repo in any format loramix reads "
            "(loramix, peft, the original xlora package, mistral.rs) and write it in "
            "another. loramix, peft and xlora are converted from the files alone; "
            "mistralrs needs --base."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("source", help="X-LoRA folder or Hugging Face Hub id")
    parser.add_argument(
        "target",
        help="folder to write; in an existing one only the format's own files are replaced "
        "(atomically) and the other files stay; a model of another kind there is refused",
    )
    parser.add_argument("--to", required=True, choices=FORMATS, help="format to write")
    parser.add_argument(
        "--base",
        default=None,
        help="load this base model first ('smollm2' or a local transformers folder): checks "
        "the files against it; required for --to mistralrs",
    )
    parser.add_argument(
        "--base-model-id",
        default=None,
        help="the base model's Hub id (or path) to record in the files; default: the one the "
        "source records (base_model.json, base_model_name_or_path or base_model_id)",
    )
    parser.add_argument("--revision", default=None, help="revision of a Hub id source")


def run(args: argparse.Namespace) -> int:
    """Convert; print what was written, or the error and how to fix it."""
    from loramix.formats import convert, hub

    source = hub.resolve(args.source, revision=args.revision)
    base = None
    if args.base is not None:
        from loramix.smollm2 import load_base_model

        base = load_base_model(args.base)[0]
    found = convert(source, args.target, args.to, base, args.base_model_id)
    how = "checked against the base model" if args.base else "from the files alone"
    print(f"converted {args.source} ({found}) to {args.to} in {args.target} ({how})")
    return 0
