"""The webhook receiver answers every case of SPEC §2 exactly, and stores before it answers."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import select, text

from models import StripeEvent
from tests.conftest import CONNECT_WEBHOOK_SECRET, WEBHOOK_SECRET
from harness import stripe_events as se
from harness.flow import ReceiverProcess, wait_for

PLATFORM = "/webhooks/stripe"
CONNECT = "/webhooks/stripe/connect"


@pytest.fixture(scope="module")
def receiver(services, work_dir):
    with ReceiverProcess(services, work_dir / "receiver.log") as proc:
        yield proc


def unhandled_event(**kw) -> dict:
    return se.event("customer.created", {"id": se.new_id("cus"), "object": "customer"}, **kw)


def post(receiver, path, body: bytes, headers: dict) -> httpx.Response:
    return httpx.post(receiver.url + path, content=body, headers=headers, timeout=10)


def stored_ids(db) -> list[str]:
    db.rollback()
    return list(db.execute(select(StripeEvent.id).order_by(StripeEvent.id)).scalars())


def test_a_signed_event_is_stored_before_the_answer_with_what_stripe_sent(receiver, db):
    event = unhandled_event()
    body, headers = se.webhook(event, WEBHOOK_SECRET)
    answer = post(receiver, PLATFORM, body, headers)
    assert answer.status_code == 200
    assert answer.json() == {"status": "stored", "id": event["id"]}
    row = db.get(StripeEvent, event["id"])  # visible the moment the answer arrived
    assert row.payload == event
    assert (row.type, row.endpoint, row.livemode, row.created) == (
        "customer.created", "platform", False, event["created"])
    assert row.api_version == event["api_version"]


def test_a_connect_event_keeps_its_account_and_uses_the_connect_secret(receiver, db):
    event = unhandled_event(account="acct_1ConnectedAccount")
    body, headers = se.webhook(event, CONNECT_WEBHOOK_SECRET)
    assert post(receiver, CONNECT, body, headers).json()["status"] == "stored"
    row = db.get(StripeEvent, event["id"])
    assert (row.account, row.endpoint) == ("acct_1ConnectedAccount", "connect")


def test_a_duplicate_posted_five_times_at_once_is_stored_once(receiver, db):
    event = unhandled_event()
    body, headers = se.webhook(event, WEBHOOK_SECRET)
    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(lambda _: post(receiver, PLATFORM, body, headers), range(5)))
    assert [a.status_code for a in answers] == [200] * 5
    assert sorted(a.json()["status"] for a in answers) == ["duplicate"] * 4 + ["stored"]
    assert stored_ids(db) == [event["id"]]


def test_a_signed_body_replayed_within_the_tolerance_is_a_duplicate(receiver, db):
    event = unhandled_event()
    body, headers = se.webhook(event, WEBHOOK_SECRET, timestamp=int(time.time()) - 200)
    assert post(receiver, PLATFORM, body, headers).json()["status"] == "stored"
    assert post(receiver, PLATFORM, body, headers).json()["status"] == "duplicate"
    assert stored_ids(db) == [event["id"]]


def test_an_event_of_the_other_livemode_is_recorded_as_ignored(receiver, db):
    event = unhandled_event(livemode=True, account="acct_1Live")
    body, headers = se.webhook(event, CONNECT_WEBHOOK_SECRET)
    answer = post(receiver, CONNECT, body, headers)
    assert answer.status_code == 200
    assert answer.json()["status"] == "ignored"
    row = db.get(StripeEvent, event["id"])
    assert row.status == "ignored" and row.last_error == "livemode mismatch"


@pytest.mark.parametrize(
    "case",
    ["forged", "other endpoint's secret", "stale timestamp", "no header", "garbage header"],
)
def test_a_bad_signature_is_refused_and_nothing_is_stored(receiver, db, case):
    event = unhandled_event()
    body = se.encode(event)
    headers = {
        "forged": {"Stripe-Signature": se.sign(body, "whsec_forged_by_someone")},
        "other endpoint's secret": {"Stripe-Signature": se.sign(body, CONNECT_WEBHOOK_SECRET)},
        "stale timestamp": {"Stripe-Signature": se.sign(body, WEBHOOK_SECRET, int(time.time()) - 301)},
        "no header": {},
        "garbage header": {"Stripe-Signature": "not a signature"},
    }[case]
    answer = post(receiver, PLATFORM, body, headers)
    assert answer.status_code == 400
    assert "Traceback" not in answer.text and WEBHOOK_SECRET not in answer.text
    assert stored_ids(db) == []


def test_a_tampered_body_is_refused(receiver, db):
    event = unhandled_event()
    body, headers = se.webhook(event, WEBHOOK_SECRET)
    tampered = body.replace(b'"customer.created"', b'"invoice.paid"')
    assert post(receiver, PLATFORM, tampered, headers).status_code == 400
    assert stored_ids(db) == []


@pytest.mark.parametrize(
    "body, reason",
    [
        (b"{not json", "body is not JSON"),
        (b"\xff\xfe binary", "body is not UTF-8"),
        (b"[" * 5000 + b"]" * 5000, "body is not JSON"),
        (json.dumps({"object": "customer", "id": "cus_1"}).encode(), "not an event"),
        (json.dumps({"object": "event", "id": "evt_1", "type": "invoice.paid"}).encode(), "not an event"),
        (json.dumps({"object": "event", "id": "evt_1", "type": "x", "created": "yesterday",
                     "livemode": False, "data": {"object": {}}}).encode(), "not an event"),
    ],
)
def test_an_authentic_body_that_is_not_an_event_is_refused(receiver, db, body, reason):
    headers = {"Stripe-Signature": se.sign(body.decode("utf-8", "replace"), WEBHOOK_SECRET)}
    if reason == "body is not UTF-8":
        headers = {"Stripe-Signature": f"t={int(time.time())},v1=" + "0" * 64}
    answer = post(receiver, PLATFORM, body, headers)
    assert answer.status_code == 400
    assert answer.json()["error"].startswith(reason)
    assert stored_ids(db) == []


def test_a_body_over_the_limit_is_refused_while_being_read(receiver, db):
    event = unhandled_event()
    event["data"]["object"]["padding"] = "x" * (1024 * 1024)
    body, headers = se.webhook(event, WEBHOOK_SECRET)
    assert post(receiver, PLATFORM, body, headers).status_code == 413

    def chunks():  # no Content-Length: the limit must hold while streaming
        for start in range(0, len(body), 64 * 1024):
            yield body[start:start + 64 * 1024]

    answer = httpx.post(receiver.url + PLATFORM, content=chunks(), headers=headers, timeout=10)
    assert answer.status_code == 413
    assert stored_ids(db) == []


def test_health_and_readiness(receiver, db):
    assert httpx.get(receiver.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(receiver.url + "/readyz")
    assert ready.status_code == 200 and ready.json() == {"database": "ok", "broker": "ok"}


def test_rolled_secrets_are_all_accepted(services, work_dir, db):
    env = {**services, "STRIPE_WEBHOOK_SECRETS": f"whsec_old_secret_1, {WEBHOOK_SECRET}"}
    with ReceiverProcess(env, work_dir / "receiver-rolled.log") as proc:
        for secrets in ("whsec_old_secret_1", WEBHOOK_SECRET, ["whsec_old_secret_1", WEBHOOK_SECRET]):
            body, headers = se.webhook(unhandled_event(), secrets)
            assert post(proc, PLATFORM, body, headers).json()["status"] == "stored"
    assert len(stored_ids(db)) == 3


def test_database_down_answers_503_and_leaks_nothing(services, work_dir, db):
    env = {**services, "DATABASE_URL": "postgresql://postgres:pw-not-for-logs@127.0.0.1:1/nowhere"}
    with ReceiverProcess(env, work_dir / "receiver-nodb.log") as proc:
        body, headers = se.webhook(unhandled_event(), WEBHOOK_SECRET)
        answer = post(proc, PLATFORM, body, headers)
        assert answer.status_code == 503
        assert answer.json() == {"error": "temporarily unavailable"}
        assert httpx.get(proc.url + "/readyz").status_code == 503
    log = proc.log()
    assert "pw-not-for-logs" not in log and WEBHOOK_SECRET not in log and "Traceback" not in log


def test_broker_down_stores_and_answers_200_then_the_sweeper_enqueues(services, work_dir, db, celery_worker):
    env = {**services, "REDIS_URL": "redis://127.0.0.1:1/0"}
    event = unhandled_event()
    with ReceiverProcess(env, work_dir / "receiver-nobroker.log") as proc:
        body, headers = se.webhook(event, WEBHOOK_SECRET)
        answer = post(proc, PLATFORM, body, headers)
        assert answer.json()["status"] == "stored"
    assert db.get(StripeEvent, event["id"]).status == "received"

    from tasks.events import sweep_inbox

    # The sweeper waits for SWEEPER_THRESHOLD_SECONDS (2 s in tests) before calling a message lost.
    wait_for(lambda: sweep_inbox() == {"enqueued": 1}, timeout=10, message="sweeper to claim the event")

    def final_status():
        db.rollback()
        return db.execute(
            text("SELECT status FROM marketplace_worker.stripe_events WHERE id = :id"), {"id": event["id"]}
        ).scalar() in ("ignored", "processed")

    wait_for(final_status, message="the worker to process the swept event")


def test_ids_stored_moments_apart_share_one_message(services):
    from tasks.events import BATCH_SIZE, GATHER_SECONDS, Publisher

    messages: list[list[str]] = []
    publisher = Publisher(messages.append)  # the broker is not what this test is about
    for event_id in ("evt_1", "evt_2", "evt_3"):  # three commits, one request each
        publisher.submit([event_id])
        time.sleep(GATHER_SECONDS / 10)
    wait_for(lambda: messages, message="the gathered ids to be published")
    assert messages == [["evt_1", "evt_2", "evt_3"]]

    full = [f"evt_full_{n}" for n in range(BATCH_SIZE)]
    publisher.submit(full)
    wait_for(lambda: len(messages) == 2, message="the full batch to be published")
    assert messages[1] == full


def test_a_commit_of_more_ids_than_a_message_sends_the_full_one_and_gathers_the_rest(services, monkeypatch):
    from tasks import events

    # Long enough that a busy machine does not send the remainder before the next commit.
    monkeypatch.setattr(events, "GATHER_SECONDS", 1.0)
    messages: list[list[str]] = []
    publisher = events.Publisher(messages.append)
    crowded = [f"evt_crowded_{n}" for n in range(events.BATCH_SIZE + 3)]
    publisher.submit(crowded)
    wait_for(lambda: messages, message="the full message to be published")
    publisher.submit(["evt_next_commit"])
    wait_for(lambda: len(messages) == 2, message="the remainder to be published with the next commit")
    assert messages == [crowded[:events.BATCH_SIZE], crowded[events.BATCH_SIZE:] + ["evt_next_commit"]]

    # Left alone, the remainder goes once its oldest id has waited its gathering time.
    publisher.submit(crowded)
    wait_for(lambda: len(messages) == 4, message="a lone remainder to be published")
    assert messages[2:] == [crowded[:events.BATCH_SIZE], crowded[events.BATCH_SIZE:]]


def test_closing_the_publisher_sends_what_it_was_still_gathering(services, monkeypatch):
    from tasks import events

    monkeypatch.setattr(events, "GATHER_SECONDS", 60.0)  # no message would go out before a minute
    messages: list[list[str]] = []
    publisher = events.Publisher(messages.append)
    publisher.submit(["evt_last_1", "evt_last_2"])
    publisher.close()
    assert messages == [["evt_last_1", "evt_last_2"]]


@pytest.mark.flow
def test_a_connected_accounts_invoice_paid_goes_through_the_worker_and_changes_no_platform_invoice(
        receiver, db, celery_worker):
    """A connected account's own invoice of 1 cent, paid, naming a platform invoice in its
    metadata, delivered to the Connect endpoint and taken by a real worker."""
    from models import Transaction
    from harness import factories

    provider = factories.provider(db, payment_mode="stripe")
    invoice = factories.invoice(db, provider, stripe=False, status="open", amount_cents=10_000)
    db.commit()
    before = (invoice.status, invoice.stripeInvoiceId, invoice.amountPaidCents, invoice.paidAt)
    foreign = se.invoice(app_invoice_id=str(invoice.id), amount=1, status="paid")
    event = se.event("invoice.paid", foreign, account="acct_1ConnectedAccount")
    body, headers = se.webhook(event, CONNECT_WEBHOOK_SECRET)
    assert post(receiver, CONNECT, body, headers).json()["status"] == "stored"

    def taken():
        db.expire_all()
        row = db.get(StripeEvent, event["id"])
        return row if row.status not in ("received", "retrying") else None

    row = wait_for(taken, message="the worker to take the connected account's event")
    assert row.status == "ignored", (row.status, row.last_error)
    assert row.last_error == "connected account acct_1ConnectedAccount: its invoice.paid changes no platform record"
    db.refresh(invoice)
    assert (invoice.status, invoice.stripeInvoiceId, invoice.amountPaidCents, invoice.paidAt) == before
    assert db.execute(select(Transaction).where(Transaction.invoiceId == invoice.id)).first() is None
