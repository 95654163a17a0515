"""Connected accounts' flags: newest snapshot wins, and two snapshots of one second are settled
by reading the account from Stripe (through the fake server), never by their random ids."""

from __future__ import annotations

import json
import time

import pytest
from sqlalchemy import text

from domain.catchup import catch_up
from domain.dispatch import process_event
from domain.inbox import INSERT_EVENTS_SQL, event_from_dict, insert_params
from domain.stripe_api import get_client
from models import Provider
from models.db import session_scope
from harness import factories
from harness import stripe_events as se


def deliver(db, event: dict) -> str:
    incoming = event_from_dict(event, json.dumps(event), "connect", livemode=False)
    db.connection().exec_driver_sql(INSERT_EVENTS_SQL, insert_params([incoming]))
    db.commit()
    with session_scope() as session:
        return process_event(session, event["id"])


def flags(db, provider_id: int) -> tuple[bool, bool]:
    db.expire_all()
    row = db.get(Provider, provider_id)
    return row.stripeConnectOnboardingComplete, row.stripeConnectPayoutsEnabled


def account_reads(stripe_api, account: str) -> int:
    return sum(1 for c in stripe_api.calls if c.method == "GET" and c.path == f"/v1/accounts/{account}")


def onboarding_tie(db, stripe_api):
    """Two account.updated of one second: the API's current state is the one with the smaller
    id, so the event id alone would keep the other."""
    provider = factories.provider(db, payment_mode="stripe_connect", stripeConnectOnboardingComplete=False,
                                  stripeConnectPayoutsEnabled=False)
    db.commit()
    account = provider.stripeConnectAccountId
    pending = se.account(id=account, charges_enabled=False, payouts_enabled=False, details_submitted=False)
    second = int(time.time()) - 60
    done = se.account_updated(pending, created=second, details_submitted=True, charges_enabled=True,
                              payouts_enabled=True)
    half = se.account_updated(pending, created=second, details_submitted=True)
    done["id"], half["id"] = "evt_1AAAAAAAAAAAAAAAAAAAAAAA", "evt_1ZZZZZZZZZZZZZZZZZZZZZZZ"
    stripe_api.add("account", done["data"]["object"])  # what GET /v1/accounts/{id} answers now
    return provider, account, done, half


@pytest.mark.parametrize("order", ["done first", "half first"])
def test_a_tie_resolves_to_the_state_the_api_gives(db, stripe_api, order):
    provider, account, done, half = onboarding_tie(db, stripe_api)
    for event in ([done, half] if order == "done first" else [half, done]):
        assert deliver(db, event) == "processed"

    catch_up(session_scope, get_client())

    assert flags(db, provider.id) == (True, True)
    assert account_reads(stripe_api, account) == 1
    stripe_api.reset()
    catch_up(session_scope, get_client())
    assert account_reads(stripe_api, account) == 0, "a settled tie is read once"
    assert deliver(db, se.account_updated(done["data"]["object"], created=int(done["created"]),
                                          payouts_enabled=False)) == "processed"
    assert flags(db, provider.id) == (True, True), "an event older than the read changes nothing"


def test_a_failed_read_keeps_the_tie_until_a_read_succeeds(db, stripe_api):
    provider, account, done, half = onboarding_tie(db, stripe_api)
    deliver(db, done)
    deliver(db, half)
    stripe_api.fail_next(500, count=10, path_prefix=f"/v1/accounts/{account}")

    assert set(catch_up(session_scope, get_client()).reads.failed) == {account}
    assert flags(db, provider.id) == (False, False)  # the provisional winner, until Stripe answers
    db.execute(text("UPDATE marketplace_worker.connect_account_states SET read_retry_at = now()"))
    db.commit()  # the backoff has passed
    stripe_api.reset()
    stripe_api.add("account", done["data"]["object"])

    assert catch_up(session_scope, get_client()).reads.read == 1
    assert flags(db, provider.id) == (True, True)


def test_an_event_newer_than_the_read_still_wins(db, stripe_api):
    provider, account, done, half = onboarding_tie(db, stripe_api)
    deliver(db, done)
    deliver(db, half)
    catch_up(session_scope, get_client())
    assert flags(db, provider.id) == (True, True)

    restricted = se.account_updated(done["data"]["object"], created=int(time.time()) + 5, payouts_enabled=False)
    assert deliver(db, restricted) == "processed"
    assert flags(db, provider.id) == (True, False)


def test_a_tie_between_snapshots_that_agree_needs_no_read(db, stripe_api):
    provider, account, done, half = onboarding_tie(db, stripe_api)
    same = se.account_updated(done["data"]["object"], created=int(done["created"]), email="new@example.com")
    deliver(db, done)
    deliver(db, same)
    catch_up(session_scope, get_client())
    assert account_reads(stripe_api, account) == 0
    assert flags(db, provider.id) == (True, True)
