"""Traces and error reports (worker/tracing.py): a signed webhook's request, the publish of its
message, the worker's task and the UPDATE of its transaction, tied together as the module
documents; the task's JSON log lines carry the trace id; nothing of it loads unless enabled."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from sqlalchemy import select
from starlette.testclient import TestClient

from config import get_settings
from harness import factories
from harness import stripe_events as se
from models import Transaction
from tests.conftest import WEBHOOK_SECRET
from worker import tracing
from worker.logging_setup import JsonFormatter, Redactor, TaskContext

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_790_000_000


@pytest.fixture
def spans(services):
    exporter = InMemorySpanExporter()
    assert tracing.setup_tracing("marketplace-test", exporter=exporter)
    try:
        yield exporter
    finally:
        tracing.shutdown_tracing()


def _run_the_next_message_as_a_worker(app, timeout: float = 10) -> None:
    """Take the message the receiver's publisher sent off the broker and run it through the
    worker's own path (its headers become the task's request), in this process so that its
    spans reach the in-memory exporter."""
    from celery.worker.request import Request

    with app.connection_for_read() as conn:
        queue = conn.SimpleQueue("webhooks")
        try:
            message = queue.get(timeout=timeout)
            Request(message, app=app, task=app.tasks[message.headers["task"]]).execute()
            message.ack()
        finally:
            queue.close()


def _json_lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_one_trace_from_the_webhook_to_the_transaction_update(db, spans):
    from worker import get_app
    from worker.receiver import create_app

    provider = factories.provider(db, payment_mode="stripe")
    invoice = factories.invoice(db, provider, amount_cents=10_000, stripe=False, status="open")
    factories.transaction(db, invoice, status="invoiced")
    db.commit()
    snapshot = se.invoice(id="in_tracing0001", app_invoice_id=str(invoice.id), amount=10_000, status="paid",
                          created=T0, status_transitions={"finalized_at": T0, "paid_at": T0 + 60,
                                                          "voided_at": None, "marked_uncollectible_at": None})
    event = se.event("invoice.paid", snapshot, created=T0 + 60)

    with TestClient(create_app(get_settings())) as client:
        body, headers = se.webhook(event, WEBHOOK_SECRET)
        answer = client.post("/webhooks/stripe", content=body, headers=headers)
        assert answer.json() == {"status": "stored", "id": event["id"]}

    logs = io.StringIO()
    handler = logging.StreamHandler(logs)
    handler.addFilter(TaskContext())
    handler.setFormatter(JsonFormatter(Redactor()))
    task_log = logging.getLogger("tasks.events")
    task_log.addHandler(handler)
    level, task_log.level = task_log.level, logging.INFO
    try:
        _run_the_next_message_as_a_worker(get_app())
    finally:
        task_log.removeHandler(handler)
        task_log.setLevel(level)
    tracing.flush()

    db.expire_all()
    assert db.execute(select(Transaction.status).where(Transaction.invoiceId == invoice.id)).scalar_one() == "paid"

    finished = spans.get_finished_spans()
    by_id = {span.context.span_id: span for span in finished}

    def one(predicate, what):
        found = [span for span in finished if predicate(span)]
        assert len(found) == 1, (what, [s.name for s in finished])
        return found[0]

    def ancestors(span):
        while span.parent is not None and span.parent.span_id in by_id:
            span = by_id[span.parent.span_id]
            yield span

    request = one(lambda s: s.name == "POST /webhooks/stripe", "request span")
    assert request.kind == SpanKind.SERVER
    assert request.attributes[tracing.EVENT_ID] == event["id"]
    assert request.attributes["http.response.status_code"] == 200

    publish = one(lambda s: s.name == tracing.PUBLISH_SPAN, "publish span")
    assert publish.parent is None  # a trace of its own: a message carries many requests' events
    assert list(publish.attributes[tracing.EVENT_IDS]) == [event["id"]]
    assert [(link.context.trace_id, link.context.span_id) for link in publish.links] == [
        (request.context.trace_id, request.context.span_id)]

    sent = one(lambda s: s.name == "apply_async/tasks.events.process_events", "Celery's publish")
    run = one(lambda s: s.name == "run/tasks.events.process_events", "the task")
    update = one(lambda s: s.kind == SpanKind.CLIENT and "UPDATE marketplace.transactions" in
                 str(s.attributes.get("db.statement", "")), "the transaction's UPDATE")
    assert sent.parent.span_id == publish.context.span_id
    assert run.parent.span_id == sent.context.span_id  # across the broker, through the headers
    assert run in list(ancestors(update))
    trace_id = publish.context.trace_id
    assert {sent.context.trace_id, run.context.trace_id, update.context.trace_id} == {trace_id}

    lines = [line for line in _json_lines(logs) if line.get("event_id") == event["id"]]
    assert lines, logs.getvalue()
    assert {line["trace_id"] for line in lines} == {format(trace_id, "032x")}
    assert all(len(line["span_id"]) == 16 for line in lines)


def test_a_line_logged_outside_any_span_has_no_trace_id(spans):
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "no span", None, None)
    assert "trace_id" not in json.loads(JsonFormatter(Redactor()).format(record))


def test_error_reports_are_redacted_like_the_logs():
    before_send = tracing.redacting(Redactor(["configured-secret-value"]))
    event = {
        "message": "failed with sk_live_abcdef0123456789 and configured-secret-value",
        "exception": {"values": [{"value": "postgresql://worker:hunter22@db/marketplace"}]},
        "breadcrumbs": {"values": [{"message": "card 4242 4242 4242 4242", "level": 20}]},
        "level": "error",
    }
    sent = json.dumps(before_send(event, {}))
    for secret in ("sk_live_abcdef0123456789", "configured-secret-value", "hunter22", "4242 4242 4242 4242"):
        assert secret not in sent
    assert "[REDACTED]" in sent and '"level": 20' in sent


# In a process of its own: this one has imported OpenTelemetry for the tests above.
_CHECK = """
import logging, sys
{block}
from config import get_settings
from worker import tracing
from worker.logging_setup import configure_logging
from worker.receiver import create_app

configure_logging()
assert tracing.setup_tracing("marketplace-worker") is False
assert tracing.setup_error_reports() is False
app = create_app(get_settings())
assert app.user_middleware == [], app.user_middleware
assert tracing.publishing(print) is print
logging.getLogger("check").warning("a line")
loaded = sorted(m for m, module in sys.modules.items()
                if module is not None and m.split(".")[0] in ("opentelemetry", "sentry_sdk"))
assert not loaded, loaded
"""


def _check(services, block: str = "", **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, **services, "LOG_JSON": "true", **env}
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "TRACING_ENABLED", "SENTRY_DSN"):
        if name not in env:
            environ.pop(name, None)
    return subprocess.run([sys.executable, "-c", _CHECK.format(block=block)], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=120)


def test_without_configuration_nothing_is_traced_or_loaded(services):
    done = _check(services)
    assert done.returncode == 0, done.stderr
    assert "trace_id" not in done.stderr


def test_configured_without_the_extra_says_so_and_carries_on(services):
    # The extra's packages made unimportable, as in an install without it.
    block = "for name in ('opentelemetry', 'sentry_sdk'): sys.modules[name] = None"
    done = _check(services, block, TRACING_ENABLED="true", SENTRY_DSN="https://key@sentry.example/1")
    assert done.returncode == 0, done.stderr
    assert "observability extra is not installed" in done.stderr
