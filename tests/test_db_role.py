"""The worker's least-privilege role (models/grants.py): it migrates its own schema on a
database a superuser only created, holds exactly the grants listed, and a missing grant fails
the path that needs it with one line naming the table. (The flows in test_brokers.py,
test_fanout.py and the chaos run's workers run as that role.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial

import psycopg
import pytest

from config.settings import sqlalchemy_url
from domain import dispatch
from domain.errors import describe
from domain.inbox import INSERT_EVENTS_SQL, event_from_dict, insert_params
from models import StripeEvent
from models.db import get_engine, session_scope
from models.grants import INSERTS, READ_ONLY, UPDATES, grants_sql
from models.migrate import create_app_tables_if_absent, upgrade
from harness import factories
from harness import stripe_events as se
from harness.db_role import worker_role
from harness.services import scratch_database

NOT_TOUCHED = ('public."User"', 'public."Tenant"', 'public."Message"', 'public."MessageThread"')


def _privileges(conn, role: str, table: str) -> set[str]:
    return {
        privilege for privilege in ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")
        if conn.execute("SELECT has_table_privilege(%s, %s, %s)", (role, table, privilege)).fetchone()[0]
    }


def _updatable_columns(conn, role: str, table: str) -> set[str]:
    schema, name = table.replace('"', "").split(".")
    return {row[0] for row in conn.execute(
        """SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = %s
           AND has_column_privilege(%s, format('%%I.%%I', table_schema, table_name), column_name, 'UPDATE')""",
        (schema, name, role),
    )}


def test_a_superuser_creates_the_database_and_the_role_migrates_and_owns_the_worker_schema(services):
    with scratch_database(services["DATABASE_URL"], "mw_role") as url:
        create_app_tables_if_absent(url)  # the main app's Prisma migrations, in production
        with worker_role(url) as (role, role_url):
            upgrade(role_url)
            with psycopg.connect(url) as conn:
                owners = {row[0] for row in conn.execute(
                    "SELECT tableowner FROM pg_tables WHERE schemaname = 'marketplace_worker'")}
                assert owners == {role}
                assert conn.execute("SELECT count(*) FROM marketplace_worker.alembic_version").fetchone()[0] == 1
                assert not conn.execute("SELECT rolsuper OR rolcreatedb OR rolcreaterole FROM pg_roles"
                                        " WHERE rolname = %s", (role,)).fetchone()[0]
            upgrade(role_url)  # a second run (the next release) finds everything in place
            get_engine(sqlalchemy_url(role_url)).dispose()


def test_the_role_holds_exactly_the_listed_privileges_on_the_app_tables(services):
    with worker_role(services["DATABASE_URL"]) as (role, _), psycopg.connect(services["DATABASE_URL"]) as conn:
        for table, columns in UPDATES.items():
            expected = {"SELECT"} | ({"INSERT"} if table in INSERTS else set())
            # Column grants do not show as table UPDATE: the table-wide privilege is not given.
            assert _privileges(conn, role, table) == expected, table
            assert _updatable_columns(conn, role, table) == set(columns), table
        for table in READ_ONLY:
            assert _privileges(conn, role, table) == {"SELECT"}, table
            assert _updatable_columns(conn, role, table) == set(), table
        for table in NOT_TOUCHED:
            assert _privileges(conn, role, table) == set(), table


RUN_EVERY_JOB = """
import json
from worker import app
from worker.schedule import JOBS

app.loader.import_default_modules()
for job in JOBS:
    app.tasks[job.task]()  # in this process, as beat's message would run it
print(json.dumps([job.name for job in JOBS]))
"""


def test_every_scheduled_job_runs_as_the_role(db, services, stripe_api):
    """Polling, completion, both stats passes, reconciliation, catch-up, retention and the
    sweepers, each on rows that make it write, with nothing but the role's grants."""
    from domain.clock import utcnow
    from harness.brokers import private_redis_url

    manual = factories.provider(db, payment_mode="manual")
    factories.invoice(db, manual, stripe=False, status="paid", paidAt=utcnow())  # polled into a transaction
    old = factories.invoice(db, manual, stripe=False, status="paid", paidAt=factories.at(30))
    paid = factories.transaction(db, old, status="paid", paidAt=factories.at(30))  # completed
    factories.review(db, paid, 4)
    factories.listing(db, manual)
    connect = factories.provider(db, payment_mode="stripe_connect")
    connected = factories.invoice(db, connect, status="paid", paidAt=factories.at(3))
    factories.transaction(db, connected, status="paid", paidAt=factories.at(3))  # reconciled
    db.commit()
    with worker_role(services["DATABASE_URL"]) as (_, role_url):
        env = {**os.environ, **services, "DATABASE_URL": role_url,
               "CELERY_BROKER_URL": private_redis_url(services["REDIS_URL"])}
        done = subprocess.run([sys.executable, "-c", RUN_EVERY_JOB], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        with psycopg.connect(services["DATABASE_URL"]) as conn:
            runs = dict(conn.execute("SELECT job, outcome FROM marketplace_worker.job_runs").fetchall())
            statuses = {row[0] for row in conn.execute("SELECT status FROM marketplace.transactions")}
    assert runs == {name: "ok" for name in json.loads(done.stdout.splitlines()[-1])}
    assert "completed" in statuses and len(statuses) >= 2


def test_a_missing_grant_fails_the_path_with_one_line_naming_the_table(db, services):
    """The stats pass writes the providers' stats columns; without UPDATE on one of them it
    fails, and the line recorded for the failure (job_runs.error, fan-out items) names the table."""
    from datetime import timedelta

    from domain import stats

    provider = factories.provider(db)
    factories.listing(db, provider)
    db.commit()
    with worker_role(services["DATABASE_URL"]) as (role, role_url):
        with psycopg.connect(services["DATABASE_URL"], autocommit=True) as conn:
            conn.execute(f'REVOKE UPDATE ("averageRating") ON marketplace.providers FROM {role}')
        as_role = sqlalchemy_url(role_url)
        with pytest.raises(Exception) as failed:
            with session_scope(as_role) as session:
                stats.incremental_pass(session, overlap=timedelta(minutes=5))
        assert describe(failed.value) == (
            "ProgrammingError: (psycopg.errors.InsufficientPrivilege) permission denied for table providers")

        with psycopg.connect(services["DATABASE_URL"], autocommit=True) as conn:
            conn.execute(grants_sql(role))
        with session_scope(as_role) as session:
            assert stats.incremental_pass(session, overlap=timedelta(minutes=5)).counts()
        get_engine(as_role).dispose()


def event_status_line(event_id: str) -> str:
    with session_scope() as session:
        return session.get(StripeEvent, event_id).last_error


def test_an_invoice_event_without_its_grant_is_retried_not_applied(db, services):
    provider = factories.provider(db, payment_mode="stripe")
    invoice = factories.invoice(db, provider, stripe=False, status="draft", amount_cents=5_000)
    db.commit()
    [event] = [e for e in se.invoice_lifecycle(str(invoice.id), 5_000, shape="legacy", outcome="paid")
               if e["type"] == "invoice.finalized"]
    incoming = event_from_dict(event, json.dumps(event), "platform", livemode=False)
    db.connection().exec_driver_sql(INSERT_EVENTS_SQL, insert_params([incoming]))
    db.commit()
    with worker_role(services["DATABASE_URL"]) as (role, role_url):
        with psycopg.connect(services["DATABASE_URL"], autocommit=True) as conn:
            conn.execute(f'REVOKE UPDATE ("status") ON public."Invoice" FROM {role}')
        as_role = partial(session_scope, sqlalchemy_url(role_url))
        attempt = dispatch.attempt_event(as_role, event["id"], max_attempts=3)
        assert attempt.outcome == "retrying"
        assert isinstance(attempt.error.orig, psycopg.errors.InsufficientPrivilege)
        assert str(attempt.error.orig) == "permission denied for table Invoice"
        assert event_status_line(event["id"]).endswith(
            "(psycopg.errors.InsufficientPrivilege) permission denied for table Invoice")

        with psycopg.connect(services["DATABASE_URL"], autocommit=True) as conn:
            conn.execute(grants_sql(role))
        assert dispatch.attempt_event(as_role, event["id"], max_attempts=3).outcome == "processed"
        get_engine(sqlalchemy_url(role_url)).dispose()


def test_the_grants_command_prints_the_sql_and_refuses_a_strange_role_name():
    printed = subprocess.run([sys.executable, "-m", "models.grants", "marketplace_worker_app"],
                             capture_output=True, text=True, timeout=60)
    assert printed.returncode == 0 and printed.stdout == grants_sql("marketplace_worker_app")
    assert "CREATE SCHEMA IF NOT EXISTS marketplace_worker AUTHORIZATION marketplace_worker_app;" in printed.stdout
    refused = subprocess.run([sys.executable, "-m", "models.grants", "x; DROP TABLE y"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "role name" in refused.stderr


def test_compose_s_apply_sets_up_the_role_and_refuses_without_its_secrets(services):
    import os

    from harness.db_role import as_role, drop_role

    clean = {k: v for k, v in os.environ.items() if k not in ("ADMIN_DATABASE_URL", "WORKER_DB_PASSWORD")}
    refused = subprocess.run([sys.executable, "-m", "models.grants", "mw_apply_probe", "--apply"],
                             capture_output=True, text=True, timeout=60, env=clean)
    assert refused.returncode == 2
    assert refused.stderr.strip() == "configuration error: ADMIN_DATABASE_URL is not set"
    role = f"mw_apply_{os.getpid()}"
    env = {**clean, "ADMIN_DATABASE_URL": services["DATABASE_URL"], "WORKER_DB_PASSWORD": "s3cret-pass"}
    try:
        done = subprocess.run([sys.executable, "-m", "models.grants", role, "--apply"],
                              capture_output=True, text=True, timeout=60, env=env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"role {role}: grants applied"
        with psycopg.connect(as_role(services["DATABASE_URL"], role)) as conn:
            assert conn.execute("SELECT count(*) FROM marketplace_worker.fanout_items").fetchone() == (0,)
    finally:
        drop_role(services["DATABASE_URL"], role)


@pytest.mark.parametrize("name", ["Worker", "1worker", "a" * 64, "w-k"])
def test_role_names_are_plain_identifiers(name):
    with pytest.raises(ValueError):
        grants_sql(name)
