"""A local folder for an X-LoRA source given as a folder or a Hugging Face Hub id.

A Hub id is fetched with `huggingface_hub.snapshot_download` into the Hugging Face cache (or
read from it): `HF_HUB_OFFLINE=1` reads the cache only, `HF_HUB_CACHE` / `HF_HOME` choose
the cache folder. Both are read when called, not when loramix is imported.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

# What `XLoraModel.from_pretrained` passes on to `snapshot_download` for a Hub id.
HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download")

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def cache_dir() -> str | None:
    """The Hub cache folder the environment names now (None: huggingface_hub's default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def resolve(source: str | os.PathLike[str], **hub_kwargs: Any) -> Path:
    """`source` itself if it is a folder, else the local snapshot of the Hub repo `source`.

    Args:
        source: A folder, or a Hub id ("owner/name").
        **hub_kwargs: Any of `HUB_KWARGS`, for `snapshot_download`.

    Raises:
        FileNotFoundError: `source` is neither a folder nor a Hub id that could be fetched
            (offline: not in the cache), naming both and the cache folder.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if hub_kwargs.get("revision"):
            raise ValueError(
                f"revision={hub_kwargs['revision']!r} applies to a Hub id, but {source} is a "
                "local folder; leave revision out"
            )
        return path
    text = os.fspath(source)
    if not _REPO_ID.match(text):
        raise FileNotFoundError(f"{source}: no such folder, and not a Hugging Face Hub id")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    options = {k: v for k, v in hub_kwargs.items() if v is not None}
    options.setdefault("cache_dir", cache_dir())
    if is_offline():
        options["local_files_only"] = True
    try:
        return Path(snapshot_download(text, **options))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as error:
        where = options.get("cache_dir") or "the default Hugging Face cache"
        mode = "offline (HF_HUB_OFFLINE=1), so only " if options.get("local_files_only") else ""
        raise FileNotFoundError(
            f"{source}: no such folder, and the Hub repo could not be fetched: {mode}{where} "
            f"was searched ({type(error).__name__}: {error}). Check the id and revision, or "
            "download it while online."
        ) from None
