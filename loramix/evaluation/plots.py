"""Heatmaps of X-LoRA scalings, as the X-LoRA paper draws them (Buehler & Buehler 2024).

    plot_layer_scalings   experts x adapted layers for one prompt, averaged over its tokens
    plot_token_scalings   experts x tokens, averaged over the adapted modules of a block range
    plot_expert_usage     test sets (domains) x experts: the mean scalings of each set
    write_eval_plots      all three for the examples of an evaluation, next to its report

Each function writes one PNG atomically (a temporary file beside it, then a rename) at
exactly `size` inches x `dpi`. Figures are drawn on matplotlib's Agg canvas without pyplot,
so no global state or display is touched. matplotlib is the optional extra `plots`:
pip install 'loramix[plots]'.

Axis names: T tokens, L adapted modules, E experts.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from loramix.atomic import atomic_file

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from loramix.evaluation.report import EvalReport
    from loramix.model import XLoraModel

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'loramix[plots]'  (matplotlib)"
USAGE_PNG = "expert_usage.png"
_MAX_LABEL = 12  # characters of a token label
_MAX_TICKS = 60  # layer labels drawn at most; the others are left unlabelled


# ------------------------------------------------------------------------ labels


def block_index(module_name: str) -> int | None:
    """The transformer block of a module path: "model.layers.12.self_attn.q_proj" -> 12.

    The first all-digit component counts; None for modules outside the blocks (embeddings).
    """
    for part in module_name.split("."):
        if part.isdigit():
            return int(part)
    return None


def modules_in_blocks(module_names: Sequence[str], blocks: tuple[int, int]) -> list[int]:
    """Indices of the modules in blocks `start <= block < end`.

    Raises:
        ValueError: If no module lies there (naming the blocks the modules are in).
    """
    start, end = blocks
    keep = [
        i
        for i, name in enumerate(module_names)
        if (b := block_index(name)) is not None and start <= b < end
    ]
    if not keep:
        found = sorted({b for n in module_names if (b := block_index(n)) is not None})
        known = f"blocks {found[0]} to {found[-1]}" if found else "no numbered block"
        raise ValueError(
            f"blocks={blocks}: no adapted module lies in blocks {start} to {end - 1}; the "
            f"adapted modules are in {known} (blocks=None averages over all of them)"
        )
    return keep


def short_module_name(module_name: str) -> str:
    """A short label: "model.layers.12.self_attn.q_proj" -> "12.q".

    The block number, a dot, and the module's own name without "_proj"
    ("transformer.h.0.attn.c_attn" -> "0.c_attn", "model.embed_tokens" -> "embed_tokens").
    """
    last = re.sub(r"_proj$", "", module_name.rsplit(".", 1)[-1])
    block = block_index(module_name)
    return last if block is None else f"{block}.{last}"


def token_labels(tokenizer: PreTrainedTokenizerBase, input_ids: Sequence[int]) -> list[str]:
    """Each token's own decoded text, made printable: newlines as "\\n", blanks as "·"."""
    labels = []
    for token in input_ids:
        text = tokenizer.decode([int(token)]).replace("\n", "\\n").strip() or "·"
        labels.append(text if len(text) <= _MAX_LABEL else text[: _MAX_LABEL - 1] + "…")
    return labels


# ------------------------------------------------------------------------ plots


def plot_layer_scalings(
    scalings: Any,
    expert_names: Sequence[str],
    module_names: Sequence[str],
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    size: tuple[float, float] | None = None,
    dpi: int = 100,
) -> Path:
    """Experts x adapted layers: one prompt's scalings averaged over its tokens.

    Args:
        scalings: `(T, L, E)` (averaged over T here) or `(L, E)`.
        expert_names: The E axis.
        module_names: The L axis (full module paths; shortened for the labels).
        path: The PNG to write.
        title: Figure title.
        size: (width, height) in inches; by default it grows with L and E.
        dpi: Pixels per inch.
    """
    grid = _as_array(scalings, "scalings", (2, 3))
    if grid.ndim == 3:
        grid = grid.mean(axis=0)  # (L, E)
    n_layers, n_experts = grid.shape
    _check_axis("expert_names", expert_names, n_experts, "E (last axis)")
    _check_axis("module_names", module_names, n_layers, "L")
    size = size or (min(max(6.0, 0.06 * n_layers + 3.0), 24.0), max(2.5, 0.4 * n_experts + 1.8))
    fig, ax = _figure(size, dpi)
    image = ax.imshow(grid.T, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0)
    ticks = _layer_ticks(module_names)
    ax.set_xticks(ticks, [short_module_name(module_names[i]) for i in ticks], rotation=90)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_yticks(range(n_experts), list(expert_names))
    ax.set_xlabel("adapted layer (block.module)")
    ax.set_ylabel("expert")
    ax.set_title(title or "Scalings per adapted layer (mean over tokens)", fontsize=10)
    fig.colorbar(image, ax=ax, label="scaling", fraction=0.03, pad=0.01)
    return _save(fig, path, dpi)


def plot_token_scalings(
    scalings: Any,
    expert_names: Sequence[str],
    tokens: Sequence[str],
    path: str | os.PathLike[str],
    *,
    module_names: Sequence[str] | None = None,
    blocks: tuple[int, int] | None = None,
    title: str | None = None,
    size: tuple[float, float] | None = None,
    dpi: int = 100,
) -> Path:
    """Experts x tokens: the scalings averaged over the adapted modules of a block range.

    Args:
        scalings: `(T, L, E)`.
        expert_names: The E axis.
        tokens: One label per token (see `token_labels`).
        path: The PNG to write.
        module_names: The L axis; needed with `blocks`.
        blocks: Average over modules of blocks `start <= block < end` only; None: all modules.
        title: Figure title (by default it names the block range).
        size: (width, height) in inches; by default it grows with T and E.
        dpi: Pixels per inch.

    Raises:
        ValueError: On mismatched axes, or a block range that holds no adapted module.
    """
    grid = _as_array(scalings, "scalings", (3,))
    n_tokens, n_layers, n_experts = grid.shape
    _check_axis("expert_names", expert_names, n_experts, "E (last axis)")
    _check_axis("tokens", tokens, n_tokens, "T (first axis)")
    group = "all adapted modules"
    if blocks is not None:
        if module_names is None:
            raise ValueError("blocks needs module_names, to know which module is in which block")
        _check_axis("module_names", module_names, n_layers, "L")
        start, end = blocks
        keep = modules_in_blocks(module_names, blocks)
        grid = grid[:, keep]
        span = f"block {start}" if end - start == 1 else f"blocks {start}-{end - 1}"
        group = f"{span} ({len(keep)} modules)"
    mean = grid.mean(axis=1)  # (T, E)
    size = size or (min(max(6.0, 0.22 * n_tokens + 3.0), 40.0), max(2.8, 0.4 * n_experts + 2.2))
    fig, ax = _figure(size, dpi)
    image = ax.imshow(mean.T, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0)
    ax.set_xticks(range(n_tokens), list(tokens), rotation=90)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_yticks(range(n_experts), list(expert_names))
    ax.set_xlabel("token")
    ax.set_ylabel("expert")
    ax.set_title(title or f"Scalings per token, mean over {group}", fontsize=10)
    fig.colorbar(image, ax=ax, label="scaling", fraction=0.03, pad=0.01)
    return _save(fig, path, dpi)


def plot_expert_usage(
    usage: Mapping[str, Mapping[str, float] | Sequence[float]],
    expert_names: Sequence[str],
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    size: tuple[float, float] | None = None,
    dpi: int = 100,
) -> Path:
    """Test sets (domains) x experts: X-LoRA's mean scaling of each expert, values written in.

    Args:
        usage: Test set -> expert -> mean scaling (`EvalReport.usage`), or -> `(E,)` values.
        expert_names: The experts, in column order.
        path: The PNG to write.
        title: Figure title.
        size: (width, height) in inches; by default it grows with the table.
        dpi: Pixels per inch.
    """
    if not usage:
        raise ValueError("usage is empty: evaluate the xlora system to get expert usage")
    rows = []
    for name, values in usage.items():
        row = [values[e] for e in expert_names] if isinstance(values, Mapping) else list(values)
        _check_axis(f"usage[{name!r}]", row, len(expert_names), "E (one value per expert)")
        rows.append(row)
    grid = np.asarray(rows, dtype=np.float64)  # (sets, E)
    n_sets, n_experts = grid.shape
    size = size or (max(5.0, 1.1 * n_experts + 3.0), max(2.5, 0.5 * n_sets + 1.6))
    fig, ax = _figure(size, dpi)
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0)
    top = grid.max() if grid.size else 0.0
    for i in range(n_sets):
        for j in range(n_experts):
            colour = "black" if grid[i, j] > 0.6 * top else "white"
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", color=colour, fontsize=8)
    ax.set_xticks(range(n_experts), list(expert_names), rotation=30, ha="right")
    ax.set_yticks(range(n_sets), list(usage))
    ax.set_xlabel("expert")
    ax.set_ylabel("test set")
    ax.set_title(title or "X-LoRA expert usage (mean scalings)", fontsize=10)
    fig.colorbar(image, ax=ax, label="mean scaling", fraction=0.05, pad=0.02)
    return _save(fig, path, dpi)


def plot_accuracy(
    report: EvalReport,
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """The accuracy table as a chart: a bar per system in each test set, with its 95% interval.

    Args:
        report: An evaluation with generation (scores with an accuracy).
        path: The PNG to write.
        title: Figure title.
        dpi: Pixels per inch.

    Raises:
        ValueError: If no score has an accuracy (evaluated with max_new_tokens=0).
    """
    sets, systems = list(report.test_sets), list(report.systems)
    if not any(
        s.accuracy is not None for by_set in report.scores.values() for s in by_set.values()
    ):
        raise ValueError("no accuracy in the report: evaluate with max_new_tokens > 0")
    width = 0.8 / len(systems)
    fig, ax = _figure((max(6.0, 0.35 * len(sets) * len(systems) + 2.0), 4.0), dpi)
    for k, system in enumerate(systems):
        xs, heights, errors = [], [], [[], []]
        for i, name in enumerate(sets):
            score = report.scores[system].get(name)
            if score is None or score.accuracy is None:
                continue
            low, high = score.accuracy_ci or (score.accuracy, score.accuracy)
            xs.append(i - 0.4 + (k + 0.5) * width)
            heights.append(100 * score.accuracy)
            errors[0].append(100 * (score.accuracy - low))
            errors[1].append(100 * (high - score.accuracy))
        ax.bar(xs, heights, width, yerr=errors, capsize=2, label=system)
    ax.set_xticks(range(len(sets)), sets, rotation=30, ha="right")
    ax.set_ylabel("verified accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    ax.set_title(title or "Verified greedy accuracy, 95% bootstrap intervals", fontsize=10)
    return _save(fig, path, dpi)


def write_eval_plots(
    model: XLoraModel,
    tokenizer: PreTrainedTokenizerBase,
    samples: Mapping[str, Sequence[int]],
    out_dir: str | os.PathLike[str],
    *,
    usage: Mapping[str, Mapping[str, float]] | None = None,
    blocks: tuple[int, int] | None = None,
    dpi: int = 100,
) -> list[Path]:
    """The heatmaps of an evaluation: per sample, layers and tokens; plus expert usage.

    The token prefix that all samples share (the chat template's system prompt and turn
    header) is dropped before plotting, so the pictures show the question and the answer;
    the scalings are still computed on the whole sequence.

    Args:
        model: The X-LoRA model (its gate gives the scalings).
        tokenizer: Decodes the token labels.
        samples: Test set name -> one example's token ids (prompt and completion).
        out_dir: Folder of the PNGs: `layers_<name>.png`, `tokens_<name>.png` and
            `expert_usage.png` (when `usage` is given).
        usage: `EvalReport.usage`.
        blocks: Block range of the token heatmaps (see `plot_token_scalings`).
        dpi: Pixels per inch.

    Returns:
        The PNG files written.
    """
    from loramix.evaluation.runner import example_scalings

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shared = _shared_prefix(list(samples.values())) if len(samples) > 1 else 0
    written = []
    for name, ids in samples.items():
        start = min(shared, len(ids) - 1)
        scalings = example_scalings(model, ids)[start:].numpy()  # (T', L, E)
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        written.append(
            plot_layer_scalings(
                scalings,
                model.expert_names,
                model.adapted_modules,
                out / f"layers_{stem}.png",
                title=f"{name}: scalings per adapted layer (mean over {len(scalings)} tokens)",
                dpi=dpi,
            )
        )
        written.append(
            plot_token_scalings(
                scalings,
                model.expert_names,
                token_labels(tokenizer, ids[start:]),
                out / f"tokens_{stem}.png",
                module_names=model.adapted_modules,
                blocks=blocks,
                dpi=dpi,
            )
        )
    if usage:
        written.append(plot_expert_usage(usage, model.expert_names, out / USAGE_PNG, dpi=dpi))
    logger.info("wrote %d heatmaps to %s", len(written), out)
    return written


# ------------------------------------------------------------------------ helpers


def require_matplotlib() -> tuple[Any, Any]:
    """(Figure, FigureCanvasAgg), or an ImportError naming the extra."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            f"loramix.evaluation.plots needs matplotlib, which is not installed; install the plots "
            f"extra: {INSTALL_HINT}"
        ) from error
    return Figure, FigureCanvasAgg


def _figure(size: tuple[float, float], dpi: int) -> tuple[Any, Any]:
    figure_class, canvas_class = require_matplotlib()
    if len(size) != 2 or min(size) <= 0 or dpi <= 0:
        raise ValueError(f"size={size}, dpi={dpi}: use positive (width, height) inches and dpi")
    fig = figure_class(figsize=size, dpi=dpi, layout="constrained")
    canvas_class(fig)  # the Agg canvas: PNG without pyplot or a display
    return fig, fig.add_subplot()


def _save(fig: Any, path: str | os.PathLike[str], dpi: int) -> Path:
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return Path(path)


def _as_array(values: Any, name: str, ndims: tuple[int, ...]) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().float().cpu().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim not in ndims or 0 in array.shape:
        shapes = " or ".join({2: "(L, E)", 3: "(T, L, E)"}[n] for n in ndims)
        raise ValueError(f"{name} has shape {array.shape}; expected a non-empty {shapes}")
    return array


def _check_axis(name: str, values: Sequence[Any], expected: int, axis: str) -> None:
    if len(values) != expected:
        raise ValueError(
            f"{name} has {len(values)} entries but the scalings' axis {axis} has {expected}"
        )


def _layer_ticks(module_names: Sequence[str]) -> list[int]:
    """Every layer when few; else the first module of each block, thinned to `_MAX_TICKS`."""
    if len(module_names) <= _MAX_TICKS:
        return list(range(len(module_names)))
    firsts = [
        i
        for i, name in enumerate(module_names)
        if i == 0 or block_index(name) != block_index(module_names[i - 1])
    ]
    step = -(-len(firsts) // _MAX_TICKS)
    return firsts[::step]


def _shared_prefix(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix common to all sequences."""
    length = min(len(s) for s in sequences)
    for i in range(length):
        if any(s[i] != sequences[0][i] for s in sequences[1:]):
            return i
    return length
