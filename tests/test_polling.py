"""Invoice polling, completion, one transaction per invoice under concurrency, and flows
through the real worker (SPEC §3)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from datetime import timedelta

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError

from config import get_settings
from domain import completion, polling
from domain.clock import from_unix, utcnow
from domain.lifecycle import CANCELLED, COMPLETED, INVOICED, PAID, PENDING_INVOICE, REFUNDED
from domain.stripe_api import get_client
from models import Invoice, Transaction
from models.db import make_session, session_scope
from harness import factories
from harness import stripe_events as se
from harness.flow import wait_for
from harness.lifecycle import deliver, event_status, ledger_state, run, run_batch, store

HOUR, DAY = 3600, 86_400


def poll(stripe: bool = True, **overrides) -> polling.PollResult:
    settings = get_settings().model_copy(update=overrides)
    return polling.poll_invoices(session_scope, get_client(settings) if stripe else None, settings)


def transactions_of(db, invoice: Invoice) -> list[Transaction]:
    db.expire_all()
    return list(db.execute(select(Transaction).where(Transaction.invoiceId == invoice.id)).scalars())


def manual_invoice(db, **fields) -> Invoice:
    provider = fields.pop("provider", None) or factories.provider(db, payment_mode="manual")
    row = factories.invoice(db, provider, stripe=False, **fields)
    db.commit()
    return row


# --- changed invoices -------------------------------------------------------------------------


def test_the_poller_creates_missing_transactions_and_reports_what_it_skipped(db):
    draft = manual_invoice(db, status="draft", amount_cents=2_990)
    sent = manual_invoice(db, status="open", description="Obedience class")
    manual_invoice(db, clientUserId=None)
    manual_invoice(db, marketplaceProviderId=None)
    manual_invoice(db, deletedAt=utcnow())
    manual_invoice(db, isMarketplaceInvoice=False)

    result = poll(stripe=False)
    assert result.counts() == {
        "created": 2, "advanced": 1, "refreshed_from_stripe": 0,
        "skipped": {"deleted": 1, "missing_client": 1, "missing_provider": 1},
    }
    [pending] = transactions_of(db, draft)
    assert (pending.status, pending.totalCents, pending.platformFeeCents, pending.providerPayoutCents) == (
        PENDING_INVOICE, 2_990, 150, 2_840)  # 149.5 -> 150
    [invoiced] = transactions_of(db, sent)
    assert (invoiced.status, invoiced.serviceDescription, invoiced.invoicedAt) == (
        INVOICED, "Obedience class", sent.issuedAt)

    again = poll(stripe=False)
    assert (again.created, again.advanced) == (0, 0)
    assert len(transactions_of(db, draft)) == len(transactions_of(db, sent)) == 1


def test_a_manual_payment_is_advanced_by_the_poller_alone(db):
    invoice = manual_invoice(db, status="open")
    poll(stripe=False)
    paid_at = (utcnow() - timedelta(hours=3)).replace(microsecond=0)
    invoice.status, invoice.paidAt, invoice.amountPaidCents, invoice.updatedAt = "paid", paid_at, 10_000, utcnow()
    db.commit()

    assert poll(stripe=False).advanced == 1
    [row] = transactions_of(db, invoice)
    assert (row.status, row.paidAt) == (PAID, paid_at)
    touched = db.execute(text("SELECT DISTINCT provider_id FROM marketplace_worker.touched_providers")).scalars().all()
    assert touched == [invoice.marketplaceProviderId]


def test_a_manual_invoice_voided_in_the_app_cancels_and_a_paid_one_never_goes_back(db):
    voided = manual_invoice(db, status="open")
    paid = manual_invoice(db, status="paid", paidAt=utcnow())
    poll(stripe=False)
    for row, status in ((voided, "void"), (paid, "void")):
        row.status, row.voidedAt, row.updatedAt = status, utcnow(), utcnow()
    db.commit()
    poll(stripe=False)
    assert transactions_of(db, voided)[0].status == CANCELLED
    assert transactions_of(db, paid)[0].status == PAID


def test_an_invoice_unchanged_since_the_last_run_is_not_read_again(db):
    manual_invoice(db, status="open")
    poll(stripe=False)  # sets the watermark of open invoices
    old = manual_invoice(db, status="open", updatedAt=utcnow() - timedelta(days=2))
    new = manual_invoice(db, status="open")
    assert poll(stripe=False).created == 1
    assert transactions_of(db, old) == []
    assert len(transactions_of(db, new)) == 1


def test_a_change_committed_late_inside_the_overlap_window_is_still_seen(db):
    manual_invoice(db, status="open")
    poll(stripe=False)
    # An app transaction that stamped updatedAt a minute ago and committed only now.
    late = manual_invoice(db, status="open", updatedAt=utcnow() - timedelta(seconds=60))
    assert poll(stripe=False, poll_overlap_seconds=0).created == 0
    assert poll(stripe=False, poll_overlap_seconds=120).created == 1
    assert len(transactions_of(db, late)) == 1


def test_a_run_is_bounded_and_the_next_one_carries_on(db):
    invoices = [manual_invoice(db, status="open") for _ in range(5)]
    assert poll(stripe=False, poll_batch_size=2, poll_max_invoices_per_run=3).created == 3
    assert poll(stripe=False, poll_batch_size=2, poll_max_invoices_per_run=3).created == 2
    assert all(len(transactions_of(db, i)) == 1 for i in invoices)


def test_a_run_stopped_by_its_budget_resumes_with_the_overlap(db):
    first = [manual_invoice(db, status="open", updatedAt=utcnow() - timedelta(seconds=30)) for _ in range(3)]
    assert poll(stripe=False, poll_batch_size=2, poll_max_invoices_per_run=2).created == 2
    # Stamped before where that run stopped, committed only now.
    late = manual_invoice(db, status="open", updatedAt=utcnow() - timedelta(seconds=40))
    result = poll(stripe=False, poll_batch_size=2, poll_max_invoices_per_run=2)
    assert result.created == 2  # the late one and the third: re-reading the window costs no budget
    assert all(len(transactions_of(db, i)) == 1 for i in [*first, late])


def test_the_page_query_reads_the_status_updated_at_index(db):
    db.execute(text(
        """
        INSERT INTO "Invoice" ("invoiceNumber", status, "amountCents", "isMarketplaceInvoice", "updatedAt")
        SELECT 'BULK-' || g, (ARRAY['draft', 'open', 'paid', 'void'])[1 + g % 4], 1000, g % 3 <> 0,
               now() - make_interval(mins => g)
        FROM generate_series(1, 20000) AS g
        """
    ))
    db.execute(text('ANALYZE "Invoice"'))
    plan = "\n".join(db.execute(
        text("EXPLAIN " + polling._PAGE_SQL.text),
        {"status": "paid", "after_at": utcnow() - timedelta(minutes=5), "after_id": 0, "until": utcnow(),
         "limit": 500},
    ).scalars())
    db.rollback()
    assert "Invoice_isMarketplaceInvoice_status_updatedAt_idx" in plan, plan
    assert "Seq Scan" not in plan, plan


# --- stuck Stripe invoices --------------------------------------------------------------------


def stripe_invoice_row(db, *, status="open", updated_hours_ago=7.0, **fields) -> Invoice:
    provider = factories.provider(db, payment_mode="stripe")
    row = factories.invoice(db, provider, status=status, updatedAt=utcnow() - timedelta(hours=updated_hours_ago),
                            **fields)
    db.commit()
    return row


def test_a_missed_invoice_paid_webhook_is_recovered_from_stripe(db, stripe_api):
    invoice = stripe_invoice_row(db)
    factories.transaction(db, invoice, status=INVOICED)
    db.commit()
    paid_at = 1_790_003_600
    stripe_api.add("invoices", se.invoice(
        id=invoice.stripeInvoiceId, app_invoice_id=str(invoice.id), amount=10_000, status="paid", created=paid_at,
        status_transitions={"finalized_at": paid_at - HOUR, "paid_at": paid_at, "voided_at": None,
                            "marked_uncollectible_at": None}))
    # What `expand[]=payments` renders, and the PaymentIntent's charge.
    stripe_api.add("invoice_payments", se.invoice_payment(
        invoice=invoice.stripeInvoiceId, amount=10_000, payment_intent="pi_recovered001", created=paid_at))
    stripe_api.add("charges", se.charge(id="ch_recovered001", amount=10_000, payment_intent="pi_recovered001",
                                        created=paid_at))

    result = poll(poll_overlap_seconds=0)
    assert (result.refreshed_from_stripe, result.advanced) == (1, 1)
    [row] = transactions_of(db, invoice)
    assert (row.status, row.paidAt) == (PAID, from_unix(paid_at))
    db.refresh(invoice)
    assert (invoice.status, invoice.amountPaidCents, invoice.paidAt, invoice.stripePaymentIntentId,
            invoice.stripeChargeId) == ("paid", 10_000, from_unix(paid_at), "pi_recovered001", "ch_recovered001")
    [call] = [c for c in stripe_api.calls if c.path.startswith("/v1/invoices/")]
    assert call.params.get("expand") == ["payments"]
    [call] = [c for c in stripe_api.calls if c.path == "/v1/charges"]
    assert call.params.get("payment_intent") == "pi_recovered001"

    assert poll().refreshed_from_stripe == 0  # paid and linked now: nothing is due


def test_stuck_reads_are_bounded_and_a_recent_sighting_is_not_read_again(db, stripe_api):
    stale = [stripe_invoice_row(db) for _ in range(3)]
    fresh = stripe_invoice_row(db, updated_hours_ago=1)  # changed an hour ago, not stale yet
    for row in [*stale, fresh]:
        stripe_api.add("invoices", se.invoice(id=row.stripeInvoiceId, app_invoice_id=str(row.id), status="open"))

    assert poll(poll_stripe_reads_per_run=2).refreshed_from_stripe == 2
    assert poll(poll_stripe_reads_per_run=2).refreshed_from_stripe == 1  # the third; the first two were just seen
    assert poll(poll_stripe_reads_per_run=2).refreshed_from_stripe == 0
    assert stripe_api.call_count("/v1/invoices/") == 3


def test_an_open_invoice_past_due_is_rechecked_sooner(db, stripe_api):
    overdue = stripe_invoice_row(db, updated_hours_ago=1, dueAt=utcnow() - timedelta(days=1))
    stripe_api.add("invoices", se.invoice(id=overdue.stripeInvoiceId, app_invoice_id=str(overdue.id),
                                          status="uncollectible"))
    result = poll()
    assert result.refreshed_from_stripe == 1
    assert transactions_of(db, overdue)[0].status == CANCELLED
    assert poll().refreshed_from_stripe == 0  # just seen: not before POLL_RECHECK_SECONDS


def test_stripe_errors_are_counted_and_do_not_stop_the_poll(db, stripe_api):
    gone = stripe_invoice_row(db)
    manual = manual_invoice(db, status="open")
    result = poll()
    assert result.skipped["stripe_not_found"] == 1
    assert len(transactions_of(db, manual)) == 1
    db.refresh(gone)
    assert gone.status == "open"


def test_a_basil_payment_missing_from_webhooks_is_linked_from_stripe_and_its_refund_applied(db, stripe_api):
    provider = factories.provider(db, payment_mode="stripe")
    invoice = factories.invoice(db, provider, stripe=False, status="draft")
    db.commit()
    # 2025-03-31.basil: no invoice_payment.paid yet, and no webhook ties the payment to the invoice.
    timeline = se.invoice_lifecycle(str(invoice.id), 10_000, shape="basil", api_version=se.BASIL_API_VERSION,
                                    start=1_790_000_000, outcome="paid_full_refund")
    deliver(db, *timeline)
    assert ledger_state(db, invoice.id)["transactions"][0][::7] == (PAID, None)  # refund not linked yet
    se.publish(stripe_api, timeline)

    result = poll()
    assert result.refreshed_from_stripe == 1
    state = ledger_state(db, invoice.id)
    assert state["transactions"][0][::7] == (REFUNDED, 10_000)
    # The charge comes from the charge events recorded meanwhile: one read, no charge lookup.
    assert state["invoice"][0][-2:] == (timeline.charge_id, timeline.payment_intent_id)
    assert stripe_api.call_count("/v1/charges") == 0


def paid_unlinked(db, stripe_api, n: int, *, refunded: bool = False) -> tuple[Invoice, se.Timeline]:
    """A Stripe-paid invoice whose webhooks (2025-03-31.basil: no invoice_payment.paid) never
    tie the payment to it; Stripe's side is published to the fake API."""
    provider = factories.provider(db, payment_mode="stripe")
    invoice = factories.invoice(db, provider, stripe=False, status="draft")
    db.commit()
    timeline = se.invoice_lifecycle(str(invoice.id), 10_000, shape="basil", api_version=se.BASIL_API_VERSION,
                                    start=1_790_000_000 + n, outcome="paid_full_refund" if refunded else "paid")
    se.publish(stripe_api, timeline)
    return invoice, timeline


def reads(db) -> dict[int, tuple]:
    db.expire_all()
    return {r.invoice_id: (r.reason, r.attempts, r.due_at > utcnow_aware()) for r in db.execute(text(
        "SELECT invoice_id, reason, attempts, due_at FROM marketplace_worker.stripe_invoice_reads"))}


def utcnow_aware():
    from datetime import UTC, datetime
    return datetime.now(UTC)


def test_an_unlinked_paid_invoice_stays_due_through_budget_and_failures_until_linked(db, stripe_api):
    (one, t1), (two, t2) = paid_unlinked(db, stripe_api, 1, refunded=True), paid_unlinked(db, stripe_api, 2)
    deliver(db, *t1, *t2)
    assert ledger_state(db, one.id)["transactions"][0][::7] == (PAID, None)  # its refund waits for the link

    stripe_api.fail_next(429, count=20, path_prefix="/v1/invoices/")
    result = poll(poll_stripe_reads_per_run=1)
    assert result.skipped["stripe_rate_limited"] == 1
    # Rate limited: due again after a backoff. Left by the budget: still due now.
    assert reads(db) == {one.id: ("unlinked", 1, True), two.id: ("unlinked", 0, False)}
    stripe_api.clear_faults()
    stripe_api.fail_next(404, count=20, path_prefix="/v1/invoices/")
    assert poll(poll_stripe_reads_per_run=1).skipped["stripe_not_found"] == 1
    assert reads(db)[two.id] == ("unlinked", 1, True)  # failed: due again later, never dropped
    stripe_api.clear_faults()

    db.execute(text("UPDATE marketplace_worker.stripe_invoice_reads SET due_at = now()"))  # time passes
    db.commit()
    assert poll(poll_stripe_reads_per_run=2).refreshed_from_stripe == 2
    assert reads(db) == {}
    assert ledger_state(db, one.id)["transactions"][0][::7] == (REFUNDED, 10_000)
    assert ledger_state(db, two.id)["transactions"][0][::7] == (PAID, None)
    assert ledger_state(db, one.id)["invoice"][0][-2:] == (t1.charge_id, t1.payment_intent_id)


def test_a_read_is_stamped_before_its_request_and_never_outranks_a_newer_event(db, stripe_api):
    import time

    invoice = stripe_invoice_row(db)
    stripe_api.add("invoices", se.invoice(id=invoice.stripeInvoiceId, app_invoice_id=str(invoice.id),
                                          status="open", created=1_790_000_000))
    stripe_api.latency_s = 2.0
    before = int(time.time())
    assert poll().refreshed_from_stripe == 1
    # Stripe created this while the read was in flight; it arrives after the read was applied.
    deliver(db, se.event("invoice.paid", se.invoice(
        id=invoice.stripeInvoiceId, app_invoice_id=str(invoice.id), status="paid", created=1_790_000_000),
        created=before + 1))
    db.refresh(invoice)
    assert invoice.status == "paid"


def test_what_is_due_is_read_without_scanning_the_open_invoices(db, stripe_api):
    open_rows = [stripe_invoice_row(db, updated_hours_ago=1) for _ in range(3)]
    poll()  # the first run puts them on the list, due in POLL_STALE_AFTER_SECONDS
    assert {reason for reason, _, later in reads(db).values()} == {"stale"}
    assert all(later for _, _, later in reads(db).values())
    assert stripe_api.call_count("/v1/invoices/") == 0
    plan = "\n".join(db.execute(text("EXPLAIN " + polling._DUE_READS_SQL.text),
                                {"reason": "stale", "limit": 50}).scalars())
    db.rollback()
    assert "ix_stripe_invoice_reads_reason_due_at" in plan, plan
    assert len(open_rows) == 3


# --- completion -------------------------------------------------------------------------------


def paid_transaction(db, *, mode="manual", days_ago=8.0, **invoice_fields) -> Transaction:
    provider = factories.provider(db, payment_mode=mode)
    invoice = factories.invoice(db, provider, status="paid", **invoice_fields)
    row = factories.transaction(db, invoice, status=PAID, paidAt=utcnow() - timedelta(days=days_ago))
    db.commit()
    return row


def status_of(db, row: Transaction) -> str:
    db.expire_all()
    return db.get(Transaction, row.id).status


def test_completion_after_the_hold_for_manual_and_stripe_providers_only(db):
    due_manual = paid_transaction(db, mode="manual", days_ago=7.01)
    due_stripe = paid_transaction(db, mode="stripe", days_ago=30)
    too_recent = paid_transaction(db, mode="manual", days_ago=6.99)
    connect = paid_transaction(db, mode="stripe_connect", days_ago=30)

    assert completion.complete_transactions(session_scope, hold_days=7) == 2
    assert [status_of(db, r) for r in (due_manual, due_stripe, too_recent, connect)] == [
        COMPLETED, COMPLETED, PAID, PAID]
    assert db.get(Transaction, due_manual.id).completedAt is not None
    assert completion.complete_transactions(session_scope, hold_days=7) == 0


def test_a_refund_or_an_open_dispute_holds_completion_and_a_lost_one_is_a_refund(db):
    refunded = paid_transaction(db)
    db.execute(text("INSERT INTO marketplace_worker.transaction_refunds (transaction_id, refunded_cents)"
                    " VALUES (:id, 100)"), {"id": refunded.id})
    db.commit()
    holds = {}
    for status in ("needs_response", "under_review", "lost", "won", "warning_closed"):
        row = paid_transaction(db, stripeChargeId=f"ch_dp_{status}")
        deliver(db, se.event("charge.dispute.created",
                             se.dispute(charge=f"ch_dp_{status}", amount=10_000, status=status)))
        holds[status] = row
    completion.complete_transactions(session_scope, hold_days=7)
    assert status_of(db, refunded) == PAID
    assert {s: status_of(db, r) for s, r in holds.items()} == {
        "needs_response": PAID, "under_review": PAID, "lost": REFUNDED, "won": COMPLETED,
        "warning_closed": COMPLETED}


def test_a_payment_not_yet_linked_to_its_charge_does_not_complete(db, stripe_api):
    invoice, timeline = paid_unlinked(db, stripe_api, 1, refunded=True)
    deliver(db, *[e for e in timeline if not e["type"].startswith(("charge.", "refund."))])
    poll(stripe=False)  # puts it on the list; no Stripe read
    row = transactions_of(db, invoice)[0]
    row.paidAt = utcnow() - timedelta(days=30)
    db.commit()
    assert completion.complete_transactions(session_scope, hold_days=7) == 0
    deliver(db, *timeline)  # the refund is recorded; the read links it
    poll()
    assert status_of(db, row) == REFUNDED


def test_a_dispute_opened_then_won_releases_the_transaction(db):
    row = paid_transaction(db, stripeChargeId="ch_dispute_won1")
    dispute = se.dispute(id="dp_won00000001", charge="ch_dispute_won1", amount=10_000)
    deliver(db, se.event("charge.dispute.created", dispute, created=1_790_000_000))
    completion.complete_transactions(session_scope, hold_days=7)
    assert status_of(db, row) == PAID
    deliver(db, se.event("charge.dispute.closed", dict(dispute, status="won"), created=1_790_000_000 + 60 * DAY))
    completion.complete_transactions(session_scope, hold_days=7)
    assert status_of(db, row) == COMPLETED


# --- one transaction per invoice, under concurrency -------------------------------------------


def test_webhooks_and_the_poller_racing_on_one_invoice_create_one_transaction(db):
    settings = get_settings().model_copy(update={"poll_overlap_seconds": 0})
    provider = factories.provider(db, payment_mode="stripe")
    db.commit()
    rounds = 40
    for n in range(rounds):
        invoice = factories.invoice(db, provider, status="open", stripeInvoiceId=f"in_race{n:06d}")
        db.commit()
        ids = {"id": invoice.stripeInvoiceId, "app_invoice_id": str(invoice.id), "created": 1_790_000_000}
        events = [se.event("invoice.finalized", se.invoice(status="open", **ids), created=1_790_000_000),
                  se.event("invoice.paid", se.invoice(status="paid", **ids), created=1_790_000_100)]
        store(db, *events)
        barrier = threading.Barrier(3)
        errors = []

        def go(fn):
            try:
                barrier.wait()
                fn()
            except Exception as error:  # surfaced below
                errors.append(error)

        threads = [threading.Thread(target=go, args=(lambda e=e: run(e["id"]),)) for e in events]
        threads.append(threading.Thread(target=go, args=(
            lambda: polling.sync_changed_invoices(session_scope, settings, polling.PollResult()),)))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert [event_status(db, e["id"])[0] for e in events] == ["processed", "processed"]
    counts = db.execute(text(
        'SELECT count(*) FROM marketplace.transactions GROUP BY "invoiceId"')).scalars().all()
    assert counts == [1] * rounds
    statuses = db.execute(text("SELECT DISTINCT status FROM marketplace.transactions")).scalars().all()
    assert statuses == [PAID]


def test_batches_sharing_invoices_in_opposite_orders_neither_deadlock_nor_lose_an_update(db):
    """Each message's events share one transaction: one batch takes invoice A then B's charge,
    the other B then A's charge. Whichever waits too long goes one event at a time."""
    provider = factories.provider(db, payment_mode="stripe")
    db.commit()
    t0, invoices = 1_790_000_000, []
    for name in ("a", "b"):
        invoice = factories.invoice(db, provider, status="open", stripeInvoiceId=f"in_opposite_{name}")
        db.commit()
        ids = {"id": invoice.stripeInvoiceId, "app_invoice_id": str(invoice.id), "shape": "legacy",
               "charge": f"ch_opposite_{name}", "payment_intent": f"pi_opposite_{name}"}
        deliver(db, se.event("invoice.paid", se.invoice(status="paid", created=t0, **ids), created=t0))
        invoices.append((invoice, ids))
    rounds = 10
    for n in range(1, rounds + 1):
        events = {}
        for invoice, ids in invoices:
            events[invoice.id] = (
                se.event("invoice.updated", se.invoice(status="paid", created=t0, **ids), created=t0 + n),
                se.event("charge.refunded", se.charge(
                    id=ids["charge"], amount=10_000, payment_intent=ids["payment_intent"], created=t0,
                    amount_refunded=100 * n), created=t0 + n),
            )
        (a_invoice, a_charge), (b_invoice, b_charge) = events.values()
        store(db, a_invoice, a_charge, b_invoice, b_charge)
        batches = [[a_invoice["id"], b_charge["id"]], [b_invoice["id"], a_charge["id"]]]
        barrier, outcomes, errors = threading.Barrier(2), {}, []

        def go(batch):
            try:
                barrier.wait()
                outcomes.update(run_batch(batch))
            except Exception as error:  # surfaced below
                errors.append(error)

        threads = [threading.Thread(target=go, args=(batch,)) for batch in batches]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert errors == [] and not any(t.is_alive() for t in threads)
        assert set(outcomes.values()) == {"processed"}, outcomes
    refunded = db.execute(text(
        'SELECT t."invoiceId", t.status, r.refunded_cents FROM marketplace.transactions t'
        " JOIN marketplace_worker.transaction_refunds r ON r.transaction_id = t.id ORDER BY 1")).all()
    assert [tuple(row) for row in refunded] == [(invoice.id, PAID, 100 * rounds) for invoice, _ in invoices]


def _waiting_on(db, lock: str) -> int:
    """Sessions of this database waiting for a lock of this kind (`transactionid`: a row's)."""
    db.rollback()
    return db.execute(text(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND wait_event_type = 'Lock' AND wait_event = :lock"), {"lock": lock}).scalar()


def test_a_charge_recorded_while_its_invoice_is_being_linked_to_its_payment_is_linked_too(db):
    """The per-payment lock (domain/payments.py): an `invoice_payment.paid` links the invoice to
    its PaymentIntent and is held up before it commits; meanwhile that PaymentIntent's charge
    arrives and finds no invoice linked yet. It waits for the linker's payment lock, then finds
    the invoice and links its charge too: neither misses the other."""
    provider = factories.provider(db, payment_mode="stripe")
    invoice = factories.invoice(db, provider, amount_cents=10_000, status="open", stripe=False)
    db.commit()
    deliver(db, se.event("invoice.paid", se.invoice(status="paid", id="in_racelink0001", app_invoice_id=str(invoice.id),
                                                      amount=10_000), created=1_790_000_000))
    linking = se.event("invoice_payment.paid", se.invoice_payment(
        invoice="in_racelink0001", amount=10_000, payment_intent="pi_racelink0001"), created=1_790_000_100)
    charge = se.event("charge.refunded", se.charge(id="ch_racelink0001", payment_intent="pi_racelink0001",
                                                   amount=10_000, amount_refunded=2_500), created=1_790_000_200)
    store(db, linking, charge)
    holder = make_session()  # holds the transaction row: the linker stops there, its link not committed
    holder.execute(select(Transaction).where(Transaction.invoiceId == invoice.id).with_for_update())
    outcomes = {}
    threads = {event["id"]: threading.Thread(target=lambda e=event: outcomes.update({e["id"]: run(e["id"])}))
               for event in (linking, charge)}
    threads[linking["id"]].start()
    wait_for(lambda: _waiting_on(db, "transactionid"), message="the linker held up")
    threads[charge["id"]].start()
    wait_for(lambda: _waiting_on(db, "advisory") or charge["id"] in outcomes, message="the charge's recorder")
    holder.rollback()
    holder.close()
    for thread in threads.values():
        thread.join(30)
    assert outcomes == {linking["id"]: "processed", charge["id"]: "processed"}
    state = ledger_state(db, invoice.id)
    assert state["invoice"][0][5:] == ("ch_racelink0001", "pi_racelink0001")
    assert state["transactions"][0][::7] == (PAID, 2_500)


def test_a_batch_leaves_the_event_whose_invoice_is_held_and_applies_it_once_free(db):
    provider = factories.provider(db, payment_mode="stripe")
    db.commit()
    held, free = (factories.invoice(db, provider, status="open", stripeInvoiceId=f"in_held_{n}") for n in (1, 2))
    db.commit()
    events = [se.event("invoice.paid", se.invoice(status="paid", id=i.stripeInvoiceId, app_invoice_id=str(i.id)),
                       created=1_790_000_000) for i in (held, free)]
    store(db, *events)
    holder = make_session()  # another worker's transaction, still open
    holder.execute(select(Invoice).where(Invoice.id == held.id).with_for_update())
    outcomes = {}
    batch = threading.Thread(target=lambda: outcomes.update(run_batch([e["id"] for e in events])))
    batch.start()
    # The batch committed the free invoice's event without waiting for the held one...
    wait_for(lambda: event_status(db, events[1]["id"])[0] == "processed", message="the free event")
    assert event_status(db, events[0]["id"])[0] == "received" and batch.is_alive()
    holder.rollback()
    holder.close()
    batch.join(30)
    # ...which it applied alone once the invoice was free.
    assert outcomes == {events[0]["id"]: "processed", events[1]["id"]: "processed"}
    assert [t.status for t in transactions_of(db, held)] == [PAID]


# --- through the real worker ------------------------------------------------------------------


@pytest.mark.flow
def test_stripe_events_processed_by_the_worker_create_and_pay_the_transaction(celery_worker, db):
    from tasks.events import process_event

    provider = factories.provider(db, payment_mode="stripe")
    invoice = factories.invoice(db, provider, stripe=False, status="draft", amount_cents=12_345)
    db.commit()
    timeline = se.invoice_lifecycle(str(invoice.id), 12_345, shape="legacy", outcome="paid_partial_refund")
    for event_id in store(db, *timeline):
        process_event.delay(event_id)

    def settled():
        state = ledger_state(db, invoice.id)
        return state if state["transactions"] and state["transactions"][0][7] == 6_172 else None

    state = wait_for(settled, message="partial refund recorded")
    assert state["transactions"][0][:4] == (PAID, 12_345, 617, 11_728)
    assert state["invoice"][0][0] == "paid"


@pytest.mark.flow
def test_current_version_payments_reach_refunded_or_paid_through_failing_reads_one_a_run(celery_worker, db,
                                                                                        stripe_api):
    """Current-version webhooks (no `payments`, no `charge.invoice`), their invoice_payment.paid and
    charge.succeeded deliveries lost: every link comes from a poller read, one invoice a run, the
    first reads rate limited or failing. Every fully refunded invoice ends refunded, every other
    paid, with nothing done by hand."""
    from tasks.events import process_event

    invoices = []
    for n in range(20):
        provider = factories.provider(db, payment_mode="stripe")
        invoice = factories.invoice(db, provider, stripe=False, status="draft")
        db.commit()
        timeline = se.invoice_lifecycle(str(invoice.id), 10_000, start=1_790_000_000 + n * HOUR,
                                        outcome="paid_full_refund" if n % 3 == 0 else "paid")
        assert timeline[0]["api_version"] == se.CURRENT_API_VERSION
        for event in timeline:
            obj = event["data"]["object"]
            assert "payments" not in obj and "invoice" not in obj if obj["object"] == "charge" else True
            assert "payments" not in obj
        se.publish(stripe_api, timeline)
        delivered = [e for e in timeline if e["type"] not in ("invoice_payment.paid", "charge.succeeded")]
        for event_id in store(db, *delivered):
            process_event.delay(event_id)
        invoices.append((invoice, n % 3 == 0))
    wait_for(lambda: all(ledger_state(db, i.id)["transactions"][0][0] == PAID
                         if ledger_state(db, i.id)["transactions"] else False for i, _ in invoices),
             message="every invoice paid by its webhooks")
    assert all(ledger_state(db, i.id)["transactions"][0][7] is None for i, _ in invoices)  # no link yet

    stripe_api.fail_next(429, count=4, path_prefix="/v1/invoices/")
    stripe_api.fail_next(500, count=4, path_prefix="/v1/")

    def settled():
        poll(poll_stripe_reads_per_run=1, poll_link_retry_base_seconds=1)
        states = [ledger_state(db, i.id)["transactions"][0] for i, _ in invoices]
        return not reads(db) and all((s[0], s[7]) == ((REFUNDED, 10_000) if refunded else (PAID, None))
                                     for s, (_, refunded) in zip(states, invoices))
    wait_for(settled, timeout=180, message="every refunded invoice refunded, every other paid")
    assert all(ledger_state(db, i.id)["invoice"][0][5] is not None for i, _ in invoices)  # every charge known


@pytest.mark.flow
def test_the_worker_pays_after_uncollectible_refunds_a_lost_dispute_and_follows_an_edited_amount(celery_worker, db):
    from tasks.events import process_event
    from tasks.polling import poll_invoices

    def invoice_of(amount: int, status: str = "draft") -> Invoice:
        row = factories.invoice(db, factories.provider(db, payment_mode="stripe"), stripe=False, status=status,
                                amount_cents=amount)
        db.commit()
        return row

    collected, disputed, edited = invoice_of(10_000), invoice_of(10_000), invoice_of(10_000, "open")
    uncollectible = se.invoice_lifecycle(str(collected.id), 10_000, outcome="uncollectible")
    paid_at = uncollectible[-1]["created"] + DAY
    late_payment = se.event("invoice.paid", dict(
        uncollectible[-1]["data"]["object"], status="paid", amount_paid=10_000, amount_remaining=0,
        status_transitions={**uncollectible[-1]["data"]["object"]["status_transitions"], "paid_at": paid_at}),
        created=paid_at)
    lost = se.invoice_lifecycle(str(disputed.id), 10_000, outcome="paid_disputed", dispute_outcome="lost")
    for event_id in store(db, *uncollectible, late_payment, *lost):
        process_event.delay(event_id)
    edited.amountCents, edited.updatedAt = 12_000, utcnow()  # the app edits its open invoice
    db.commit()
    poll_invoices.delay()

    def settled():
        rows = [ledger_state(db, i.id)["transactions"] for i in (collected, disputed, edited)]
        return rows if all(rows) and [r[0][0] for r in rows] == [PAID, REFUNDED, INVOICED] else None

    collected_row, disputed_row, edited_row = wait_for(settled, message="uncollectible paid, dispute lost, amount")
    assert collected_row[0][5] == from_unix(paid_at)
    assert disputed_row[0][7] == 10_000
    assert edited_row[0][1:4] == (12_000, 600, 11_400)


@pytest.mark.flow
def test_the_poll_task_runs_on_the_worker(celery_worker, db):
    from tasks.polling import poll_invoices

    invoice = manual_invoice(db, status="paid", paidAt=utcnow())
    poll_invoices.delay()
    rows = wait_for(lambda: transactions_of(db, invoice), message="transaction created by the poll task")
    assert rows[0].status == PAID


def test_the_poll_command_prints_its_counts(db):
    manual_invoice(db, status="open")
    manual_invoice(db, clientUserId=None)
    done = subprocess.run([sys.executable, "-m", "worker.cli", "poll"], capture_output=True, text=True,
                          timeout=120, env=os.environ)
    assert done.returncode == 0, done.stderr
    assert "created 1, advanced 1, refreshed from Stripe 0, skipped 1 (missing_client 1)" in done.stdout


def test_the_invoice_to_transaction_key_is_unique_in_the_database(db):
    invoice = manual_invoice(db, status="open")
    poll(stripe=False)
    [row] = transactions_of(db, invoice)
    with pytest.raises(IntegrityError, match="pk_invoice_transactions"):
        db.execute(text("INSERT INTO marketplace_worker.invoice_transactions VALUES (:i, :t)"),
                   {"i": invoice.id, "t": row.id + 1000})
