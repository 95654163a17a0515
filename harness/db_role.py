"""The worker's least-privilege role (models/grants.py) for test and benchmark runs: the
superuser only creates the database and the main app's tables; the worker's processes
connect as the role."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import psycopg

from harness.services import libpq_url
from models.grants import grants_sql, revoke_sql


def as_role(url: str, role: str) -> str:
    """The same database, connected to as `role` (no password: the test servers trust
    local connections)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{role}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


@contextmanager
def worker_role(database_url: str, prefix: str = "mw_worker") -> Iterator[tuple[str, str]]:
    """(role, URL as the role) for a database whose app tables exist; the worker's schema is
    handed over to the role and taken back (and the role dropped) afterwards."""
    role = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = libpq_url(database_url)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(grants_sql(role))
    try:
        yield role, as_role(admin, role)
    finally:
        drop_role(admin, role)


def drop_role(admin_url: str, role: str) -> None:
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        # Handing the tables back locks them: a test's open transaction fails it, not hangs it.
        conn.execute("SET lock_timeout = '30s'")
        # Its sessions (a worker that did not stop) would keep DROP ROLE from succeeding.
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,))
        conn.execute(revoke_sql(role))
        conn.execute(f"DROP ROLE IF EXISTS {role}")
