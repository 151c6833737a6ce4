"""Logging set-up, once per process."""

from __future__ import annotations

import logging
import sys

from .settings import Settings


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s",
        stream=sys.stderr,
        force=True,
    )
