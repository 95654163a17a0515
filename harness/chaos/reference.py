"""The chaos run's reference: the accepted events processed once each, in Stripe's order, in
this process on a database seeded identically; and the table-by-table comparison of the
system under test with it, ignoring only bookkeeping that legitimately differs."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg

from harness.chaos.scenario import GeneratedEvent
from models.inbox import PARTITION_NAME


@dataclass
class ReferenceResult:
    processed: int
    failures: dict[str, str]
    seconds: float


@contextmanager
def domain_logs_to(path: Path) -> Iterator[None]:
    """The domain code's log lines, run in this process, go to a file rather than the console."""
    logger = logging.getLogger("domain")
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    saved = logger.propagate, logger.level
    logger.addHandler(handler)
    logger.propagate, logger.level = False, logging.INFO
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.propagate, logger.level = saved


def build_reference(ref_url: str, events: list[GeneratedEvent]) -> ReferenceResult:
    """The accepted events stored as the receiver stores them, then processed once each, in
    order, in this process with the domain code the workers run."""
    from config.settings import sqlalchemy_url
    from domain import dispatch
    from domain.errors import describe
    from domain.inbox import INSERT_EVENTS_SQL, event_from_dict, insert_params
    from models.db import session_scope

    incoming = [event_from_dict(json.loads(e.body), e.body.decode(), e.endpoint, livemode=False) for e in events]
    with psycopg.connect(ref_url) as conn:
        for start in range(0, len(incoming), 1000):
            conn.execute(INSERT_EVENTS_SQL, insert_params(incoming[start:start + 1000]))
        ordered = [row[0] for row in conn.execute(
            "SELECT id FROM marketplace_worker.stripe_events ORDER BY created, id")]
    failures = {}
    started = time.monotonic()
    url = sqlalchemy_url(ref_url)
    for event_id in ordered:
        try:
            with session_scope(url) as session:
                dispatch.process_event(session, event_id)
        except Exception as error:
            failures[event_id] = describe(error)
            with session_scope(url) as session:
                dispatch.record_failure(session, event_id, error, max_attempts=1, park_now=True)
    return ReferenceResult(len(ordered), failures, time.monotonic() - started)


def full_stats_pass(url: str) -> None:
    from config.settings import sqlalchemy_url
    from domain.stats import full_pass
    from models.db import get_engine

    with get_engine(sqlalchemy_url(url)).connect() as connection:
        full_pass(connection, batch_size=500)


# Worker tables that hold bookkeeping of when and how work ran, not its result (the full stats
# pass's staging holds the last pass's working set; its result is in the providers' rows).
BOOKKEEPING_TABLES = {"alembic_version", "job_runs", "touched_providers", "provider_stats_recomputed",
                      "provider_stats_staged", "watermarks"}
# Columns compared nowhere: surrogate ids and app-side timestamps of the worker's writes.
APP_TABLES = {
    "marketplace.transactions": {"id", "createdAt"},
    'public."Invoice"': {"updatedAt"},
    "marketplace.providers": {"updatedAt"},
}
INBOX_BOOKKEEPING = {"attempts", "last_error"}


def _table_select(conn: psycopg.Connection, schema: str, table: str, skip: set[str]) -> str:
    """A SELECT of a table's comparable content: processing timestamps (timestamptz), serial
    ids and `skip` left out, jsonb as its hash, transaction ids as their invoice ids."""
    columns = conn.execute(
        """SELECT column_name, data_type, coalesce(column_default, '') FROM information_schema.columns
           WHERE table_schema = %s AND table_name = %s ORDER BY ordinal_position""",
        (schema, table),
    ).fetchall()
    parts = []
    for name, data_type, default in columns:
        if name in skip or data_type == "timestamp with time zone" or default.startswith("nextval"):
            continue
        quoted = f'"{name}"'
        if data_type == "jsonb":
            parts.append(f"md5({quoted}::text)")
        elif name == "transaction_id":
            parts.append(f"(SELECT x.\"invoiceId\" FROM marketplace.transactions x WHERE x.id = t.{quoted})")
        else:
            parts.append(f"t.{quoted}")
    return f'SELECT {", ".join(parts)} FROM "{schema}"."{table}" t'


def snapshot(url: str) -> dict[str, Counter]:
    """Every compared table as a multiset of rows."""
    tables = {}
    with psycopg.connect(url) as conn:
        targets = [("marketplace", "transactions", APP_TABLES["marketplace.transactions"]),
                   ("public", "Invoice", APP_TABLES['public."Invoice"']),
                   ("marketplace", "providers", APP_TABLES["marketplace.providers"])]
        worker_tables = [row[0] for row in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'marketplace_worker' ORDER BY 1")]
        targets += [("marketplace_worker", name, INBOX_BOOKKEEPING if name == "stripe_events" else set())
                    for name in worker_tables
                    if name not in BOOKKEEPING_TABLES and not PARTITION_NAME.fullmatch(name)]
        for schema, table, skip in targets:
            rows = conn.execute(_table_select(conn, schema, table, skip)).fetchall()
            tables[f"{schema}.{table}"] = Counter(tuple(row) for row in rows)
    return tables


@dataclass
class Mismatch:
    table: str
    only_sut: list[tuple]
    only_reference: list[tuple]

    def describe(self, limit: int = 3) -> str:
        lines = [f"{self.table}: {len(self.only_sut)} rows only in the system under test, "
                 f"{len(self.only_reference)} only in the reference"]
        lines += [f"    sut: {row}" for row in self.only_sut[:limit]]
        lines += [f"    ref: {row}" for row in self.only_reference[:limit]]
        return "\n".join(lines)


def compare(sut_url: str, ref_url: str) -> tuple[list[str], list[Mismatch]]:
    sut, ref = snapshot(sut_url), snapshot(ref_url)
    mismatches = []
    for table in sorted(set(sut) | set(ref)):
        a, b = sut.get(table, Counter()), ref.get(table, Counter())
        if a != b:
            mismatches.append(Mismatch(table, sorted((a - b).elements(), key=repr),
                                       sorted((b - a).elements(), key=repr)))
    return sorted(sut), mismatches
