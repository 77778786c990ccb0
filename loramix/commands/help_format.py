"""The `--help` layout of every `loramix` command: real defaults only.

argparse's `ArgumentDefaultsHelpFormatter` appends `(default: ...)` to every option, which
shows `(default: None)` on required options, `(default: False)` on switches and
`(default: [])` on repeatable ones, even after a help text that already says what the default
is. This formatter appends it only when there is a value to show.
"""

from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends `(default: X)` to an option's help when X tells the reader something.

    Left out for: positional arguments, required options, switches (options that take no
    value), defaults of None or an empty list, and help texts that already mention a default.
    A list default is shown as its items separated by spaces, as it would be typed.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or action.required
            or action.nargs == 0
            or default is None
            or default == []
            or default is argparse.SUPPRESS
            or "default" in text.lower()
        ):
            return text
        if isinstance(default, list | tuple):
            shown = " ".join(str(item) for item in default)
        else:
            shown = str(default)
        return f"{text} (default: {shown})".lstrip()
