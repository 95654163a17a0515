"""Celery entry point: `celery -A worker worker|beat|flower` finds `worker.app`.

The app is built on first use, so `marketplace-worker dev` can prepare the
environment before any setting is read.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from celery import Celery

_app: Celery | None = None


def get_app() -> Celery:
    global _app
    if _app is None:
        from config import ConfigError
        from worker.celery_app import create_app

        try:
            _app = create_app()
        except ConfigError as error:  # one line naming the setting, not a traceback
            sys.exit(str(error))
    return _app


def __getattr__(name: str) -> Celery:
    if name in ("app", "celery"):
        return get_app()
    raise AttributeError(name)
