"""Backfill from Stripe's history (`marketplace-worker backfill`): the ledger it builds from
Stripe's list endpoints, through the real SDK and the fake Stripe API, against the ledger the
same history's events (and a reconciliation) build."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from config import get_settings
from domain import backfill
from domain.connect.reader import StripeReader
from domain.connect.run import reconcile_account
from domain.inbox import INSERT_EVENTS_SQL, event_from_dict, insert_params
from domain.stripe_api import get_client
from domain.ledger import platform_fee_cents
from models.db import get_engine, session_scope
from tests.conftest import TABLES
from harness import factories
from harness import stripe_events as se
from harness.lifecycle import run_batch

DAY = 86_400
GRACE = timedelta(hours=48)
ACCOUNTS = 10  # connected accounts, 10 invoices each: half of the 200
MANUAL_PROVIDERS = 4
PLATFORM_LISTS = ("/v1/invoices", "/v1/charges", "/v1/refunds", "/v1/disputes")


# --- the history -------------------------------------------------------------------------------


def account_id(n: int) -> str:
    return f"acct_backfill{n:04d}"


def seed_app(db, invoices: int = 200, accounts: int = ACCOUNTS) -> list[int]:
    """The main app's rows, the same ids and values every time (on emptied tables): providers,
    a client, and open marketplace invoices the app made before the worker existed; ten to each
    connected account's provider, then the rest to manual providers."""
    providers = []
    for n in range(accounts + MANUAL_PROVIDERS):
        connect = n < accounts
        owner = factories.user(db, id=f"cuser_bf_owner{n:03d}", email=f"owner{n}@backfill.test", name=f"Owner {n}")
        providers.append(factories.provider(
            db, owner=owner, payment_mode="stripe_connect" if connect else "manual",
            stripeConnectAccountId=account_id(n) if connect else None, businessName=f"Backfill groomers {n}"))
    client = factories.user(db, id="cuser_bf_client", email="client@backfill.test", name="Client")
    ids = []
    for n in range(invoices):
        provider = providers[n // 10] if n < 10 * accounts else providers[accounts + n % MANUAL_PROVIDERS]
        ids.append(factories.invoice(db, provider, client=client, amount_cents=10_000 + 37 * n, stripe=False,
                                          invoiceNumber=f"INV-BF-{n:04d}").id)
    db.commit()
    return ids


def fresh(db, **seed) -> list[int]:
    """Empty tables, then the app's rows again: a worker installed on the app's data."""
    db.rollback()
    worker_tables = db.execute(text(
        "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables "
        "WHERE schemaname = 'marketplace_worker' AND tablename <> 'alembic_version'")).scalars().all()
    db.execute(text(f"TRUNCATE {', '.join(TABLES + list(worker_tables))} RESTART IDENTITY CASCADE"))
    db.commit()
    return seed_app(db, **seed)


def outcome_of(n: int) -> tuple[str, dict]:
    kind = n % 10
    if kind in (1, 6):
        return "paid_partial_refund", {}
    if kind == 3:
        return "paid_full_refund", {}
    if kind == 5:
        return "paid_disputed", {"dispute_outcome": (None, "won", "lost")[n // 10 % 3]}
    if kind == 8:
        return "payment_failed_then_paid", {}
    return "paid", {}


def build_history(invoice_ids: list[int], start: int) -> se.Timeline:
    """200 paid invoices (refunded, disputed, paid after a failure); for the first 100, a
    transfer of the provider's share (its charge as `source_transaction`; reversed in proportion
    for some refunds), and per account a payout of what it got. One account is on manual payouts,
    one payout turns failed after paid."""
    parts = []
    by_account: dict[int, list[se.Timeline]] = {}
    for n, invoice_id in enumerate(invoice_ids):
        amount = 10_000 + 37 * n
        outcome, extra = outcome_of(n)
        t0 = start + n * 600
        tl = se.invoice_lifecycle(str(invoice_id), amount, start=t0, outcome=outcome, **extra)
        parts.append(tl)
        if n >= 100:
            continue
        share = amount - platform_fee_cents(amount, 500)
        refunds = [e["data"]["object"]["amount"] for e in tl if e["type"] == "refund.created"]
        reversals = [(2 * r * share + amount) // (2 * amount) for r in refunds] if n % 20 == 1 else []
        transfer = se.transfer_history(account_id(n // 10), share, start=t0 + 4 * 3600, reversal_amounts=reversals)
        for event in transfer:  # separate charges and transfers, funded by the invoice's charge
            event["data"]["object"]["source_transaction"] = tl.charge_id
        by_account.setdefault(n // 10, []).append(transfer)
        parts.append(transfer)
    for n, transfers in by_account.items():
        swept = [bt for t in transfers for bt in t.connected_balance_transactions]
        at = max(e["created"] for t in transfers for e in t) + 2 * DAY
        parts.append(se.payout_history(account_id(n), sum(bt["net"] for bt in swept), start=at, swept=swept,
                                       automatic=n != 7, outcome="paid_then_failed" if n == 3 else "paid"))
    return se.Timeline.merge(*parts)


def deliver_all(db, events: list[dict]) -> None:
    """Store every event as the receivers would, then process them in messages of 50."""
    db.rollback()
    for endpoint in ("platform", "connect"):
        incoming = [event_from_dict(e, json.dumps(e), endpoint, livemode=False)
                    for e in events if bool(e.get("account")) == (endpoint == "connect")]
        db.connection().exec_driver_sql(INSERT_EVENTS_SQL, insert_params(incoming))
    db.commit()
    ids = [e["id"] for e in events]
    for start in range(0, len(ids), 50):
        outcomes = run_batch(ids[start:start + 50])
        assert set(outcomes.values()) <= {"processed", "ignored"}, outcomes


def reconcile_all() -> None:
    reader = StripeReader(get_client(), retry_base_seconds=0.01)
    for n in range(ACCOUNTS):
        reconcile_account(session_scope, get_engine(), reader, account_id(n), grace=GRACE)


# Everything the worker derived, with its own ids (transactions, discrepancies) replaced by the
# app's invoice id, which both runs share; without the times of its own writes.
_LEDGER = {
    "invoices": 'SELECT id, status, "amountPaidCents", "paidAt", "voidedAt", "stripeInvoiceId", "stripeChargeId",'
                ' "stripePaymentIntentId" FROM "Invoice" ORDER BY id',
    "transactions": 'SELECT "invoiceId", "providerId", "clientUserId", status, "totalCents", "platformFeeCents",'
                    ' "providerPayoutCents", "invoicedAt", "paidAt", "completedAt", "serviceDescription",'
                    ' r.refunded_cents FROM marketplace.transactions t'
                    ' LEFT JOIN marketplace_worker.transaction_refunds r ON r.transaction_id = t.id'
                    ' ORDER BY "invoiceId"',
    "charges": "SELECT charge_id, payment_intent_id, amount, amount_refunded, refunded"
               " FROM marketplace_worker.stripe_charges ORDER BY 1",
    "refunds": "SELECT refund_id, charge_id, payment_intent_id, amount, status"
               " FROM marketplace_worker.stripe_refunds ORDER BY 1",
    "disputes": "SELECT dispute_id, charge_id, payment_intent_id, amount, status"
                " FROM marketplace_worker.stripe_disputes ORDER BY 1",
    "invoice_payments": "SELECT invoice_payment_id, stripe_invoice_id, charge_id, payment_intent_id, status"
                        " FROM marketplace_worker.stripe_invoice_payments ORDER BY 1",
    "transfers": 'SELECT tr.id, destination, amount, amount_reversed, destination_payment, source_transaction,'
                 ' transfer_group, created, source_payment_intent, destination_charge, t."invoiceId"'
                 ' FROM marketplace_worker.connect_transfers tr'
                 ' LEFT JOIN marketplace.transactions t ON t.id = tr.transaction_id ORDER BY 1',
    "payouts": "SELECT id, account, amount, status, automatic, reconciliation_status, arrival_date, failure_code,"
               " created, items_listed_at IS NOT NULL FROM marketplace_worker.connect_payouts ORDER BY 1",
    "payout_items": "SELECT balance_transaction_id, account, payout_id, source, type, amount"
                    " FROM marketplace_worker.connect_payout_items ORDER BY 1",
    "payments": "SELECT id, account, balance_transaction_id, amount, available_on, created"
                " FROM marketplace_worker.connect_payments ORDER BY 1",
    "discrepancies": 'SELECT kind, CASE WHEN d.transaction_id IS NULL THEN subject END, account, t."invoiceId",'
                     ' expected_cents, seen_cents, transfer_ids, payout_id, resolved_at IS NULL'
                     ' FROM marketplace_worker.reconcile_discrepancies d'
                     ' LEFT JOIN marketplace.transactions t ON t.id = d.transaction_id ORDER BY 1, 2, 4',
}


def ledger(db) -> dict[str, list[tuple]]:
    db.rollback()
    return {name: [tuple(row) for row in db.execute(text(sql))] for name, sql in _LEDGER.items()}


def run_backfill(since: int, client=None, **kw) -> tuple[backfill.BackfillResult, list]:
    pages: list[backfill.Progress] = []
    on_page = kw.pop("on_page", None)

    def progress(page: backfill.Progress) -> None:
        pages.append(page)
        if on_page:
            on_page(page)

    return backfill.backfill(session_scope, client or get_client(), since=since, on_page=progress, **kw), pages


class Killed(Exception):
    """The process stopped between two pages."""


# --- the test ------------------------------------------------------------------------------------


def test_backfill_builds_the_ledger_the_events_build_and_resumes_without_asking_stripe_twice(db, stripe_api):
    start = int(time.time()) - 100 * DAY  # most of it older than the 30 days of events Stripe keeps
    since_date = datetime.fromtimestamp(start - DAY, UTC).strftime("%Y-%m-%d")
    since = int(datetime.strptime(since_date, "%Y-%m-%d").replace(tzinfo=UTC).timestamp())
    history = build_history(fresh(db), start)
    se.publish(stripe_api, history)

    # The reference: every event delivered, then each account reconciled.
    deliver_all(db, list(history))
    reconcile_all()
    expected = ledger(db)
    assert len(expected["transactions"]) == 200
    assert {row[3] for row in expected["transactions"]} == {"paid", "completed", "refunded"}
    kinds = {row[0] for row in expected["discrepancies"]}
    assert {"amount_mismatch", "transfer_not_reversed", "payout_failed"} <= kinds
    assert len(expected["payout_items"]) > 90 and len(expected["payments"]) == 10  # one manual-payout account

    # From no events at all, and interrupted three times.
    fresh(db)
    first_call = len(stripe_api.calls)
    no_retries = get_client(get_settings().model_copy(update={"stripe_max_network_retries": 0}))

    def fail_second_charges_page(page: backfill.Progress) -> None:
        if page.stream == "charges" and page.pages == 1:
            stripe_api.fail_next(500, path_prefix="/v1/charges")

    first, pages = run_backfill(since, no_retries, on_page=fail_second_charges_page)
    assert list(first.failed) == ["charges platform"] and first.waiting and not first.accounts
    assert [(p.stream, p.pages) for p in pages] == [("invoices", 1), ("invoices", 2), ("charges", 1),
                                                    ("refunds", 1), ("disputes", 1)]
    assert pages[1].objects == 200
    with session_scope() as session:
        failed = [c for c in backfill.cursors(session) if c.last_error]
        assert [(c.stream, c.pages) for c in failed] == [("charges", 1)]

    def kill_after_second_charges_page(page: backfill.Progress) -> None:
        if page.stream == "charges" and page.pages == 2:
            raise Killed

    with pytest.raises(Killed):
        run_backfill(since, on_page=kill_after_second_charges_page)

    stripe_api.fail_next(403, path_prefix="/v1/payouts")  # the first account's listing
    third, pages = run_backfill(since)
    assert list(third.failed) == [f"connect {account_id(0)}"]
    assert "PermissionError" in third.failed[f"connect {account_id(0)}"]
    assert sorted(third.already_done) == ["disputes platform", "invoices platform", "refunds platform"]
    assert (pages[0].stream, pages[0].pages, pages[0].objects) == ("charges", 3, 200)  # 20 failed ones left out
    assert len(third.accounts) == ACCOUNTS - 1
    fourth_call = len(stripe_api.calls)

    fourth, _ = run_backfill(since)
    assert fourth.complete and [a.account for a in fourth.accounts] == [account_id(0)]
    assert all(account_id(0) in (c.stripe_account, c.params.get("destination"))
               for c in stripe_api.calls[fourth_call:])

    fifth, _ = run_backfill(since)  # everything done: no call at all
    assert fifth.complete and fifth.calls == 0 and fifth.pages == 0

    assert ledger(db) == expected

    # No page asked for twice once applied: each successful platform page once; each account's
    # listing once, but the one whose listing failed halfway.
    answered = [c for c in stripe_api.calls[first_call:] if c.status == 200]
    platform = [(c.path, c.params.get("starting_after")) for c in answered if c.path in PLATFORM_LISTS]
    assert len(platform) == len(set(platform)) == 2 + 3 + 1 + 1
    assert all(c.params.get("limit") == "100" for c in answered)
    assert all(c.params.get("expand") == ["data.payments"] for c in answered if c.path == "/v1/invoices")
    per_account = [(c.stripe_account or c.params.get("destination"), c.path, c.params.get("payout"))
                   for c in answered if c.path not in PLATFORM_LISTS]
    again = {key for key in per_account if per_account.count(key) > 1}
    assert again == {(account_id(0), "/v1/transfers", None)}
    assert len(answered) == 37 + 1  # the README's figure for this history, and the listing made twice


def test_events_before_or_after_a_backfill_leave_the_ledger_they_leave_alone(db, stripe_api):
    invoice_ids = fresh(db, invoices=5, accounts=0)
    start = int(time.time()) - 100 * DAY
    outcomes = [("paid", {}), ("paid_partial_refund", {}), ("paid_full_refund", {}), ("payment_failed_then_paid", {}),
                ("paid_disputed", {"dispute_outcome": "lost"})]
    history = se.Timeline.merge(*[se.invoice_lifecycle(str(invoice_id), 10_000 + 37 * n, start=start + n * 600,
                                                       outcome=outcome, **extra)
                                  for n, (invoice_id, (outcome, extra)) in enumerate(zip(invoice_ids, outcomes))])
    se.publish(stripe_api, history)
    deliver_all(db, list(history))
    expected = ledger(db)
    assert [row[3] for row in expected["transactions"]] == ["paid", "paid", "refunded", "paid", "refunded"]

    assert run_backfill(start - DAY)[0].complete  # the events came first
    assert ledger(db) == expected

    fresh(db, invoices=5, accounts=0)
    assert run_backfill(start - DAY)[0].complete
    deliver_all(db, list(history))  # the events come after: older than the reads, they change nothing
    assert ledger(db) == expected


def test_a_run_with_another_date_starts_over_and_bad_input_is_refused(db, stripe_api, capsys):
    from worker import cli

    fresh(db, invoices=1, accounts=1)
    invoice = se.invoice_lifecycle("1", 10_000, start=int(time.time()) - 40 * DAY)
    se.publish(stripe_api, invoice)
    since = int(time.time()) - 50 * DAY
    assert run_backfill(since)[0].objects["invoices"] == 1
    assert run_backfill(since)[0].calls == 0
    calls = len(stripe_api.calls)
    again, _ = run_backfill(since - DAY)
    assert again.objects["invoices"] == 1 and again.calls > 0
    assert stripe_api.calls[calls].params.get("starting_after") is None

    # The object a cursor names is gone from Stripe (a deleted draft): the stream goes on from its second.
    with session_scope() as session:
        session.execute(text("UPDATE marketplace_worker.backfill_cursors SET starting_after = 'in_deleted',"
                             " done_at = NULL WHERE stream = 'invoices'"))
    calls = len(stripe_api.calls)
    resumed, _ = run_backfill(since - DAY)
    assert resumed.complete and resumed.objects == {"invoices": 1}
    assert [(c.status, c.params.get("starting_after"), c.params["created"]) for c in stripe_api.calls[calls:]] == [
        (400, "in_deleted", {"gte": str(since - DAY)}),
        (200, None, {"gte": str(since - DAY), "lte": str(invoice[0]["created"])})]

    assert cli.main(["backfill", "--since", "2026-13-01"]) == 2
    assert cli.main(["backfill", "--since", "2999-01-01"]) == 2
    assert cli.main(["backfill", "--since", "2026-01-01", "--account", "acct_nobody"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["marketplace-worker backfill: --since must be a date, YYYY-MM-DD",
                   "marketplace-worker backfill: --since is in the future",
                   "marketplace-worker backfill: acct_nobody belongs to no stripe_connect provider"]

    day = datetime.fromtimestamp(since, UTC).strftime("%Y-%m-%d")
    assert cli.main(["backfill", "--since", day, "--restart"]) == 0
    out, err = capsys.readouterr()
    assert err == ""  # not a terminal: no progress lines
    assert out.startswith(f"backfill from {day}: ") and "invoices 1" in out
