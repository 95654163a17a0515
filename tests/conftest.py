"""The test harness: real Postgres, real Redis, a real Celery worker process and a
fake Stripe API, shared by every test module.

Postgres and Redis come from DATABASE_URL / REDIS_URL when set, else embedded
servers are started for the session. Each session works in a database of its
own; every test starts from empty tables and an empty broker.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import text
from sqlalchemy.orm import Session

from harness.services import test_services
from harness.workers import WorkerProcess

WEBHOOK_SECRET = "whsec_test_platform_0123456789"
CONNECT_WEBHOOK_SECRET = "whsec_test_connect_0123456789"
STRIPE_API_KEY = "sk_test_marketplace_worker"

# Every table the tests may fill, children before parents.
TABLES = [
    'marketplace.reviews',
    'marketplace.transactions',
    'public."Invoice"',
    'public."Message"',
    'public."MessageThread"',
    'marketplace.service_listings',
    'marketplace.providers',
    'public."User"',
    'public."Tenant"',
]


@pytest.fixture(scope="session")
def work_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="mw-tests-") as path:
        yield Path(path)


@pytest.fixture(scope="session")
def stripe_api() -> Iterator:
    """The fake Stripe API (harness.stripe_server), reset before each test that uses it."""
    from harness.stripe_server import FakeStripe, serve

    fake = FakeStripe()
    with serve(fake) as base_url:
        fake.base_url = base_url
        yield fake


@pytest.fixture(scope="session")
def services(work_dir: Path, stripe_api) -> Iterator[dict[str, str]]:
    """Start (or connect to) Postgres and Redis, build the schema, export the settings."""
    with test_services(work_dir) as (database_url, redis_url):
        env = {
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "STRIPE_API_KEY": STRIPE_API_KEY,
            "STRIPE_API_BASE": stripe_api.base_url,
            "STRIPE_WEBHOOK_SECRETS": WEBHOOK_SECRET,
            "STRIPE_CONNECT_WEBHOOK_SECRETS": CONNECT_WEBHOOK_SECRET,
            "STRIPE_LIVEMODE": "false",
            "FLOWER_BASIC_AUTH": "ops:test-flower-password",
            "SWEEPER_THRESHOLD_SECONDS": "2",
            # Retries and parking within seconds, so flow tests can watch them happen.
            "EVENT_MAX_ATTEMPTS": "3",
            "EVENT_RETRY_BASE_SECONDS": "0.2",
        }
        saved = {name: os.environ.get(name) for name in env}
        os.environ.update(env)
        from config import get_settings
        from models.migrate import create_app_tables_if_absent, upgrade

        get_settings.cache_clear()
        settings = get_settings()
        create_app_tables_if_absent(settings.database_url)
        upgrade(settings.database_url)
        yield env
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        get_settings.cache_clear()
        from models.db import dispose_engines

        dispose_engines()


def _all_tables(session: Session) -> list[str]:
    worker_tables = session.execute(
        text(
            "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables "
            "WHERE schemaname = 'marketplace_worker' AND tablename <> 'alembic_version'"
        )
    ).scalars()
    return TABLES + list(worker_tables)


@pytest.fixture
def db(services, stripe_api) -> Iterator[Session]:
    """A session on empty tables. Commits are real, so worker processes see them."""
    from models.db import make_session

    session = make_session()
    session.execute(text(f"TRUNCATE {', '.join(_all_tables(session))} RESTART IDENTITY CASCADE"))
    session.commit()
    redis.Redis.from_url(services["REDIS_URL"]).flushdb()
    stripe_api.reset()
    try:
        yield session
    finally:
        session.rollback()
        session.close()


@pytest.fixture(scope="session")
def _worker_process(services, work_dir: Path) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(services, work_dir / "celery-worker.log")
    worker.start()
    yield worker
    worker.stop()


@pytest.fixture
def celery_worker(db, _worker_process: WorkerProcess) -> WorkerProcess:
    """A running worker process (shared by the session) on an empty broker."""
    if _worker_process.proc.poll() is not None:
        _worker_process.start()
    return _worker_process
