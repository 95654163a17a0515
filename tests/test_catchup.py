"""Catch-up from Stripe's events API: an outage of the receiver loses nothing."""

from __future__ import annotations

import time

from sqlalchemy import select

from domain.catchup import OVERLAP_SECONDS, catch_up, window_start
from domain.dispatch import handled_types
from domain.stripe_api import get_client
from models import StripeEvent
from models.db import session_scope
from tests.conftest import WEBHOOK_SECRET
from tests.support import factories
from tests.support import stripe_events as se


def inbox(db) -> dict[str, StripeEvent]:
    db.rollback()
    return {e.id: e for e in db.execute(select(StripeEvent)).scalars()}


def test_events_the_endpoint_never_received_are_stored_once(db, stripe_api):
    missed = se.invoice_lifecycle(101, 5000, outcome="paid")
    unhandled = se.event("customer.created", {"id": "cus_1", "object": "customer"})
    se.publish(stripe_api, [*missed, unhandled])

    result = catch_up(session_scope, get_client())

    handled = [e for e in missed if e["type"] in handled_types()]
    assert handled, "the lifecycle must contain event types the worker acts on"
    assert sorted(result.stored) == sorted(e["id"] for e in handled)
    stored = inbox(db)
    assert set(stored) == {e["id"] for e in handled}
    first = handled[0]
    assert stored[first["id"]].endpoint == "catchup" and stored[first["id"]].payload == first

    assert catch_up(session_scope, get_client()).stored == []  # a rerun finds them all known


def test_connect_accounts_events_are_listed_with_their_account(db, stripe_api):
    provider = factories.provider(db, payment_mode="stripe_connect")
    db.commit()
    account = provider.stripeConnectAccountId
    history = se.connect_history(account)
    account_events = [e for e in history if e.get("account") and e["type"] in handled_types()]
    se.publish(stripe_api, history)

    result = catch_up(session_scope, get_client())

    assert {e["id"] for e in account_events} <= set(result.stored)
    assert all(inbox(db)[e["id"]].account == account for e in account_events)
    scoped_calls = [c for c in stripe_api.calls if c.path == "/v1/events" and c.stripe_account == account]
    assert scoped_calls, "connected accounts' events are listed with Stripe-Account"


def test_the_window_starts_an_overlap_before_the_newest_delivered_event(db, stripe_api):
    now = int(time.time())
    with session_scope() as session:
        assert window_start(session, now) == now - 30 * 24 * 3600 + 60
    body, _ = se.webhook(se.event("customer.created", {"id": "cus_2", "object": "customer"},
                                  created=now - 100), WEBHOOK_SECRET)
    from domain.inbox import INSERT_EVENTS_SQL, insert_params, parse_event

    with session_scope() as session:
        session.connection().exec_driver_sql(
            INSERT_EVENTS_SQL, insert_params([parse_event(body.decode(), "platform", livemode=False)])
        )
    with session_scope() as session:
        assert window_start(session, now) == now - 100 - OVERLAP_SECONDS


def test_catch_up_pages_through_long_lists_and_rides_out_a_429(db, stripe_api):
    events = [se.event("payout.paid", se.payout(amount=1000 + i), created=int(time.time()) - i) for i in range(230)]
    se.publish(stripe_api, events)
    stripe_api.fail_next(429, count=2, path_prefix="/v1/events")
    result = catch_up(session_scope, get_client())
    assert len(result.stored) == 230
