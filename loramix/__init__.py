"""loramix: X-LoRA mixtures of LoRA experts with layer-wise, token-level gating."""

from loramix.config import XLoraConfig
from loramix.experts import LoraExpert, load_expert
from loramix.gate import XLoraGate
from loramix.model import XLoraModel

__all__ = ["LoraExpert", "XLoraConfig", "XLoraGate", "XLoraModel", "load_expert"]
__version__ = "0.1.0"
