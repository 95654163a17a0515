"""Catch-up from Stripe's events API: an outage of the receiver loses nothing, one bad account
stops nobody, and a healthy run costs the same few calls however many accounts there are."""

from __future__ import annotations

import json
import time

from sqlalchemy import select, text

from domain import catchup
from domain.catchup import LISTED_OVERLAP_SECONDS, OVERLAP_SECONDS, catch_up
from domain.dispatch import process_event
from domain.handlers import handled_types
from domain.inbox import INSERT_EVENTS_SQL, event_from_dict, insert_params
from domain.stripe_api import get_client
from models import StripeEvent
from models.db import session_scope
from harness import factories
from harness import stripe_events as se

HOUR = 3600


def inbox(db) -> dict[str, StripeEvent]:
    db.rollback()
    return {e.id: e for e in db.execute(select(StripeEvent)).scalars()}


def webhook(db, event: dict, endpoint: str, *, received_ago: int = 0) -> None:
    """An event as the receiver stores it, `received_ago` seconds ago."""
    incoming = event_from_dict(event, json.dumps(event), endpoint, livemode=False)
    db.connection().exec_driver_sql(INSERT_EVENTS_SQL, insert_params([incoming]))
    db.execute(text("UPDATE marketplace_worker.stripe_events SET received_at = now() - make_interval(secs => :ago) "
                    "WHERE id = :id"), {"ago": received_ago, "id": event["id"]})
    db.commit()


def events_calls(stripe_api, account: str | None = None) -> list:
    return [c for c in stripe_api.calls if c.path == "/v1/events" and c.stripe_account == account]


def account_calls(stripe_api) -> list:
    return [c for c in stripe_api.calls if c.path == "/v1/events" and c.stripe_account]


def connect_providers(db, n: int) -> list[str]:
    accounts = [factories.provider(db, payment_mode="stripe_connect").stripeConnectAccountId for _ in range(n)]
    db.commit()
    return accounts


def steady_state(db, stripe_api, listed_ago: int) -> None:
    """A first run has listed every scope, `listed_ago` seconds ago."""
    assert catch_up(session_scope, get_client()).failed == {}
    with session_scope() as session:
        session.execute(text("UPDATE marketplace_worker.catchup_windows SET listed_until = listed_until - :ago"),
                        {"ago": listed_ago})
        session.execute(text("UPDATE marketplace_worker.watermarks "
                             "SET position_at = position_at - make_interval(secs => :ago)"), {"ago": listed_ago})
    stripe_api.reset()


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

    result = catch_up(session_scope, get_client())  # the first run lists every account

    assert {e["id"] for e in account_events} <= set(result.stored)
    assert all(inbox(db)[e["id"]].account == account for e in account_events)
    assert events_calls(stripe_api, account), "connected accounts' events are listed with Stripe-Account"


def test_each_window_starts_an_overlap_before_what_its_scope_last_had(db, stripe_api):
    now = int(time.time())
    retention_floor = now - 30 * 24 * HOUR + 60
    assert catchup.window_start(None, None, None, now) == retention_floor
    assert catchup.window_start(None, now - 100, None, now) == now - 100 - OVERLAP_SECONDS
    assert catchup.window_start(now - 50, now - 100, None, now) == now - 50 - LISTED_OVERLAP_SECONDS
    assert catchup.window_start(now - 50, None, now - 5 * HOUR, now) == now - 5 * HOUR  # a gap reaches back
    assert catchup.window_start(None, now - 40 * 24 * HOUR, None, now) == retention_floor

    account = connect_providers(db, 1)[0]
    webhook(db, se.event("customer.created", {"id": "cus_2", "object": "customer"}, created=now - 100), "platform")
    webhook(db, se.account_updated(se.account(id=account), created=now - 2 * HOUR), "connect")
    # catch-up's own events do not move a window: they say nothing of the endpoint
    catchup.store_missed(db, [se.event("payout.paid", se.payout(amount=1), created=now - 10, account=account)],
                         account)
    db.commit()
    with session_scope() as session:
        assert catchup.platform_window(session, now).since == now - 100 - OVERLAP_SECONDS
        catchup.flag(session, [account], "test")
    with session_scope() as session:
        [window] = catchup.account_windows(session, [account], now)
        assert window.since == now - 2 * HOUR - OVERLAP_SECONDS


def test_catch_up_pages_through_long_lists_and_rides_out_a_429(db, stripe_api):
    events = [se.event("transfer.created", se.transfer(amount=1000 + i, destination="acct_1PAGING"), created=int(time.time()) - i)
              for i in range(230)]
    se.publish(stripe_api, events)
    stripe_api.fail_next(429, count=2, path_prefix="/v1/events")
    result = catch_up(session_scope, get_client())
    assert len(result.stored) == 230


def test_a_403_account_first_does_not_stop_the_others(db, stripe_api, monkeypatch):
    gone, healthy = "acct_1AAAAAAAAAAAAAAA", "acct_1ZZZZZZZZZZZZZZZ"
    deauthorized = "acct_1MMMMMMMMMMMMMMM"
    for account in (gone, healthy, deauthorized):
        factories.provider(db, payment_mode="stripe_connect", stripeConnectAccountId=account)
    db.commit()
    webhook(db, se.account_deauthorized(deauthorized, created=int(time.time()) - HOUR), "connect")
    with session_scope() as session:
        assert process_event(session, inbox(db).popitem()[0]) == "processed"
    payout = se.payout(amount=7_000, status="paid")
    missed = se.event("payout.paid", payout, account=healthy)
    se.publish(stripe_api, [missed])
    handle = stripe_api.handle

    def revoked(method, path, pairs, **kw):  # what Stripe answers for an account that left
        if path == "/v1/events" and kw.get("stripe_account") == gone:
            return 403, {"error": {"type": "invalid_request_error", "code": "account_invalid", "message": (
                f"The provided key 'sk_test_****' does not have access to account '{gone}' (or that account does "
                "not exist). Application access may have been revoked.")}}, {}
        return handle(method, path, pairs, **kw)

    monkeypatch.setattr(stripe_api, "handle", revoked)

    result = catch_up(session_scope, get_client())

    assert missed["id"] in result.stored
    assert inbox(db)[missed["id"]].account == healthy
    assert not events_calls(stripe_api, deauthorized), "a deauthorized account is not listed"
    assert set(result.failed) == {gone} and "PermissionError" in result.failed[gone]
    windows = {row.scope: row for row in db.execute(text("SELECT * FROM marketplace_worker.catchup_windows"))}
    assert windows[gone].failures == 1 and windows[gone].pending_at and windows[gone].retry_at
    assert windows[healthy].pending_at is None

    stripe_api.reset()
    again = catch_up(session_scope, get_client())  # within the failed account's backoff
    assert not account_calls(stripe_api) and again.failed == {}


def test_webhooks_on_the_platform_do_not_hide_a_silent_connect_endpoint(db, stripe_api):
    now = int(time.time())
    account = connect_providers(db, 1)[0]
    steady_state(db, stripe_api, listed_ago=6 * HOUR)
    webhook(db, se.account_updated(se.account(id=account), created=now - 6 * HOUR), "connect",
            received_ago=6 * HOUR)
    # The platform endpoint keeps receiving; the Connect endpoint has received nothing since.
    webhook(db, se.event("invoice.updated", se.invoice(), created=now - 60), "platform", received_ago=60)
    missed = [se.event("payout.paid", se.payout(amount=100 * n), created=now - n * HOUR, account=account)
              for n in (5, 4, 3)]
    se.publish(stripe_api, missed)

    result = catch_up(session_scope, get_client())

    assert {e["id"] for e in missed} <= set(result.stored)
    assert "no Connect delivery" in result.gap
    [call] = events_calls(stripe_api, account)
    assert int(call.params["created"]["gte"]) <= now - 6 * HOUR


def test_a_late_connect_delivery_lists_the_accounts_from_where_the_gap_began(db, stripe_api):
    now = int(time.time())
    accounts = connect_providers(db, 2)
    steady_state(db, stripe_api, listed_ago=6 * HOUR)
    for account in accounts:
        webhook(db, se.account_updated(se.account(id=account), created=now - 6 * HOUR), "connect",
                received_ago=6 * HOUR)
    webhook(db, se.event("invoice.updated", se.invoice(), created=now - 60), "platform", received_ago=60)
    missed = [se.event("payout.paid", se.payout(amount=100 * n), created=now - n * HOUR, account=accounts[1])
              for n in (5, 4)]
    se.publish(stripe_api, missed)
    # The endpoint is back: Stripe retries an event of the outage, hours after it was created.
    webhook(db, se.event("payout.updated", se.payout(amount=1), created=now - 3 * HOUR, account=accounts[0]),
            "connect", received_ago=60)

    result = catch_up(session_scope, get_client())

    assert {e["id"] for e in missed} <= set(result.stored)
    assert "late" in result.gap
    assert {c.stripe_account for c in account_calls(stripe_api)} == set(accounts)


def test_the_types_once_missing_are_asked_for_and_stored(db, stripe_api):
    account = connect_providers(db, 1)[0]
    ch = se.charge(amount=5_000)
    dp = se.dispute(charge=ch["id"], amount=5_000)
    re_ = se.refund(charge=ch["id"], amount=1_000)
    platform = [
        se.event("invoice.created", se.invoice(status="draft")),
        se.event("refund.failed", re_ | {"status": "failed", "failure_reason": "expired_or_canceled_card"}),
        se.event("charge.refund.updated", re_),
        se.event("charge.dispute.updated", dp),
        se.event("charge.dispute.funds_withdrawn", dp),
        se.event("charge.dispute.funds_reinstated", dp),
    ]
    connect = [se.event("payout.reconciliation_completed", se.payout(amount=4_000), account=account)]
    se.publish(stripe_api, [*platform, *connect])

    result = catch_up(session_scope, get_client())

    assert {e["id"] for e in platform + connect} <= set(result.stored)
    asked = [c.params["types"] for c in events_calls(stripe_api)]
    asked_account = [c.params["types"] for c in events_calls(stripe_api, account)]
    assert all(len(types) <= 20 for types in asked + asked_account)
    # Every handled type is asked of the scope whose events it can change: the platform's own
    # payouts are not reconciled, and an account's invoices change no platform record.
    platform_asked = sorted(t for types in asked for t in types)
    account_asked = sorted(t for types in asked_account for t in types)
    assert platform_asked == sorted(catchup.platform_types()) and "payout.paid" not in platform_asked
    assert account_asked == sorted(catchup.account_types()) and "invoice.paid" not in account_asked
    assert set(platform_asked) | set(account_asked) == set(handled_types())


def test_a_healthy_run_costs_the_same_calls_at_any_number_of_accounts(db, stripe_api):
    def healthy_run(accounts: list[str]) -> int:
        now = int(time.time())
        webhook(db, se.event("invoice.updated", se.invoice(), created=now - 60), "platform", received_ago=60)
        webhook(db, se.account_updated(se.account(id=accounts[-1]), created=now - 60), "connect", received_ago=60)
        stripe_api.reset()
        catch_up(session_scope, get_client())
        assert not account_calls(stripe_api), "no connected account is listed while the endpoints deliver"
        return len(stripe_api.calls)

    accounts = connect_providers(db, 5)
    steady_state(db, stripe_api, listed_ago=600)
    few = healthy_run(accounts)
    accounts += connect_providers(db, 40)
    many = healthy_run(accounts)
    assert few == many == -(-len(handled_types()) // 20)


def test_the_operator_command_catches_up_one_account_from_a_date(db, stripe_api, services, capsys):
    from datetime import UTC, datetime, timedelta

    from worker.cli import main

    account = connect_providers(db, 1)[0]
    steady_state(db, stripe_api, listed_ago=60)
    day = (datetime.now(UTC) - timedelta(days=3)).date()
    old = se.event("payout.paid", se.payout(amount=900), account=account,
                   created=int(datetime(day.year, day.month, day.day, 12, tzinfo=UTC).timestamp()))
    se.publish(stripe_api, [old])

    assert main(["catch-up", "--account", account, "--since", day.isoformat()]) == 0
    assert old["id"] in inbox(db)
    assert {c.stripe_account for c in stripe_api.calls if c.path == "/v1/events"} == {account}

    assert main(["catch-up", "--account", "acct_nobody"]) == 1
    assert main(["catch-up", "--since", "2001-01-01"]) == 2
    stripe_api.fail_next(500, count=10, path_prefix="/v1/events")
    assert main(["catch-up", "--account", account]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("marketplace-worker catch-up: 1 scope(s) could not be listed")
