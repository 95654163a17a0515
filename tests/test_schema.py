"""The models match the main app's schema.sql and the worker's migrations."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
import pytest
from sqlalchemy import Column, MetaData, Table, Text

import models
from models.base import WORKER_SCHEMA
from models.db import get_engine
from models.migrate import include_name, include_object
from harness.schema_check import model_mismatches

PROJECT = Path(__file__).resolve().parents[1]
SHARED_SCHEMA = PROJECT.parent / "shared" / "schema" / "schema.sql"


def test_project_copy_of_schema_sql_is_current():
    if not SHARED_SCHEMA.exists():
        return  # a user's clone has no shared folder
    assert (PROJECT / "models" / "schema.sql").read_text() == SHARED_SCHEMA.read_text()


def test_every_mapped_table_and_column_exists_with_its_type_and_nullability(services):
    assert model_mismatches(get_engine(), models.Base.metadata) == []


def test_the_check_catches_a_misnamed_column(services):
    broken = MetaData()
    Table("Invoice", broken, Column("stripeInvoiceID", Text, primary_key=True), schema="public")
    assert model_mismatches(get_engine(), broken) == [
        "public.Invoice.stripeInvoiceID: column missing"
    ]


def test_the_check_catches_wrong_nullability(services):
    broken = MetaData()
    Table("Invoice", broken, Column("paidAt", models.app.TS, nullable=False), schema="public")
    assert model_mismatches(get_engine(), broken) == [
        "public.Invoice.paidAt: mapped nullable=False, is nullable=True"
    ]


def test_migrations_leave_nothing_for_autogenerate_in_the_worker_schema(services):
    with get_engine().connect() as conn:
        context = MigrationContext.configure(
            conn,
            opts={
                "include_schemas": True,
                "include_object": include_object,
                "include_name": include_name,
                "version_table_schema": WORKER_SCHEMA,
                "compare_type": True,
            },
        )
        assert compare_metadata(context, models.Base.metadata) == []


def test_migrations_form_one_line_that_downgrades_to_nothing_and_back(services):
    from alembic import command
    from alembic.script import ScriptDirectory
    from sqlalchemy import inspect

    from config import get_settings
    from models.migrate import alembic_config

    cfg = alembic_config(get_settings().database_url)
    assert len(ScriptDirectory.from_config(cfg).get_heads()) == 1
    command.downgrade(cfg, "base")
    assert inspect(get_engine()).get_table_names(schema=WORKER_SCHEMA) == ["alembic_version"]
    command.upgrade(cfg, "head")
    assert model_mismatches(get_engine(), models.Base.metadata) == []


@contextmanager
def inbox_before_partitioning(prefix: str, count: int) -> Iterator[tuple[Config, str]]:
    """The schema downgraded to just before 0018, its inbox holding `count` processed events
    `prefix1`... received a day apart; yields the Alembic config and the conninfo. Afterwards
    the schema is at head again with an empty inbox."""
    import psycopg
    from alembic import command

    from config import get_settings
    from models.migrate import alembic_config

    url = get_settings().database_url
    cfg = alembic_config(url)
    conninfo = url.replace("postgresql+psycopg://", "postgresql://", 1)
    command.downgrade(cfg, "0017_provider_stats_staged")
    try:
        with psycopg.connect(conninfo) as conn:
            conn.execute(
                "INSERT INTO marketplace_worker.stripe_events (id, type, livemode, created, payload, endpoint,"
                " status, received_at) SELECT %s || i, 'invoice.paid', false, 1, '{}', 'platform',"
                " 'processed', now() - i * interval '1 day' FROM generate_series(1, %s) i", (prefix, count))
        yield cfg, conninfo
    finally:
        command.upgrade(cfg, "head")
        with psycopg.connect(conninfo) as conn:
            conn.execute("TRUNCATE marketplace_worker.stripe_events, marketplace_worker.stripe_event_ids")


def test_the_inbox_becomes_partitioned_with_its_rows_and_their_ids(services):
    """0018 on an inbox with rows: the table is attached as the legacy partition (nothing
    copied), every id is in the key table, later months and DEFAULT exist, a redelivery of an
    old id stores nothing, and the downgrade gives the rows back in one table."""
    import json

    import psycopg
    from alembic import command

    from domain.inbox import INSERT_EVENTS_SQL, event_from_dict, insert_params
    from domain.retention import partitions
    from models.db import session_scope

    with inbox_before_partitioning("evt_before_", 40) as (cfg, conninfo):
        with psycopg.connect(conninfo) as conn:
            table = conn.execute("SELECT 'marketplace_worker.stripe_events'::regclass::oid").fetchone()[0]
        command.upgrade(cfg, "head")
        with psycopg.connect(conninfo) as conn:
            assert conn.execute("SELECT count(*) FROM marketplace_worker.stripe_events").fetchone()[0] == 40
            assert conn.execute("SELECT count(*) FROM marketplace_worker.stripe_event_ids").fetchone()[0] == 40
            # The same table, renamed and attached: not a copy.
            assert conn.execute("SELECT 'marketplace_worker.stripe_events_legacy'::regclass::oid").fetchone()[0] == table
            body = '{"id": "evt_before_7", "object": "event", "type": "invoice.paid", "created": 1,' \
                   ' "livemode": false, "data": {"object": {"id": "in_1"}}}'
            again = event_from_dict(json.loads(body), body, "platform", livemode=False)
            assert conn.execute(INSERT_EVENTS_SQL, insert_params([again, again])).fetchall() == []
        with session_scope() as session:
            layout = partitions(session)
        assert [p.name for p in layout][0] == "stripe_events_legacy"
        assert layout[-1].is_default
        assert sum(p.is_month for p in layout) == 2
        command.downgrade(cfg, "0017_provider_stats_staged")
        with psycopg.connect(conninfo) as conn:
            assert conn.execute("SELECT count(*) FROM marketplace_worker.stripe_events").fetchone()[0] == 40


def test_the_inbox_conversion_runs_again_after_its_swap_stopped(services, monkeypatch):
    """The swap may stop on its lock timeout after the earlier steps have committed (the key
    table, the copy trigger, the range check, the index): the migration then runs again to
    the end, and every id is in the key table."""
    import psycopg
    from alembic import command, op

    with inbox_before_partitioning("evt_again_", 5) as (cfg, conninfo):
        execute = op.execute

        def swap_times_out(sql, *args, **kwargs):
            if "RENAME TO stripe_events_legacy" in str(sql):
                raise psycopg.errors.LockNotAvailable("canceling statement due to lock timeout")
            return execute(sql, *args, **kwargs)

        monkeypatch.setattr(op, "execute", swap_times_out)
        with pytest.raises(Exception, match="lock timeout"):
            command.upgrade(cfg, "head")
        monkeypatch.setattr(op, "execute", execute)
        with psycopg.connect(conninfo) as conn:
            # Stopped before the swap, with the earlier steps committed.
            assert conn.execute("SELECT to_regclass('marketplace_worker.stripe_event_ids')").fetchone()[0]
            conn.execute(
                "INSERT INTO marketplace_worker.stripe_events (id, type, livemode, created, payload, endpoint,"
                " status) VALUES ('evt_again_late', 'invoice.paid', false, 1, '{}', 'platform', 'processed')")
        command.upgrade(cfg, "head")
        with psycopg.connect(conninfo) as conn:
            assert conn.execute("SELECT count(*) FROM marketplace_worker.stripe_events").fetchone()[0] == 6
            assert conn.execute("SELECT count(*) FROM marketplace_worker.stripe_event_ids").fetchone()[0] == 6
            assert conn.execute("SELECT to_regclass('marketplace_worker.stripe_events_legacy')").fetchone()[0]
