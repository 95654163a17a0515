"""Postgres and Redis for tests and benchmarks: the servers named by DATABASE_URL /
REDIS_URL when set, else embedded ones; each run gets a database of its own."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import psycopg
from psycopg import sql

from worker.embedded import embedded_postgres, embedded_redis


def libpq_url(url: str) -> str:
    """The URL as libpq (psycopg) reads it: without SQLAlchemy's driver name."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


@contextmanager
def scratch_database(server_url: str, prefix: str = "mw_test") -> Iterator[str]:
    """A new, empty database beside the one `server_url` names, dropped afterwards."""
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = psycopg.conninfo.conninfo_to_dict(libpq_url(server_url))
    with psycopg.connect(**admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    base, _, query = libpq_url(server_url).partition("?")
    url = base.rsplit("/", 1)[0] + "/" + name + (f"?{query}" if query else "")
    try:
        yield url
    finally:
        with psycopg.connect(**admin, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@contextmanager
def test_services(work_dir: Path) -> Iterator[tuple[str, str]]:
    """(database URL, Redis URL) for one test or benchmark run."""
    with ExitStack() as stack:
        server = os.environ.get("DATABASE_URL") or stack.enter_context(
            embedded_postgres(work_dir / "postgres", keep=False)
        )
        redis_url = os.environ.get("REDIS_URL") or stack.enter_context(
            embedded_redis(work_dir / "redis")
        )
        database_url = stack.enter_context(scratch_database(server))
        yield database_url, redis_url
