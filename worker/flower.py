"""`celery -A worker flower`: authenticated, or not started at all.

Flower takes its options from FLOWER_* environment variables (FLOWER_BASIC_AUTH=user:password,
FLOWER_PERSISTENT, FLOWER_DB, FLOWER_PORT, ...), then from `flowerconfig.py` in the working
directory (or `--conf`), then from its command line; it does not read the Celery app's
config, and it happily serves everyone when no authentication is configured. So the check
runs inside Flower once all of those are parsed: Flower's constructor sends Celery's
`import_modules` signal before it opens its port. Without basic auth (or Flower's OAuth) it
exits with one line, unless FLOWER_UNAUTHENTICATED=true, the local-development escape
hatch, which then only listens on 127.0.0.1.
"""

from __future__ import annotations

import logging
import sys

from celery import Celery
from celery.signals import import_modules

from config import get_settings

log = logging.getLogger(__name__)

LOOPBACK = ("", "127.0.0.1", "localhost", "::1")


def guard(app: Celery) -> None:
    """Called when `celery -A worker` loads the app for the `flower` subcommand."""
    from worker.logging_setup import configure_logging

    configure_logging()  # before Tornado's own handler, which it then does not add
    import_modules.connect(_require_auth, sender=app, weak=False)


def _require_auth(**_: object) -> None:
    from flower.options import options

    if options.basic_auth or options.auth:
        return
    if not get_settings().flower_unauthenticated:
        sys.exit(
            "configuration error: FLOWER_BASIC_AUTH is not set: Flower needs user:password"
            " (FLOWER_UNAUTHENTICATED=true runs it without, for local development only)"
        )
    if options.address not in LOOPBACK or options.unix_socket:
        sys.exit("configuration error: FLOWER_UNAUTHENTICATED=true only serves on 127.0.0.1")
    options.address = options.address or "127.0.0.1"
    log.warning("Flower runs WITHOUT authentication (FLOWER_UNAUTHENTICATED=true): local development only")
