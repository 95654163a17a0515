"""Celery entry point: `celery -A worker worker|beat|flower` finds `worker.app`.

The app is built on first use, not on import: the CLI (worker/cli.py) lives in this package,
and `marketplace-worker dev` prepares the environment before any setting is read, while
commands such as `migrate` need no broker setting at all. A missing or invalid setting raises
ConfigError, whose message names it.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from celery import Celery


@cache
def get_app() -> Celery:
    """The process's app (Celery's current app from then on)."""
    from worker.celery_app import create_app

    return create_app()


def __getattr__(name: str) -> Celery:
    if name == "app":
        return get_app()
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
