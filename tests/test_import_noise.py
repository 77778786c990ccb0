"""Tests of loramix.import_noise: the optional backends' import notices, and nothing else."""

from __future__ import annotations

import logging

from loramix.import_noise import IMPORT_NOISE, quiet_import_noise


def test_import_notices_of_optional_backends_are_dropped_and_nothing_else(caplog):
    quiet_import_noise()
    quiet_import_noise()  # idempotent: one filter per logger
    for name, prefixes in IMPORT_NOISE.items():
        logger = logging.getLogger(name)
        assert len(logger.filters) == 1
        with caplog.at_level(logging.WARNING, logger=name):
            caplog.clear()
            logger.warning(prefixes[0] + "something optional")
            logger.warning("a real problem")
        assert [r.getMessage() for r in caplog.records] == ["a real problem"]
