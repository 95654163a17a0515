"""The same flows on Redis and on RabbitMQ, through real processes running as the worker's
least-privilege database role: a webhook becomes a transaction, a failing event is retried
with backoff then parked, and a reconciliation fans out to every account.

RabbitMQ runs with quorum queues, publisher confirms and native delayed delivery (retries):
README, "RabbitMQ". The amqp variants skip, naming the reason, when no RabbitMQ answers.
"""

from __future__ import annotations

import json
import subprocess

import httpx
import pytest
from sqlalchemy import text

from domain.inbox import INSERT_EVENTS_SQL, event_from_dict, insert_params
from models import StripeEvent
from tests.conftest import WEBHOOK_SECRET
from harness import factories
from harness import stripe_events as se
from harness.brokers import BROKERS, broker_run, vhost_of
from harness.db_role import worker_role
from harness.workers import WorkerProcess
from harness.flow import ReceiverProcess, wait_for
from tests.test_reconcile import paid_out_accounts
from tasks.base import LONGEST_TASK_SECONDS
from worker.celery_app import ACK_DEADLINE_SECONDS, QUEUES

pytestmark = pytest.mark.flow


@pytest.fixture(scope="module")
def role_env(services):
    with worker_role(services["DATABASE_URL"]) as (_, url):
        yield {**services, "DATABASE_URL": url}


@pytest.fixture(scope="module", params=BROKERS)
def broker(request, role_env, work_dir):
    with broker_run(request.param, role_env) as run:
        worker = WorkerProcess(run.env, work_dir / f"brokers-{request.param}-worker.log", probe=run.app)
        worker.start()
        run.worker = worker
        try:
            yield run
        finally:
            worker.stop()
            run.app.close()


@pytest.fixture
def idle_broker(broker, db):
    """The module's broker and worker, with nothing left of the previous test."""
    wait_for(broker.idle, timeout=60, message=f"an idle {broker.name} broker")
    return broker


def test_the_worker_declares_quorum_queues_on_rabbitmq(idle_broker):
    if idle_broker.name != "amqp":
        pytest.skip("RabbitMQ only")
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "-p", vhost_of(idle_broker.url), "name", "type", "arguments",
         "--no-table-headers"], capture_output=True, text=True, check=True, timeout=120,
    ).stdout
    declared = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    for queue in QUEUES:
        assert "quorum" in declared[queue], declared[queue]
        assert f'"x-consumer-timeout",{ACK_DEADLINE_SECONDS * 1000}' in declared[queue]
    assert ACK_DEADLINE_SECONDS > LONGEST_TASK_SECONDS
    assert idle_broker.app.conf.broker_transport_options == {"confirm_publish": True}


def test_a_webhook_becomes_a_paid_transaction(idle_broker, db, work_dir):
    provider = factories.provider(db, payment_mode="stripe")
    invoice = factories.invoice(db, provider, stripe=False, status="draft", amount_cents=12_345)
    db.commit()
    timeline = se.invoice_lifecycle(str(invoice.id), 12_345, shape="legacy", outcome="paid")
    with ReceiverProcess(idle_broker.env, work_dir / f"brokers-{idle_broker.name}-receiver.log") as receiver:
        for event in timeline:
            body, headers = se.webhook(event, WEBHOOK_SECRET)
            answer = httpx.post(receiver.url + "/webhooks/stripe", content=body, headers=headers, timeout=10)
            assert answer.json()["status"] == "stored"

        def paid():
            db.rollback()
            return db.execute(text(
                'SELECT t.status, i.status FROM marketplace.transactions t JOIN "Invoice" i ON i.id = t."invoiceId"'
                " WHERE i.id = :id"), {"id": invoice.id}).first()

        state = wait_for(lambda: (paid() or (None,))[0] == "paid" and paid(), timeout=60, message="paid transaction")
    assert tuple(state) == ("paid", "paid")


def test_a_failing_event_is_retried_with_backoff_then_parked(idle_broker, db):
    missing = se.event("invoice.paid", se.invoice(shape="basil", amount=5000, status="paid", app_invoice_id=999_999))
    incoming = event_from_dict(missing, json.dumps(missing), "platform", livemode=False)
    db.connection().exec_driver_sql(INSERT_EVENTS_SQL, insert_params([incoming]))
    db.commit()
    idle_broker.app.send_task("tasks.events.process_events", ([missing["id"]],))

    def parked():
        db.expire_all()
        row = db.get(StripeEvent, missing["id"])
        return row if row.status == "parked" else None

    row = wait_for(parked, timeout=60, message="the event to be parked")
    assert row.attempts == 3  # EVENT_MAX_ATTEMPTS of the test settings: two retries by countdown
    assert row.last_error.startswith("NotYetKnown")


def test_a_reconciliation_fans_out_to_every_account(idle_broker, db, stripe_api):
    accounts, transactions = paid_out_accounts(db, stripe_api, 3)
    idle_broker.app.send_task("tasks.reconciliation.reconcile_all")

    def pieces():
        db.rollback()
        return db.execute(text(
            "SELECT key, outcome FROM marketplace_worker.fanout_items ORDER BY key")).all()

    done = wait_for(lambda: [p for p in pieces() if p.outcome] if all(p.outcome for p in pieces()) and pieces()
                    else None, timeout=60, message="every account reconciled")
    assert [(p.key, p.outcome) for p in done] == [(a, "ok") for a in sorted(accounts)]
    statuses = db.execute(text("SELECT status FROM marketplace.transactions WHERE id = ANY(:ids)"),
                          {"ids": transactions}).scalars().all()
    assert statuses == ["completed"] * 3


def test_the_ack_deadline_follows_the_longest_task():
    """The visibility timeout is sized from a task's hard limit: no task may outlive it, and
    the constant is the longest limit some task has (not a job's length)."""
    from harness.brokers import app_for

    app = app_for({"DATABASE_URL": "postgresql://u@h/db", "REDIS_URL": "redis://h:6379/0"})
    app.loader.import_default_modules()
    limits = {name: task.time_limit or app.conf.task_time_limit
              for name, task in app.tasks.items() if name.startswith("tasks.")}
    assert limits and all(limits.values()), limits
    assert max(limits.values()) == LONGEST_TASK_SECONDS, limits
    assert ACK_DEADLINE_SECONDS == LONGEST_TASK_SECONDS + 600 < 3600


def test_the_broker_options_follow_the_broker_url(monkeypatch):
    from config import load_settings
    from harness.brokers import app_for

    monkeypatch.setenv("DATABASE_URL", "postgresql://u@h/db")
    monkeypatch.setenv("REDIS_URL", "redis://h:6379/0")
    monkeypatch.setenv("CELERY_BROKER_URL", "")  # as compose passes it unset
    settings = load_settings()
    assert settings.broker_url == "redis://h:6379/0" and not settings.broker_is_amqp
    redis_app = app_for({"DATABASE_URL": "postgresql://u@h/db", "REDIS_URL": "redis://h:6379/0"})
    assert redis_app.conf.broker_transport_options == {"visibility_timeout": ACK_DEADLINE_SECONDS}
    amqp_app = app_for({"DATABASE_URL": "postgresql://u@h/db", "REDIS_URL": "redis://h:6379/0",
                        "CELERY_BROKER_URL": "amqp://u:p@h:5672/v"})
    assert [q.queue_arguments["x-queue-type"] for q in amqp_app.conf.task_queues] == ["quorum"] * len(QUEUES)
    assert {q.exchange.type for q in amqp_app.conf.task_queues} == {"topic"}
    # The same routes on both brokers.
    for task in ("tasks.events.process_events", "tasks.reconciliation.reconcile_account", "tasks.fanout.sweep_fanout",
                 "tasks.stats.full_stats", "tasks.maintenance.purge_inbox"):
        assert (redis_app.amqp.router.route({}, task)["queue"].name
                == amqp_app.amqp.router.route({}, task)["queue"].name)
