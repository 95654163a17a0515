"""Traces and error reports (worker/tracing.py): a signed webhook's request, the publish of its
message, the worker's task and the UPDATE of its transaction, tied together as the module
documents; the task's JSON log lines carry the trace id; nothing of it loads unless enabled."""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from sqlalchemy import select
from starlette.testclient import TestClient

from config import get_settings
from harness import factories
from harness import stripe_events as se
from harness.flow import wait_for
from harness.workers import WorkerProcess
from models import Transaction
from tests.conftest import WEBHOOK_SECRET
from worker import tracing
from worker.logging_setup import JsonFormatter, Redactor, TaskContext

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_790_000_000
# The receiver's messages go to a queue of their own here, out of reach of the suite's worker.
QUEUE = "tracing-test"


@pytest.fixture
def spans(services):
    exporter = InMemorySpanExporter()
    assert tracing.setup_tracing("marketplace-test", exporter=exporter)
    try:
        yield exporter
    finally:
        tracing.shutdown_tracing()


@pytest.fixture
def private_queue(monkeypatch):
    """The receiver's publisher sends to QUEUE (through Celery's publish, headers and all)."""
    import tasks.events
    from tasks.base import worker_app

    def enqueue(event_ids: list[str]) -> None:
        with worker_app().producer_or_acquire() as producer:
            tasks.events.process_events.apply_async((event_ids,), producer=producer, retry=False, queue=QUEUE)

    monkeypatch.setattr(tasks.events, "enqueue_events", enqueue)
    return QUEUE


def _run_the_next_message_as_a_worker(app, timeout: float = 10) -> None:
    """Take the message the receiver's publisher sent off the broker and run it through the
    worker's own path (its headers become the task's request), in this process so that its
    spans reach the in-memory exporter."""
    from celery.worker.request import Request

    with app.connection_for_read() as conn:
        queue = conn.SimpleQueue(QUEUE)
        try:
            message = queue.get(timeout=timeout)
            Request(message, app=app, task=app.tasks[message.headers["task"]]).execute()
            message.ack()
        finally:
            queue.close()


def _paid_invoice_event(db) -> tuple[int, dict]:
    """An app invoice with its `invoiced` transaction, and Stripe's invoice.paid for it."""
    provider = factories.provider(db, payment_mode="stripe")
    invoice = factories.invoice(db, provider, amount_cents=10_000, stripe=False, status="open")
    factories.transaction(db, invoice, status="invoiced")
    db.commit()
    snapshot = se.invoice(id="in_tracing0001", app_invoice_id=str(invoice.id), amount=10_000, status="paid",
                          created=T0, status_transitions={"finalized_at": T0, "paid_at": T0 + 60,
                                                          "voided_at": None, "marked_uncollectible_at": None})
    return invoice.id, se.event("invoice.paid", snapshot, created=T0 + 60)


def _post(event: dict) -> None:
    from worker.receiver import create_app

    with TestClient(create_app(get_settings())) as client:
        body, headers = se.webhook(event, WEBHOOK_SECRET)
        answer = client.post("/webhooks/stripe", content=body, headers=headers)
        assert answer.json() == {"status": "stored", "id": event["id"]}


def _status(db, invoice_id: int) -> str:
    db.expire_all()
    return db.execute(select(Transaction.status).where(Transaction.invoiceId == invoice_id)).scalar_one()


def _json_lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_one_trace_from_the_webhook_to_the_transaction_update(db, spans, private_queue):
    from worker import get_app

    invoice_id, event = _paid_invoice_event(db)
    _post(event)

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

    assert _status(db, invoice_id) == "paid"

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


# A key-shaped value for the redaction tests, assembled so that no key-shaped literal sits in
# the source for scanners to flag.
LEAKED_KEY = "sk_" + "live_" + "abcdef0123456789"


def test_error_reports_are_redacted_like_the_logs():
    before_send = tracing.redacting(Redactor(["configured-secret-value"]))
    event = {
        "message": f"failed with {LEAKED_KEY} and configured-secret-value",
        "exception": {"values": [{"value": "postgresql://worker:hunter22@db/marketplace"}]},
        "breadcrumbs": {"values": [{"message": "card 4242 4242 4242 4242", "level": 20}]},
        "level": "error",
    }
    sent = json.dumps(before_send(event, {}))
    for secret in (LEAKED_KEY, "configured-secret-value", "hunter22", "4242 4242 4242 4242"):
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


# --- across processes -----------------------------------------------------------------------


@contextmanager
def collector() -> Iterator[tuple[str, dict[str, list[bytes]]]]:
    """An HTTP server keeping what is POSTed to it by path: an OTLP collector, a Sentry."""
    received: dict[str, list[bytes]] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            if self.headers.get("content-encoding") == "gzip":
                body = gzip.decompress(body)
            received.setdefault(self.path, []).append(body)
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", received
    finally:
        server.shutdown()
        server.server_close()


def _exported_spans(bodies: list[bytes]) -> list:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    found = []
    for body in bodies:
        request = ExportTraceServiceRequest.FromString(body)
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                found.extend(scope.spans)
    return found


@pytest.mark.flow
def test_a_worker_process_continues_the_publish_trace_it_receives(db, spans, private_queue, services, work_dir):
    invoice_id, event = _paid_invoice_event(db)
    with collector() as (url, received):
        env = {**services, "OTEL_EXPORTER_OTLP_ENDPOINT": url, "OTEL_BSP_SCHEDULE_DELAY": "100",
               "SENTRY_DSN": url.replace("http://", "http://publickey@") + "/1"}
        with WorkerProcess(env, work_dir / "tracing-worker.log", concurrency=1, name="tracing", queues=[QUEUE]):
            _post(event)
            wait_for(lambda: _status(db, invoice_id) == "paid", message="the transaction paid")
            tracing.flush()
            sent = [s for s in spans.get_finished_spans() if s.name == "apply_async/tasks.events.process_events"]
            assert len(sent) == 1

            def worker_spans() -> list:
                # The task's span ends after its statements': it may come in a later export.
                exported = _exported_spans(received.get("/v1/traces", []))
                names = {s.name for s in exported}
                done = "run/tasks.events.process_events" in names and any(n.startswith("UPDATE") for n in names)
                return exported if done else []

            exported = wait_for(worker_spans, timeout=20, message="the worker's spans")
    (run,) = [s for s in exported if s.name == "run/tasks.events.process_events"]
    assert int.from_bytes(run.trace_id, "big") == sent[0].context.trace_id
    assert int.from_bytes(run.parent_span_id, "big") == sent[0].context.span_id
    update = [s for s in exported if s.name.startswith("UPDATE") and s.trace_id == run.trace_id]
    assert update, [s.name for s in exported]


def test_error_reports_reach_sentry_redacted(services):
    with collector() as (url, received):
        dsn = url.replace("http://", "http://publickey@") + "/1"
        script = (
            "import logging, sentry_sdk\n"
            "from worker.tracing import setup_error_reports\n"
            "assert setup_error_reports()\n"
            f"logging.getLogger('tasks.events').error('charge failed with {LEAKED_KEY} for %s',"
            " 'card 4242 4242 4242 4242')\n"
            "sentry_sdk.flush(5)\n"
        )
        environ = {**os.environ, **services, "SENTRY_DSN": dsn}
        done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=environ,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        reports = b"".join(received.get("/api/1/envelope/", [])).decode()
    assert "charge failed" in reports
    assert LEAKED_KEY not in reports and "4242 4242 4242 4242" not in reports
    assert "[REDACTED]" in reports
