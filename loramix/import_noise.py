"""The import-time notices nobody can act on, dropped by exact logger and message prefix.

peft imports torchao and bitsandbytes when they are installed (the `quantization` extra);
both log, on import, which of their optional kernels this machine lacks. The command line
and the worker processes of `loramix.training.jobs` install these filters; every other
record passes.
"""

from __future__ import annotations

import logging

IMPORT_NOISE: dict[str, tuple[str, ...]] = {
    # logger name -> message prefixes dropped. peft imports torchao and bitsandbytes when they
    # are installed (the `quantization` extra); both log what their optional kernels lack.
    "torchao": ("Failed to load ",),
    "torchao.kernel.intmm": ("Warning: Detected no triton",),
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
    "torch.utils._pytree": ("<enum ",),  # torchao's register_constant deprecation notice
}


class _DropPrefixes(logging.Filter):
    """Drops the records of one logger whose message starts with one of `prefixes`."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def quiet_import_noise() -> None:
    """Install the `IMPORT_NOISE` filters once (a logger filter sees only its own records)."""
    for name, prefixes in IMPORT_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefixes) for f in logger.filters):
            logger.addFilter(_DropPrefixes(prefixes))
