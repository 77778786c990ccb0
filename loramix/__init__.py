"""loramix: X-LoRA mixtures of LoRA experts with layer-wise, token-level gating.

The public names load on first use (PEP 562), so that `loramix --help` and the command line's
set-up (its logging filters) run before transformers and its optional backends are imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loramix.config import XLoraConfig
    from loramix.experts import LoraExpert, load_expert
    from loramix.gate import XLoraGate
    from loramix.model import XLoraModel

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "XLoraConfig": "loramix.config",
    "LoraExpert": "loramix.experts",
    "load_expert": "loramix.experts",
    "XLoraGate": "loramix.gate",
    "XLoraModel": "loramix.model",
}

__all__ = ["LoraExpert", "XLoraConfig", "XLoraGate", "XLoraModel", "load_expert"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'loramix' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
