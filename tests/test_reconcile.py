"""Stripe Connect: account sync, the transfer/payout mirror and payouts reconciliation, against
the fake Stripe API through the real SDK (SPEC §5)."""

from __future__ import annotations

import json
import re
import threading
import time
from datetime import timedelta

import pytest
import stripe
from sqlalchemy import select, text

from domain import dispatch
from domain.connect import classify, mirror
from domain.connect import run as connect_run
from domain.connect.reader import StripeReader
from domain.clock import from_unix
from domain.inbox import INSERT_EVENTS_SQL, event_from_dict, insert_params
from domain.stripe_api import get_client
from models import ConnectAccount, ConnectTransfer, Provider, ReconcileDiscrepancy, Transaction
from models.db import get_engine, session_scope
from harness import factories
from harness import stripe_events as se
from harness.flow import wait_for

DAY = 86_400
GRACE = timedelta(hours=48)


# --- helpers -------------------------------------------------------------------------------


def connect_provider(db) -> Provider:
    provider = factories.provider(db, payment_mode="stripe_connect")
    db.commit()
    return provider


def paid_transaction(db, provider: Provider, *, paid_days_ago: float = 3, amount: int = 10_000, **invoice_fields):
    invoice = factories.invoice(db, provider, amount_cents=amount, status="paid", **invoice_fields)
    row = factories.transaction(db, invoice, status="paid", paidAt=factories.at(paid_days_ago))
    db.commit()
    return row


def send_transfer(fake, account: str, txn: Transaction | None, *, amount: int | None = None, key: str = "metadata",
                  created: int | None = None, **fields) -> dict:
    """A platform transfer to `account` for `txn`, naming it in its metadata unless key="none"."""
    named = {"metadata": {"marketplace_transaction_id": str(txn.id)}} if txn and key == "metadata" else {}
    transfer = se.transfer(amount=txn.providerPayoutCents if amount is None else amount, destination=account,
                           created=created or int(time.time()) - 3 * DAY, **named, **fields)
    fake.add("transfer", transfer)
    return transfer


def pay_out(fake, account: str, transfers: list[dict], *, status: str = "paid", created: int | None = None,
            **fields) -> dict:
    """An automatic payout of `account` carrying the transfers' `py_...` payments."""
    created = created or int(time.time()) - 2 * DAY
    payout = se.payout(amount=sum(t["amount"] - t["amount_reversed"] for t in transfers), status=status,
                       created=created, **fields)
    fake.add("payout", payout, account=account)
    fake.add("balance_transaction", se.balance_transaction(amount=-payout["amount"], type="payout",
                                                           source=payout["id"], fee=0, created=created),
             account=account, payout=payout["id"])
    for transfer in transfers:
        fake.add("balance_transaction",
                 se.balance_transaction(amount=transfer["amount"], type="payment", fee=0, created=created,
                                        source=transfer["destination_payment"]),
                 account=account, payout=payout["id"])
    return payout


def paid_out_accounts(db, fake, count: int) -> tuple[list[str], list[int]]:
    """(accounts, transaction ids) of `count` Connect providers, each with a paid transaction
    whose transfer a paid payout carries: reconciling them completes every transaction."""
    accounts, transactions = [], []
    for _ in range(count):
        provider = factories.provider(db, payment_mode="stripe_connect")
        db.commit()
        txn = paid_transaction(db, provider)
        pay_out(fake, provider.stripeConnectAccountId, [send_transfer(fake, provider.stripeConnectAccountId, txn)])
        accounts.append(provider.stripeConnectAccountId)
        transactions.append(txn.id)
    return accounts, transactions


def enqueue_connect_event(db, event: dict) -> None:
    """Store a Connect-endpoint event as the receiver would, and send it to the worker."""
    from tasks.events import enqueue_events

    incoming = event_from_dict(event, json.dumps(event), "connect", livemode=False)
    db.connection().exec_driver_sql(INSERT_EVENTS_SQL, insert_params([incoming]))
    db.commit()
    enqueue_events([event["id"]])


def reader(retry_base: float = 0.01) -> StripeReader:
    return StripeReader(get_client(), retry_base_seconds=retry_base)


def run(account: str, **kw) -> classify.AccountResult:
    kw.setdefault("grace", GRACE)
    return connect_run.reconcile_account(session_scope, get_engine(), kw.pop("reader", None) or reader(), account, **kw)


def transaction(db, txn_id: int) -> Transaction:
    db.expire_all()
    return db.get(Transaction, txn_id)


def discrepancies(db) -> list[ReconcileDiscrepancy]:
    db.expire_all()
    return list(db.execute(select(ReconcileDiscrepancy).order_by(ReconcileDiscrepancy.id)).scalars())


def open_kinds(db) -> list[tuple[str, str]]:
    return sorted((d.kind, d.subject) for d in discrepancies(db) if d.resolved_at is None)


def deliver(db, event: dict, endpoint: str = "connect") -> str:
    """Store an event in the inbox and process it as the event task does."""
    incoming = event_from_dict(event, json.dumps(event), endpoint, livemode=False)
    db.connection().exec_driver_sql(INSERT_EVENTS_SQL, insert_params([incoming]))
    db.commit()
    with session_scope() as session:
        return dispatch.process_event(session, event["id"])


# --- classification ------------------------------------------------------------------------


def test_a_transfer_inside_a_paid_payout_completes_the_transaction_at_the_arrival_date(db, stripe_api):
    provider = connect_provider(db)
    account = provider.stripeConnectAccountId
    txn = paid_transaction(db, provider)
    payout = pay_out(stripe_api, account, [send_transfer(stripe_api, account, txn)])

    result = run(account)

    assert dict(result.outcomes) == {"paid_out": 1}
    assert result.completed == [txn.id]
    row = transaction(db, txn.id)
    assert (row.status, row.completedAt) == ("completed", from_unix(payout["arrival_date"]))
    assert discrepancies(db) == []
    # Transfers, payouts, and the one payout's balance transactions: nothing per transaction.
    assert result.calls == 3
    payouts_call = next(c for c in stripe_api.calls if c.path == "/v1/payouts")
    assert payouts_call.stripe_account == account and payouts_call.params["limit"] == "100"


def test_completed_only_once_the_payout_is_paid(db, stripe_api):
    provider = connect_provider(db)
    account = provider.stripeConnectAccountId
    txn = paid_transaction(db, provider)
    payout = pay_out(stripe_api, account, [send_transfer(stripe_api, account, txn)], status="in_transit")

    assert dict(run(account).outcomes) == {"awaiting_payout": 1}
    assert transaction(db, txn.id).status == "paid"

    paid = {**payout, "status": "paid", "reconciliation_status": "completed"}
    stripe_api.add("payout", paid, account=account)
    assert deliver(db, se.event("payout.paid", paid, account=account)) == "processed"
    assert connect_run.dirty_accounts(db) == [account]

    result = run(account)
    assert result.completed == [txn.id]
    assert transaction(db, txn.id).status == "completed"
    db.expire_all()
    assert db.get(ConnectAccount, account).dirty_at is None


def test_missing_transfer_only_after_the_grace_period(db, stripe_api):
    provider = connect_provider(db)
    account = provider.stripeConnectAccountId
    late = paid_transaction(db, provider, paid_days_ago=3)
    recent = paid_transaction(db, provider, paid_days_ago=0.5)

    result = run(account)

    assert dict(result.outcomes) == {"missing_transfer": 1, "awaiting_transfer": 1}
    [found] = discrepancies(db)
    assert (found.kind, found.transaction_id, found.account) == ("missing_transfer", late.id, account)
    assert (found.expected_cents, found.seen_cents) == (9_500, 0)
    assert transaction(db, recent.id).status == "paid"


def test_amount_mismatch(db, stripe_api):
    provider = connect_provider(db)
    account = provider.stripeConnectAccountId
    txn = paid_transaction(db, provider)
    transfer = send_transfer(stripe_api, account, txn, amount=9_000)
    pay_out(stripe_api, account, [transfer])

    assert dict(run(account).outcomes) == {"amount_mismatch": 1}
    [found] = discrepancies(db)
    assert (found.kind, found.expected_cents, found.seen_cents) == ("amount_mismatch", 9_500, 9_000)
    assert found.transfer_ids == [transfer["id"]]
    assert transaction(db, txn.id).status == "paid"  # paid out, but not what the provider is owed


def test_partial_and_full_reversals(db, stripe_api):
    provider = connect_provider(db)
    account = provider.stripeConnectAccountId
    partly, fully = paid_transaction(db, provider), paid_transaction(db, provider)
    start = int(time.time()) - 3 * DAY
    for txn, reversals in ((partly, [2_000]), (fully, [5_000, 4_500])):
        se.publish(stripe_api, se.transfer_history(account, 9_500, start=start, transfer_group=f"mtx_{txn.id}",
                                                   reversal_amounts=reversals))

    assert dict(run(account).outcomes) == {"transfer_reversed": 2}
    found = {d.transaction_id: d for d in discrepancies(db)}
    assert (found[partly.id].kind, found[partly.id].seen_cents) == ("transfer_reversed", 7_500)
    assert (found[fully.id].kind, found[fully.id].seen_cents) == ("transfer_reversed", 0)
    assert "20.00 USD reversed" in found[partly.id].detail


def test_a_transfer_reversed_long_after_completion_is_reported_and_the_status_kept(db, stripe_api):
    provider = connect_provider(db)
    account = provider.stripeConnectAccountId
    txn = paid_transaction(db, provider, paid_days_ago=40)
    now = int(time.time())
    transfer = send_transfer(stripe_api, account, txn, created=now - 40 * DAY)
    pay_out(stripe_api, account, [transfer], created=now - 38 * DAY)
    assert run(account).completed == [txn.id]

    reversed_ = {**transfer, "amount_reversed": 9_500, "reversed": True}
    stripe_api.add("transfer", reversed_)
    assert deliver(db, se.event("transfer.reversed", reversed_), endpoint="platform") == "processed"
    assert dict(run(account).outcomes) == {"transfer_reversed": 1}
    assert transaction(db, txn.id).status == "completed"
    assert open_kinds(db) == [("transfer_reversed", str(txn.id))]


def test_a_transfer_is_matched_by_the_invoices_charge_when_it_names_no_transaction(db, stripe_api):
    provider = connect_provider(db)
    account = provider.stripeConnectAccountId
    txn = paid_transaction(db, provider, stripeChargeId="ch_funding0001")
    pay_out(stripe_api, account, [send_transfer(stripe_api, account, txn, key="none",
                                                source_transaction="ch_funding0001")])

    assert run(account).completed == [txn.id]


def test_payout_failed_after_paid_keeps_completed_then_resolves_when_paid_again(db, stripe_api):
    provider = connect_provider(db)
    account = provider.stripeConnectAccountId
    txn = paid_transaction(db, provider, paid_days_ago=12)
    now = int(time.time())
    transfer = send_transfer(stripe_api, account, txn, created=now - 12 * DAY)
    first = pay_out(stripe_api, account, [transfer], created=now - 10 * DAY)
    assert run(account).completed == [txn.id]

    # Days later the bank returns the money: the payout turns failed and its payout_failure
    # balance transaction puts the money back on the account's balance.
    failed = {**first, "status": "failed", "failure_code": "account_closed"}
    stripe_api.add("payout", failed, account=account)
    assert deliver(db, se.event("payout.failed", failed, account=account)) == "processed"
    result = run(account)
    assert dict(result.outcomes) == {"payout_failed": 1}
    row = transaction(db, txn.id)
    assert row.status == "completed"
    [found] = discrepancies(db)
    assert (found.kind, found.payout_id, found.resolved_at) == ("payout_failed", first["id"], None)
    assert "account_closed" in found.detail and "already completed" in found.detail

    # The next payout carries the returned money out again.
    again = se.payout(amount=first["amount"], created=now - 60, arrival_date=now)
    stripe_api.add("payout", again, account=account)
    stripe_api.add("balance_transaction", se.balance_transaction(amount=first["amount"], type="payout_failure",
                                                                 source=first["id"], fee=0, created=now - 60),
                   account=account, payout=again["id"])
    assert dict(run(account).outcomes) == {"paid_out": 1}
    [found] = discrepancies(db)
    assert found.resolved_at is not None
    assert transaction(db, txn.id).completedAt == row.completedAt  # set once


def test_an_open_dispute_holds_a_paid_out_transaction_back_from_completed(db, stripe_api):
    provider = connect_provider(db)
    account = provider.stripeConnectAccountId
    txn = paid_transaction(db, provider, stripeChargeId="ch_disputed0001")
    pay_out(stripe_api, account, [send_transfer(stripe_api, account, txn)])
    with session_scope() as session:
        session.execute(text(
            "INSERT INTO marketplace_worker.stripe_disputes (dispute_id, charge_id, amount, status) "
            "VALUES ('dp_open0001', 'ch_disputed0001', 10000, 'needs_response')"))

    assert dict(run(account).outcomes) == {"held_by_dispute": 1}
    assert transaction(db, txn.id).status == "paid"
    with session_scope() as session:
        session.execute(text("UPDATE marketplace_worker.stripe_disputes SET status = 'won'"))
    assert run(account).completed == [txn.id]


def test_a_payout_that_failed_before_completion_is_reported_and_nothing_completes(db, stripe_api):
    provider = connect_provider(db)
    account = provider.stripeConnectAccountId
    txn = paid_transaction(db, provider)
    pay_out(stripe_api, account, [send_transfer(stripe_api, account, txn)], status="failed")

    assert dict(run(account).outcomes) == {"payout_failed": 1}
    assert transaction(db, txn.id).status == "paid"
    assert open_kinds(db) == [("payout_failed", str(txn.id))]


def test_orphan_transfers_unreversed_transfers_and_transfers_to_unknown_accounts_are_reported(db, stripe_api):
    provider = connect_provider(db)
    other = connect_provider(db)
    account = provider.stripeConnectAccountId
    others_txn = paid_transaction(db, other)
    unpaid = paid_transaction(db, provider)
    refunded = paid_transaction(db, provider)
    with session_scope() as session:
        session.execute(text("UPDATE marketplace.transactions SET status = 'refunded' WHERE id = :id"),
                        {"id": refunded.id})
    kept = send_transfer(stripe_api, account, refunded)
    stray = send_transfer(stripe_api, account, None, amount=1_234, key="none")
    misdirected = send_transfer(stripe_api, account, others_txn)  # names another provider's transaction
    unknown = se.transfer(amount=700, destination="acct_nobodyhasthis1")
    assert deliver(db, se.event("transfer.created", unknown), endpoint="platform") == "processed"

    result = run(account)
    with session_scope() as session:
        assert connect_run.report_unknown_destinations(session) == (1, 0)

    assert (result.outcomes["orphan_transfer"], result.outcomes["transfer_not_reversed"]) == (2, 1)
    assert open_kinds(db) == sorted([("orphan_transfer", stray["id"]), ("orphan_transfer", misdirected["id"]),
                                     ("unknown_destination", unknown["id"]), ("missing_transfer", str(unpaid.id)),
                                     ("transfer_not_reversed", kept["id"])])
    by_subject = {d.subject: d for d in discrepancies(db)}
    assert f"names {others_txn.id}" in by_subject[misdirected["id"]].detail
    assert by_subject[unknown["id"]].account == "acct_nobodyhasthis1"
    assert (by_subject[stray["id"]].seen_cents, by_subject[str(unpaid.id)].seen_cents) == (1_234, 0)
    assert (by_subject[kept["id"]].transaction_id, by_subject[kept["id"]].seen_cents) == (refunded.id, 9_500)


def test_a_rerun_updates_last_seen_never_duplicates_and_resolves_what_is_fixed(db, stripe_api):
    provider = connect_provider(db)
    account = provider.stripeConnectAccountId
    txn = paid_transaction(db, provider)
    run(account)
    [first] = discrepancies(db)
    first_id, first_seen, last_seen = first.id, first.first_seen_at, first.last_seen_at

    second_run = run(account)
    [again] = discrepancies(db)
    assert (again.id, again.first_seen_at, again.resolved_at) == (first_id, first_seen, None)
    assert again.last_seen_at > last_seen
    assert second_run.opened == 0

    # The transfer arrives: the next run lists only what is new since the previous listing.
    pay_out(stripe_api, account, [send_transfer(stripe_api, account, txn, created=int(time.time()) - 60)],
            created=int(time.time()) - 30)
    calls_before = len(stripe_api.calls)
    fixed = run(account)
    assert fixed.completed == [txn.id] and fixed.resolved == 1
    transfers_call = next(c for c in stripe_api.calls[calls_before:] if c.path == "/v1/transfers")
    assert int(transfers_call.params["created"]["gte"]) >= int(time.time()) - 2 * DAY
    [resolved] = discrepancies(db)
    assert resolved.id == first_id and resolved.resolved_at is not None

    # Nothing new: two listings, no balance transactions listed twice, nothing changes.
    quiet = run(account)
    assert (quiet.calls, quiet.completed, quiet.opened, quiet.resolved) == (2, [], 0, 0)


# --- the Stripe API: pages, errors, rate -----------------------------------------------------


def test_250_transfers_and_a_payout_of_250_balance_transactions_take_seven_calls(db, stripe_api):
    provider = connect_provider(db)
    account = provider.stripeConnectAccountId
    txns = [paid_transaction(db, provider, amount=1_000 + n) for n in range(250)]
    start = int(time.time()) - 3 * DAY
    transfers = [send_transfer(stripe_api, account, txn, created=start + n) for n, txn in enumerate(txns)]
    pay_out(stripe_api, account, transfers)  # 251 balance transactions with its own

    result = run(account)

    assert sorted(result.completed) == sorted(t.id for t in txns)
    assert result.calls == 3 + 1 + 3
    assert stripe_api.call_count("/v1/transfers") == 3
    assert stripe_api.call_count("/v1/balance_transactions") == 3
    assert all(c.params.get("limit") == "100" for c in stripe_api.calls)


def test_429_storms_and_5xx_are_retried_to_the_same_result(db, stripe_api):
    provider = connect_provider(db)
    account = provider.stripeConnectAccountId
    txn = paid_transaction(db, provider)
    pay_out(stripe_api, account, [send_transfer(stripe_api, account, txn)])
    stripe_api.fail_next(429, count=4, path_prefix="/v1/transfers")
    stripe_api.fail_next(500, count=2, path_prefix="/v1/payouts")  # the SDK's own retries
    stripe_api.fail_next(503, count=1, path_prefix="/v1/balance_transactions")

    result = run(account)

    assert result.completed == [txn.id]
    answers = sorted((c.path, c.status) for c in stripe_api.calls)
    assert answers == sorted([("/v1/transfers", 429)] * 4 + [("/v1/transfers", 200)]
                             + [("/v1/payouts", 500)] * 2 + [("/v1/payouts", 200)]
                             + [("/v1/balance_transactions", 503), ("/v1/balance_transactions", 200)])


def test_a_429_storm_longer_than_the_retries_fails_the_run_and_changes_nothing(db, stripe_api):
    provider = connect_provider(db)
    account = provider.stripeConnectAccountId
    txn = paid_transaction(db, provider)
    pay_out(stripe_api, account, [send_transfer(stripe_api, account, txn)])
    stripe_api.fail_next(429, count=50)

    with pytest.raises(stripe.RateLimitError):
        run(account)
    assert transaction(db, txn.id).status == "paid"
    assert discrepancies(db) == []


def test_the_rate_cap_is_shared_through_redis(services):
    from domain.rate_limit import TokenBucket, redis_client

    client = redis_client(services["REDIS_URL"])
    key = f"test_bucket_{time.monotonic_ns()}"
    buckets = [TokenBucket(client, rate_per_s=10, key=key) for _ in range(2)]  # two "workers"
    waits = [buckets[n % 2].reserve() for n in range(30)]
    # Ten tokens of burst, then each further token 1/10 s after the previous one, whichever
    # bucket object asks: 30 requests cannot all go out before 2 s have passed.
    assert waits[:10] == [0.0] * 10
    assert waits[-1] == pytest.approx(2.0, abs=0.2)
    assert all(b > a for a, b in zip(waits[10:], waits[11:]))


def test_every_request_to_stripe_takes_a_token_the_sdks_own_retries_too(db, services, stripe_api):
    from domain.rate_limit import TokenBucket, redis_client

    class CountingBucket(TokenBucket):
        taken = 0

        def reserve(self) -> float:
            CountingBucket.taken += 1
            return super().reserve()

    bucket = CountingBucket(redis_client(services["REDIS_URL"]), rate_per_s=1000, key=f"test_{time.monotonic_ns()}")
    client = get_client(bucket=bucket)
    stripe_api.fail_next(500, count=2, path_prefix="/v1/payouts")
    client.v1.payouts.list({"limit": 100}, {"stripe_account": "acct_any000000001"})
    client.v1.transfers.list({"limit": 100})
    assert (CountingBucket.taken, len(stripe_api.calls)) == (4, 4)


# --- concurrency ---------------------------------------------------------------------------


def test_two_workers_reconciling_one_account_at_once_give_one_result(db, stripe_api):
    provider = connect_provider(db)
    account = provider.stripeConnectAccountId
    txns = [paid_transaction(db, provider) for _ in range(3)]
    pay_out(stripe_api, account, [send_transfer(stripe_api, account, t) for t in txns[:2]])
    stripe_api.latency_s = 0.5  # both runs are inside Stripe calls at the same time
    start = threading.Barrier(2)
    results: list = []

    def worker():
        start.wait()
        results.append(run(account))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    stripe_api.latency_s = 0

    assert sorted(r.skipped or "ran" for r in results) == ["busy", "ran"]
    assert sorted(next(r for r in results if not r.skipped).completed) == sorted(t.id for t in txns[:2])
    assert open_kinds(db) == [("missing_transfer", str(txns[2].id))]


def test_the_writes_are_safe_without_the_lock_too(db, stripe_api):
    """Even two classifications of one account racing (no advisory lock) leave one row each."""
    provider = connect_provider(db)
    account = provider.stripeConnectAccountId
    txns = [paid_transaction(db, provider) for _ in range(20)]
    pay_out(stripe_api, account, [send_transfer(stripe_api, account, t) for t in txns[:10]])
    run(account)
    with session_scope() as session:  # forget the outcome, keep the mirror
        session.execute(text("DELETE FROM marketplace_worker.reconcile_discrepancies"))
        session.execute(text("UPDATE marketplace.transactions SET status = 'paid', \"completedAt\" = NULL"))
    start = threading.Barrier(4)
    completed: list[int] = []

    def classify_concurrently():
        start.wait()
        with session_scope() as session:
            completed.extend(classify.classify_and_apply(
                session, account, provider.id, completed_since=0, grace=GRACE,
                now=from_unix(int(time.time()))).completed)

    threads = [threading.Thread(target=classify_concurrently) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    assert sorted(completed) == sorted(t.id for t in txns[:10])  # each completed exactly once
    assert open_kinds(db) == sorted(("missing_transfer", str(t.id)) for t in txns[10:])
    assert len(discrepancies(db)) == 10


# --- account sync and the event mirror ------------------------------------------------------


def test_account_sync_newest_event_wins_whatever_the_order(db, stripe_api):
    provider = connect_provider(db)
    account = provider.stripeConnectAccountId
    before = provider.updatedAt
    base = se.account(id=account)
    t0 = int(time.time()) - DAY
    restricted = se.account_updated(base, created=t0 + 60, payouts_enabled=False)
    onboarded = se.account_updated(base, created=t0, details_submitted=True, charges_enabled=True,
                                   payouts_enabled=True)

    def flags():
        db.expire_all()
        row = db.get(Provider, provider.id)
        return row.stripeConnectOnboardingComplete, row.stripeConnectPayoutsEnabled, row.updatedAt

    assert deliver(db, restricted) == "processed"
    onboarding, payouts, updated_at = flags()
    assert (onboarding, payouts) == (True, False) and updated_at > before
    assert deliver(db, onboarded) == "processed"  # older: changes nothing
    assert flags() == (True, False, updated_at)

    assert deliver(db, se.account_deauthorized(account, created=t0 + 120)) == "processed"
    assert flags()[:2] == (False, False)
    assert deliver(db, se.account_updated(base, created=t0 + 90)) == "processed"  # before deauthorization
    assert flags()[:2] == (False, False)


def test_account_events_for_unknown_accounts_are_processed_and_change_nothing(db, stripe_api):
    provider = connect_provider(db)
    stranger = se.account_updated(se.account(), payouts_enabled=False)
    assert deliver(db, stranger) == "processed"
    db.expire_all()
    assert db.get(Provider, provider.id).stripeConnectPayoutsEnabled is True


def test_transfer_events_keep_the_newest_snapshot_and_mark_the_account(db, stripe_api):
    provider = connect_provider(db)
    account = provider.stripeConnectAccountId
    history = se.transfer_history(account, 9_500, reversal_amounts=[1_000], start=int(time.time()) - DAY)
    created, reversed_ = history
    assert deliver(db, reversed_, endpoint="platform") == "processed"
    assert deliver(db, created, endpoint="platform") == "processed"  # late and older: ignored

    db.expire_all()
    mirrored = db.get(ConnectTransfer, history.transfer_id)
    assert (mirrored.amount, mirrored.amount_reversed, mirrored.as_of_id) == (9_500, 1_000, reversed_["id"])
    assert connect_run.dirty_accounts(db) == [account]
    # A connected account's own transfer (Connect endpoint) is not the platform's.
    own = se.event("transfer.created", se.transfer(amount=5, destination="acct_elsewhere00001"), account=account)
    assert deliver(db, own) == "ignored"
    db.expire_all()
    assert db.get(ConnectTransfer, own["data"]["object"]["id"]) is None


def test_only_accounts_with_activity_are_reconciled(db, stripe_api):
    idle = connect_provider(db)
    waiting = connect_provider(db)
    named = connect_provider(db)
    finished = paid_transaction(db, idle)
    with session_scope() as session:
        session.execute(text("UPDATE marketplace.transactions SET status = 'completed' WHERE id = :id"),
                        {"id": finished.id})
    paid_transaction(db, waiting)
    with session_scope() as session:
        mirror.mark_dirty(session, [named.stripeConnectAccountId])
    with session_scope() as session:
        assert connect_run.active_accounts(session) == sorted(
            [waiting.stripeConnectAccountId, named.stripeConnectAccountId])


# --- command line and worker ----------------------------------------------------------------


def test_cli_exits_non_zero_while_discrepancies_are_open(db, stripe_api, capsys):
    from worker.cli import main

    provider = connect_provider(db)
    account = provider.stripeConnectAccountId
    txn, short = paid_transaction(db, provider), paid_transaction(db, provider)
    first_part = send_transfer(stripe_api, account, short, amount=9_000)

    assert main(["reconcile", "--account", account]) == 3
    out = capsys.readouterr().out
    assert "2 open discrepancies: amount_mismatch 1, missing_transfer 1" in out
    assert re.search(rf"open +missing_transfer +{txn.id} .* 95\.00 USD +0\.00 USD ", out)
    assert re.search(rf"open +amount_mismatch +{short.id} .* 95\.00 USD +90\.00 USD ", out)

    # The missing transfer arrives, the short one is topped up: both are resolved.
    rest = send_transfer(stripe_api, account, short, amount=500)
    pay_out(stripe_api, account, [send_transfer(stripe_api, account, txn), first_part, rest])
    assert main(["reconcile", "--since", "2020-01-01"]) == 0
    out = capsys.readouterr().out
    assert "reconciled 1 account(s)" in out and "paid_out 2" in out and "no open discrepancies" in out
    assert main(["reconcile", "--since", "yesterday"]) == 2
    assert main(["reconcile", "--account", "acct_nobodyhasthis1"]) == 1


@pytest.mark.flow
def test_a_payout_event_gets_the_transaction_completed_by_the_worker(celery_worker, db, stripe_api):
    from tasks.reconciliation import reconcile_dirty

    provider = connect_provider(db)
    account = provider.stripeConnectAccountId
    txn = paid_transaction(db, provider)
    payout = pay_out(stripe_api, account, [send_transfer(stripe_api, account, txn)])
    enqueue_connect_event(db, se.event("payout.paid", payout, account=account))
    wait_for(lambda: connect_run.dirty_accounts(db) == [account] or db.rollback(), message="account marked")
    reconcile_dirty.delay()

    wait_for(lambda: transaction(db, txn.id).status == "completed", timeout=30, message="completed")
    assert transaction(db, txn.id).completedAt == from_unix(payout["arrival_date"])
    wait_for(lambda: db.get(ConnectAccount, account).dirty_at is None or db.expire_all(), message="clean")


# --- fund flows, refunds after transfer, manual payouts (SPEC §5) ------------------------------


def keyed_transaction(db, provider: Provider, *, amount: int = 10_000, paid_days_ago: float = 3, **invoice_fields):
    """A paid transaction as the worker keeps it: with its `invoice_transactions` key."""
    txn = paid_transaction(db, provider, amount=amount, paid_days_ago=paid_days_ago, **invoice_fields)
    with session_scope() as session:
        session.execute(text("INSERT INTO marketplace_worker.invoice_transactions (invoice_id, transaction_id) "
                             "VALUES (:invoice, :txn)"), {"invoice": txn.invoiceId, "txn": txn.id})
    return txn


def record_refunds(txn: Transaction, charge_id: str, amounts: list[int]) -> None:
    """What the ledger (domain/payments.py) records from charge.refunded / refund.* events:
    the refunds and the transaction's refunded cents."""
    with session_scope() as session:
        for amount in amounts:
            session.execute(text(
                "INSERT INTO marketplace_worker.stripe_refunds (refund_id, charge_id, amount, status) "
                "VALUES (:id, :charge, :amount, 'succeeded')"), {"id": se.new_id("re"), "charge": charge_id,
                                                                "amount": amount})
        session.execute(text(
            "INSERT INTO marketplace_worker.transaction_refunds (transaction_id, refunded_cents) VALUES (:t, :r)"),
            {"t": txn.id, "r": sum(amounts)})


def destination_charge(fake, db, provider: Provider, *, amount: int = 10_000, fee: int | None = None,
                       days_ago: float = 3, **history) -> tuple[Transaction, se.Timeline]:
    """A paid invoice whose charge was a destination charge to the provider's account, its
    application fee the platform's fee, published to the fake Stripe."""
    account = provider.stripeConnectAccountId
    fee = (amount * 500 + 5_000) // 10_000 if fee is None else fee
    if history.get("transfer_amount") is not None:
        fee = None
    tl = se.destination_charge_history(account, amount, application_fee_amount=fee,
                                       start=int(time.time() - days_ago * DAY), **history)
    se.publish(fake, tl)
    txn = keyed_transaction(db, provider, amount=amount, paid_days_ago=days_ago, stripeChargeId=tl.charge_id,
                            stripePaymentIntentId=tl.payment_intent_id)
    return txn, tl


def separate_transfer(fake, db, provider: Provider, *, amount: int = 10_000, refund_amounts=(),
                      reversal_amounts=None, days_ago: float = 3) -> tuple[Transaction, se.Timeline]:
    """A paid transaction and the platform's own transfer of its providerPayoutCents, named by
    transfer_group; refunds reverse it proportionally unless `reversal_amounts` says otherwise."""
    txn = keyed_transaction(db, provider, amount=amount, paid_days_ago=days_ago)
    payout_cents = txn.providerPayoutCents
    if reversal_amounts is None:
        reversal_amounts = [(2 * r * payout_cents + amount) // (2 * amount) for r in refund_amounts]
    tl = se.transfer_history(provider.stripeConnectAccountId, payout_cents, start=int(time.time() - days_ago * DAY),
                             transfer_group=f"mtx_{txn.id}", reversal_amounts=reversal_amounts)
    se.publish(fake, tl)
    return txn, tl


def paid_out(fake, account: str, *histories: se.Timeline, automatic: bool = True, days_ago: float = 2) -> str:
    """A paid payout of the account sweeping the histories' balance transactions."""
    swept = [bt for h in histories for bt in h.connected_balance_transactions]
    po = se.payout_history(account, sum(bt["net"] for bt in swept), start=int(time.time() - days_ago * DAY),
                           automatic=automatic, swept=swept)
    se.publish(fake, po)
    return po.payout_id


def test_a_destination_charge_completes_with_no_discrepancy(db, stripe_api):
    provider = connect_provider(db)
    account = provider.stripeConnectAccountId
    with_fee, fee_history = destination_charge(stripe_api, db, provider)  # 10,000 sent, 500 collected back
    fixed, fixed_history = destination_charge(stripe_api, db, provider, amount=8_000, transfer_amount=7_600)
    payout_id = paid_out(stripe_api, account, fee_history, fixed_history)

    result = run(account)

    assert dict(result.outcomes) == {"paid_out": 2}
    assert sorted(result.completed) == sorted([with_fee.id, fixed.id])
    assert discrepancies(db) == []
    # The fee rode along with the transfers: one listing each, one payout's balance transactions.
    assert result.calls == 3
    transfers_call = next(c for c in stripe_api.calls if c.path == "/v1/transfers")
    assert transfers_call.params["expand"] == ["data.source_transaction.application_fee"]
    db.expire_all()
    mirrored = db.get(ConnectTransfer, fee_history.transfer_id)
    assert (mirrored.destination_charge, mirrored.application_fee_amount, mirrored.transaction_id) == (
        True, 500, with_fee.id)
    assert payout_id


def test_a_destination_charge_whose_fee_is_not_the_platform_fee_is_an_amount_mismatch(db, stripe_api):
    provider = connect_provider(db)
    account = provider.stripeConnectAccountId
    txn, history = destination_charge(stripe_api, db, provider, fee=800)
    paid_out(stripe_api, account, history)

    assert dict(run(account).outcomes) == {"amount_mismatch": 1}
    [found] = discrepancies(db)
    assert (found.kind, found.transaction_id, found.expected_cents, found.seen_cents) == (
        "amount_mismatch", txn.id, 9_500, 9_200)
    assert "application fee of 8.00 USD" in found.detail


def test_a_partial_refund_with_its_proportional_reversal_completes_with_no_discrepancy(db, stripe_api):
    provider = connect_provider(db)
    account = provider.stripeConnectAccountId
    # Destination charge: 2,500 refunded, the transfer reversed by 2,500 and 125 of the fee refunded.
    dest, dest_history = destination_charge(stripe_api, db, provider, refund_amounts=[2_500])
    record_refunds(dest, dest_history.charge_id, [2_500])
    # Separate transfer of 9,499 for 9,999; two refunds, each reversed by Stripe's rounding.
    sep, sep_history = separate_transfer(stripe_api, db, provider, amount=9_999, refund_amounts=[1_001, 2_333])
    record_refunds(sep, "ch_unlinked", [])
    with session_scope() as session:
        session.execute(text("UPDATE marketplace_worker.transaction_refunds SET refunded_cents = 3334 "
                             "WHERE transaction_id = :t"), {"t": sep.id})
        session.execute(text("UPDATE public.\"Invoice\" SET \"stripeChargeId\" = 'ch_sep0001' WHERE id = :i"),
                        {"i": sep.invoiceId})
        for amount in (1_001, 2_333):
            session.execute(text("INSERT INTO marketplace_worker.stripe_refunds (refund_id, charge_id, amount, status) "
                                 "VALUES (:id, 'ch_sep0001', :a, 'succeeded')"), {"id": se.new_id("re"), "a": amount})
    paid_out(stripe_api, account, dest_history, sep_history)

    result = run(account)

    assert dict(result.outcomes) == {"paid_out": 2}
    assert sorted(result.completed) == sorted([dest.id, sep.id])
    assert discrepancies(db) == []


def test_an_over_reversal_is_still_a_discrepancy(db, stripe_api):
    provider = connect_provider(db)
    account = provider.stripeConnectAccountId
    # 2,500 of 10,000 refunded: the provider keeps 7,125; reversing 5,000 takes 2,375 too much.
    dest, dest_history = destination_charge(stripe_api, db, provider, refund_amounts=[2_500],
                                            reversal_amounts=[5_000])
    record_refunds(dest, dest_history.charge_id, [2_500])
    sep, sep_history = separate_transfer(stripe_api, db, provider, refund_amounts=[2_500], reversal_amounts=[5_000])
    with session_scope() as session:
        session.execute(text("UPDATE public.\"Invoice\" SET \"stripeChargeId\" = 'ch_sep0002' WHERE id = :i"),
                        {"i": sep.invoiceId})
    record_refunds(sep, "ch_sep0002", [2_500])
    paid_out(stripe_api, account, dest_history, sep_history)

    result = run(account)

    assert dict(result.outcomes) == {"transfer_reversed": 2}
    assert result.completed == []
    found = {d.transaction_id: d for d in discrepancies(db)}
    # Destination charge: 10,000 − 5,000 reversed − (500 − 125) fee; separate: 9,500 − 5,000.
    assert (found[dest.id].kind, found[dest.id].expected_cents, found[dest.id].seen_cents) == (
        "transfer_reversed", 7_125, 4_625)
    assert (found[sep.id].kind, found[sep.id].expected_cents, found[sep.id].seen_cents) == (
        "transfer_reversed", 7_125, 4_500)
    assert "25.00 USD refunded" in found[sep.id].detail


def test_a_refund_without_its_fee_refund_leaves_the_provider_short(db, stripe_api):
    provider = connect_provider(db)
    account = provider.stripeConnectAccountId
    txn, history = destination_charge(stripe_api, db, provider, refund_amounts=[2_500], refund_application_fee=False)
    record_refunds(txn, history.charge_id, [2_500])
    paid_out(stripe_api, account, history)

    assert dict(run(account).outcomes) == {"transfer_reversed": 1}
    [found] = discrepancies(db)
    assert (found.expected_cents, found.seen_cents) == (7_125, 7_000)


def test_a_fee_refunded_after_the_listing_window_is_read_again(db, stripe_api):
    provider = connect_provider(db)
    account = provider.stripeConnectAccountId
    txn, history = destination_charge(stripe_api, db, provider, days_ago=60)
    paid_out(stripe_api, account, history, days_ago=58)
    assert run(account).completed == [txn.id]

    # Two months on, a refund reverses the transfer and refunds the fee: only events tell.
    transfer = stripe_api.get("transfer", history.transfer_id)
    reversal = se.transfer_reversal(transfer=transfer["id"], amount=2_500)
    reversed_ = {**transfer, "amount_reversed": 2_500,
                 "reversals": {**transfer["reversals"], "data": [reversal], "total_count": 1}}
    stripe_api.add("transfer", reversed_)
    fee = stripe_api.get("application_fee", history.application_fee_id)
    stripe_api.add("application_fee", {**fee, "amount_refunded": 125})
    record_refunds(txn, history.charge_id, [2_500])
    assert deliver(db, se.event("transfer.reversed", reversed_), endpoint="platform") == "processed"

    result = run(account)

    assert dict(result.outcomes) == {"paid_out": 1}
    assert discrepancies(db) == []
    assert stripe_api.call_count(f"/v1/application_fees/{history.application_fee_id}") == 1


def test_a_transfer_is_matched_through_the_payment_intent_when_the_invoice_knows_only_that(db, stripe_api):
    provider = connect_provider(db)
    account = provider.stripeConnectAccountId
    tl = se.destination_charge_history(account, 10_000, application_fee_amount=500, start=int(time.time()) - 3 * DAY)
    se.publish(stripe_api, tl)
    txn = keyed_transaction(db, provider, stripePaymentIntentId=tl.payment_intent_id)
    paid_out(stripe_api, account, tl)

    assert run(account).completed == [txn.id]


def test_a_run_matches_only_new_transfers(db, stripe_api):
    provider = connect_provider(db)
    account = provider.stripeConnectAccountId
    txns = [paid_transaction(db, provider) for _ in range(3)]
    pay_out(stripe_api, account, [send_transfer(stripe_api, account, t) for t in txns[:2]])
    stray = send_transfer(stripe_api, account, None, amount=1_234, key="none")
    run(account)

    with session_scope() as session:
        # Matched ones are not matched again; the orphan is tried again (its invoice may be linked later).
        assert classify.match_transfers(session, account, provider.id) == 0
        assert session.execute(text("SELECT count(*) FROM marketplace_worker.connect_transfers "
                                    "WHERE destination = :a AND transaction_id IS NULL"), {"a": account}).scalar() == 1
    later = send_transfer(stripe_api, account, txns[2])
    with session_scope() as session:
        mirror.store_transfers(session, [mirror.transfer_row(later, int(time.time()), "evt_later")])
        assert classify.match_transfers(session, account, provider.id) == 1
    assert open_kinds(db) == sorted([("orphan_transfer", stray["id"]), ("missing_transfer", str(txns[2].id))])


def manual_payment(fake, account: str, history: se.Timeline, available_on: int) -> None:
    """The transfer's payment on an account on manual payouts, available from `available_on`."""
    bt = history.connected_balance_transactions[0]
    fake.add("balance_transaction", {**bt, "available_on": available_on,
                                     "status": "available" if available_on <= time.time() else "pending"},
             account=account)


def test_a_manual_payout_accounts_transactions_complete_when_their_funds_are_available(db, stripe_api, caplog):
    provider = connect_provider(db)
    account = provider.stripeConnectAccountId
    now = int(time.time())
    ready, ready_history = destination_charge(stripe_api, db, provider, days_ago=5)
    waiting, waiting_history = separate_transfer(stripe_api, db, provider, days_ago=1)
    manual_payment(stripe_api, account, ready_history, now - 3 * DAY)
    manual_payment(stripe_api, account, waiting_history, now + DAY)
    # The provider paid out by hand once: Stripe itemizes no manual payout.
    earlier = se.payout(amount=5_000, created=now - 20 * DAY, automatic=False)
    stripe_api.add("payout", earlier, account=account)
    assert earlier["reconciliation_status"] == "not_applicable"

    with caplog.at_level("INFO", logger="domain.connect.classify"):
        result = run(account)

    assert result.completed == [ready.id]
    assert dict(result.outcomes) == {"funds_available": 1, "awaiting_funds": 1}
    assert result.payouts == "manual"
    row = transaction(db, ready.id)
    assert (row.status, row.completedAt) == ("completed", from_unix(now - 3 * DAY))
    assert transaction(db, waiting.id).status == "paid"
    assert discrepancies(db) == []
    assert f"{account} is on manual payouts: 1 transaction(s) with their funds available, 1 awaiting them" \
        in caplog.text
    assert "manual payouts" in result.describe()
    # No `?payout=` for a manual payout (Stripe refuses it): the account's payments instead.
    bt_calls = [c for c in stripe_api.calls if c.path == "/v1/balance_transactions"]
    assert [c.params.get("type") for c in bt_calls] == ["payment"]


def test_an_account_without_payouts_is_asked_for_its_schedule_once(db, stripe_api):
    provider = connect_provider(db)
    account = provider.stripeConnectAccountId
    acct = se.account(id=account)
    acct["settings"] = {"payouts": {"debit_negative_balances": True, "statement_descriptor": None,
                                    "schedule": {"delay_days": 2, "interval": "manual"}}}
    stripe_api.add("account", acct)
    txn, history = destination_charge(stripe_api, db, provider, days_ago=5)
    manual_payment(stripe_api, account, history, int(time.time()) - 3 * DAY)

    first = run(account)
    assert (first.completed, first.payouts) == ([txn.id], "manual")
    assert stripe_api.call_count(f"/v1/accounts/{account}") == 1

    again = paid_transaction(db, provider)
    send_transfer(stripe_api, account, again)
    run(account)
    assert stripe_api.call_count(f"/v1/accounts/{account}") == 1  # read at most daily


@pytest.mark.flow
def test_a_destination_charge_is_completed_by_the_worker_after_its_payout_event(celery_worker, db, stripe_api):
    from tasks.reconciliation import reconcile_dirty

    provider = connect_provider(db)
    account = provider.stripeConnectAccountId
    txn, history = destination_charge(stripe_api, db, provider, refund_amounts=[2_500])
    record_refunds(txn, history.charge_id, [2_500])
    payout_id = paid_out(stripe_api, account, history)
    enqueue_connect_event(db, se.event("payout.paid", stripe_api.get("payout", payout_id, account=account),
                                       account=account))
    wait_for(lambda: connect_run.dirty_accounts(db) == [account] or db.rollback(), message="account marked")
    reconcile_dirty.delay()

    wait_for(lambda: transaction(db, txn.id).status == "completed", timeout=30, message="completed")
    assert discrepancies(db) == []
