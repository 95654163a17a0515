"""Hostile input: random, huge, mistyped, unicode and deeply nested bodies get a defined
answer from the receiver, and never crash event processing."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st
from sqlalchemy import text
from starlette.testclient import TestClient

from config import get_settings
from domain import dispatch
from domain.handlers import handled_types
from domain.inbox import INSERT_EVENTS_SQL, insert_params, parse_event
from models.db import session_scope
from tests.conftest import WEBHOOK_SECRET
from harness import stripe_events as se
from worker.receiver import create_app

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=25,
)

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def client(services):
    with TestClient(create_app(get_settings())) as test_client:
        yield test_client


def envelope(obj, event_type: str, **overrides) -> dict:
    event = se.event(event_type, {})
    event["data"]["object"] = obj
    event.update(overrides)
    return event


# A v1 event's fields, each right; the fuzz sends such events with one field wrong or missing,
# so that it reaches every check of the receiver and some of its bodies must be stored.
EVENT_FIELDS = {
    "object": st.just("event"),
    "id": st.from_regex(r"evt_[A-Za-z0-9]{1,24}", fullmatch=True),
    "type": st.text(min_size=1, max_size=40),
    "created": st.integers(min_value=1, max_value=2**40 - 1),
    "livemode": st.booleans(),
    "data": st.fixed_dictionaries({"object": st.dictionaries(st.text(max_size=10), json_values, max_size=4)}),
    "account": st.none() | st.text(max_size=20),
}


@st.composite
def events_with_a_wrong_field(draw) -> dict:
    body = draw(st.fixed_dictionaries(EVENT_FIELDS))
    field = draw(st.sampled_from([None, *EVENT_FIELDS]))
    if field is not None:
        if draw(st.booleans()):
            del body[field]
        else:
            body[field] = draw(json_values)
    return body


A_STORED_EVENT = se.event("customer.created", {"id": "cus_fuzz", "object": "customer"})


def _is_event(body) -> bool:
    """What the receiver must take for a v1 event (SPEC §2; its own check: domain/inbox.py)."""
    if not isinstance(body, dict) or body.get("object") != "event":
        return False
    event_id, event_type, created, data = body.get("id"), body.get("type"), body.get("created"), body.get("data")
    return (isinstance(event_id, str) and event_id.startswith("evt_") and len(event_id) <= 255
            and isinstance(event_type, str) and 0 < len(event_type) <= 255
            and type(created) is int and 0 < created < 2**40
            and isinstance(data, dict) and isinstance(data.get("object"), dict)
            and isinstance(body.get("livemode"), bool)
            and (body.get("account") is None or isinstance(body["account"], str)))


def _stored_events() -> dict[str, tuple]:
    with session_scope() as session:
        rows = session.execute(text(
            "SELECT id, type, created, livemode, endpoint FROM marketplace_worker.stripe_events")).all()
    return {row[0]: tuple(row[1:]) for row in rows}


@FUZZ
@given(body=json_values | events_with_a_wrong_field())
@example(body=A_STORED_EVENT)
@example(body=[A_STORED_EVENT])
@example(body={**A_STORED_EVENT, "id": "cus_fuzz"})
@example(body={**A_STORED_EVENT, "type": "customer.updated"})  # the same id again: a duplicate
def test_any_signed_json_gets_a_4xx_or_is_stored(client, db, body):
    """A refused body leaves the inbox as it was; an accepted one is in it once, as sent. (A
    crash of the receiver raises here: the test client re-raises the application's errors.)"""
    raw = json.dumps(body)
    before = _stored_events()
    answer = client.post("/webhooks/stripe", content=raw, headers={"Stripe-Signature": se.sign(raw, WEBHOOK_SECRET)})
    after = _stored_events()
    if not _is_event(body):
        assert 400 <= answer.status_code < 500, answer.text
        assert after == before
        return
    assert answer.status_code == 200, answer.text
    assert answer.json()["id"] == body["id"]
    # JSON allows NUL in strings, jsonb does not: the receiver stores U+FFFD in its place.
    sent = (body["type"].replace("\x00", "\ufffd"), body["created"], body["livemode"], "platform")
    if answer.json()["status"] == "duplicate":
        assert body["id"] in before and after == before
    else:
        assert body["id"] not in before
        assert after == {**before, body["id"]: sent}


@FUZZ
@given(raw=st.binary(max_size=300), signed=st.booleans())
def test_any_bytes_get_a_defined_answer(client, db, raw, signed):
    headers = {"Stripe-Signature": se.sign(raw.decode("utf-8", "replace"), WEBHOOK_SECRET)} if signed else {}
    answer = client.post("/webhooks/stripe", content=raw, headers=headers)
    assert answer.status_code == 400


@FUZZ
@given(
    event_type=st.sampled_from(handled_types()),
    obj=st.dictionaries(
        st.sampled_from(["id", "object", "status", "amount", "amount_refunded", "charge", "payment_intent",
                         "metadata", "status_transitions", "created", "invoice", "destination", "payments",
                         "amount_paid", "livemode", "refunded", "arrival_date", "details_submitted"]),
        json_values, max_size=10,
    ),
    created=st.integers(min_value=1, max_value=2**40 - 1),
)
# Amounts of the wrong type, always tried: a handler that used them unchecked would crash.
@example(event_type="charge.refunded", obj={"id": "ch_fuzz1", "object": "charge", "amount": "100"}, created=1)
@example(event_type="refund.created", obj={"id": "re_fuzz1", "object": "refund", "charge": "ch_fuzz1",
                                           "status": "succeeded", "amount": 1.5}, created=1)
@example(event_type="invoice.paid", obj={"id": "in_fuzz1", "object": "invoice", "status": "paid",
                                         "amount_paid": None, "metadata": {"invoiceId": "1"}}, created=1)
def test_no_payload_crashes_processing_and_every_parked_event_says_why(services, event_type, obj, created):
    """Whatever an authentic event carries, processing ends in a recorded state."""
    status, error = _process_until_settled(envelope(obj, event_type, created=created))
    assert status in ("processed", "ignored", "parked")
    if status == "parked":
        assert error and len(error) < 600 and "Traceback" not in error
        # Refused for what it carries, never a handler's crash (a TypeError parks as well).
        assert error.startswith(("InvalidPayload: ", "NotYetKnown: ", "DataError: ")), error


@pytest.mark.parametrize(("event_type", "kind"), [("invoice.paid", "invoice"), ("charge.refunded", "charge"),
                                                  ("transfer.created", "transfer")])
def test_an_event_carrying_another_kind_of_object_is_parked_and_says_so(db, event_type, kind):
    status, error = _process_until_settled(envelope({"object": "payout", "id": "po_1"}, event_type))
    assert (status, error) == ("parked", f"InvalidPayload: {event_type} carries a 'payout', not a {kind}")


def _broken(obj: dict, **changes) -> dict:
    """A Stripe object with fields changed; a None value removes the field."""
    obj = {**obj, **changes}
    return {name: value for name, value in obj.items() if value is not None}


_ACCOUNT = "acct_1Broken000000001"
_TRANSITIONS = {"finalized_at": 1, "paid_at": 2, "voided_at": None, "marked_uncollectible_at": None}
BROKEN_PAYLOADS = [
    ("invoice.paid", _broken(se.invoice(id="in_broken1", status="paid"), status_transitions="soon"), {},
     "invoice status_transitions is not an object"),
    ("invoice.paid", _broken(se.invoice(id="in_broken2", status="paid"),
                             status_transitions={**_TRANSITIONS, "paid_at": "yesterday"}), {},
     "status_transitions.paid_at is not a unix timestamp"),
    ("invoice.paid", _broken(se.invoice(id="in_broken3", status="paid"), metadata={"invoiceId": "abc"}), {},
     "invoice in_broken3 metadata.invoiceId is not an id: 'abc'"),
    ("charge.refunded", _broken(se.charge(id="ch_broken1", amount=500), amount_refunded="500"), {},
     "charge ch_broken1 amount_refunded is not an integer"),
    ("refund.created", _broken(se.refund(id="re_broken1", charge="ch_broken1", amount=500), id=None), {},
     "refund without an id"),
    ("refund.created", _broken(se.refund(id="re_broken2", charge="ch_broken1", amount=500), charge=None,
                               payment_intent=None), {},
     "refund re_broken2 names neither a charge nor a PaymentIntent"),
    ("refund.updated", _broken(se.refund(id="re_broken3", charge="ch_broken1", amount=500), status=None), {},
     "refund re_broken3 has no status"),
    ("charge.dispute.created", _broken(se.dispute(id="dp_broken1", charge="ch_broken1", amount=500), status=None),
     {}, "dispute dp_broken1 lacks a status or a charge"),
    ("transfer.created", _broken(se.transfer(id="tr_broken1", amount=500, destination=_ACCOUNT),
                                 destination=None), {}, "transfer without an id or a destination"),
    ("payout.paid", _broken(se.payout(id="po_broken1", amount=500), status=None), {"account": _ACCOUNT},
     "payout without an id or a status"),
    ("account.application.deauthorized", {"id": "ca_broken1", "object": "application", "name": "Marketplace"},
     {}, "account.application.deauthorized without an account"),
]
# What an event refused for its payload must not have written.
_RECORDS = ("stripe_object_versions", "stripe_charges", "stripe_refunds", "stripe_disputes",
            "stripe_invoice_payments", "connect_transfers", "connect_payouts", "connect_account_states",
            "transaction_refunds")


@pytest.mark.parametrize(("event_type", "obj", "fields", "reason"), BROKEN_PAYLOADS,
                         ids=[f"{case[0]}: {case[3]}" for case in BROKEN_PAYLOADS])
def test_a_payload_missing_or_mistyping_what_it_needs_is_parked_with_why_and_writes_nothing(
        db, event_type, obj, fields, reason):
    status, error = _process_until_settled(envelope(obj, event_type, **fields))
    assert (status, error) == ("parked", f"InvalidPayload: {reason}")
    written = {table: db.execute(text(f"SELECT count(*) FROM marketplace_worker.{table}")).scalar_one()
               for table in _RECORDS}
    assert written == dict.fromkeys(_RECORDS, 0)


def _process_until_settled(event: dict) -> tuple[str, str | None]:
    """Stored as the receiver stores it, then attempted as often as the worker would."""
    incoming = parse_event(json.dumps(event), "platform", livemode=False)
    with session_scope() as session:
        session.connection().exec_driver_sql(INSERT_EVENTS_SQL, insert_params([incoming]))
    for _ in range(get_settings().event_max_attempts):
        dispatch.attempt_event(session_scope, event["id"], max_attempts=get_settings().event_max_attempts)
    with session_scope() as session:
        return tuple(session.execute(
            text("SELECT status, last_error FROM marketplace_worker.stripe_events WHERE id = :id"),
            {"id": event["id"]},
        ).one())


def test_huge_and_deep_bodies_are_refused_without_harm(client, db):
    deep = "[" * 100_000 + "]" * 100_000
    answer = client.post("/webhooks/stripe", content=deep, headers={"Stripe-Signature": se.sign(deep, WEBHOOK_SECRET)})
    assert answer.status_code in (400, 413)
    assert _stored_events() == {}
    nul = json.dumps(se.event("customer.created", {"id": "cus_1", "object": "customer", "name": "a\u0000b"}))
    answer = client.post("/webhooks/stripe", content=nul, headers={"Stripe-Signature": se.sign(nul, WEBHOOK_SECRET)})
    assert answer.status_code == 200 and answer.json()["status"] == "stored"
    assert list(_stored_events()) == [answer.json()["id"]]


@pytest.mark.parametrize("poison", ['"\\ud800"', "Infinity", "NaN", '"\\u0000"'])
def test_a_value_jsonb_refuses_is_answered_alone_and_its_neighbours_are_stored(client, db, poison):
    from concurrent.futures import ThreadPoolExecutor

    good = [json.dumps(se.event("customer.created", {"id": f"cus_{i}", "object": "customer"})) for i in range(8)]
    bad = json.dumps(se.event("customer.created", {"id": "cus_bad", "object": "customer", "name": "X"}))
    bad = bad.replace('"X"', poison)
    bodies = good + [bad]

    def post(raw):
        return client.post("/webhooks/stripe", content=raw, headers={"Stripe-Signature": se.sign(raw, WEBHOOK_SECRET)})

    with ThreadPoolExecutor(9) as pool:
        answers = list(pool.map(post, bodies))
    assert [a.status_code for a in answers[:8]] == [200] * 8
    stored = {json.loads(raw)["id"] for raw in good}
    if poison == '"\\u0000"':  # stored, with U+FFFD in place of NUL
        assert answers[8].status_code == 200
        stored.add(answers[8].json()["id"])
    else:
        assert answers[8].status_code == 400
        assert answers[8].json()["error"] in ("body is not JSON", "body is not storable JSON")
    assert set(_stored_events()) == stored


def test_a_forged_signature_never_reaches_the_inbox_whatever_the_body(client, db):
    event = se.event("invoice.paid", se.invoice(shape="basil", amount=100))
    raw = json.dumps(event)
    for header in (f"t={int(time.time())},v1={'0' * 64}", f"t={int(time.time())},v0=abc", "t=,v1=", "v1=" + "a" * 64):
        assert client.post("/webhooks/stripe", content=raw, headers={"Stripe-Signature": header}).status_code == 400
    with session_scope() as session:
        assert session.execute(text("SELECT count(*) FROM marketplace_worker.stripe_events")).scalar() == 0


def test_a_body_rewritten_for_its_nul_keeps_every_number_exact():
    """The one body not stored as Stripe signed it (NUL is not storable in jsonb) is rewritten
    from an exact reading: an integer past 64 bits stays that integer, not a float."""
    event = se.event("customer.created", {"id": "cus_1", "object": "customer", "name": "a\u0000b",
                                          "metadata": {"big": 12345678901234567890123}})
    stored = json.loads(parse_event(json.dumps(event), "platform", livemode=False).body)
    assert stored["data"]["object"]["metadata"]["big"] == 12345678901234567890123
    assert stored["data"]["object"]["name"] == "a\ufffdb"
