"""The marketplace transaction ledger: one `marketplace.transactions` row per marketplace
invoice, created by the first event or poll that sees the invoice, advanced from what Stripe
and the app say about it (`InvoiceFacts`), and carrying the refunded cents of its payment
(SPEC §3).

Callers hold the `"Invoice"` row (FOR UPDATE) and come here for its transaction row: the lock
order of every money writer (domain/payments.py). Under the invoice lock, a transaction is
looked up and created only when absent, which is what keeps it to one row per invoice; the
transactions table has no unique key (nor index) on "invoiceId", so the worker keeps its own
in `invoice_transactions` (models/ledger.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import or_, select, text
from sqlalchemy.orm import Session

from config import get_settings
from domain import lifecycle
from domain.clock import utcnow
from domain.stats_touch import touch_providers
from models import Invoice, InvoiceTransaction, ServiceListing, Transaction

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InvoiceFacts:
    """What one look at an invoice (a Stripe snapshot, or the app's row) says."""

    target: str
    invoiced_at: datetime | None
    paid_at: datetime | None
    at: datetime  # when this was true: the event's time, else now; the fallback timestamp
    voided: bool = False  # a void invoice can never be paid


@dataclass
class Outcome:
    """What applying one fact did to an invoice's transaction (counted by the poller and the
    backfill; `touched` marks its provider for the stats)."""

    created: bool = False
    advanced: bool = False
    refunds_changed: bool = False
    skipped: str | None = None
    provider_id: int | None = None

    @property
    def touched(self) -> bool:
        return self.created or self.advanced or self.refunds_changed


# --- creation ----------------------------------------------------------------------------


def platform_fee_cents(total_cents: int, fee_bps: int) -> int:
    """`total * bps / 10000` rounded half up (half away from zero), in integers only."""
    magnitude = (abs(total_cents) * fee_bps + 5_000) // 10_000
    return magnitude if total_cents >= 0 else -magnitude


def skip_reason(invoice: Invoice) -> str | None:
    """Why an invoice gets no transaction, or None when it gets one."""
    if not invoice.isMarketplaceInvoice:
        return "not_marketplace"
    if invoice.deletedAt is not None:
        return "deleted"
    if invoice.clientUserId is None:
        return "missing_client"
    if invoice.marketplaceProviderId is None:
        return "missing_provider"
    return None


def transaction_for(session: Session, invoice: Invoice) -> Transaction | None:
    """The invoice's transaction, locked. Call with the invoice row locked.

    By the worker's own key first; a row the app created is found through the app's
    ("tenantId", "invoiceId") index and adopted."""
    row = session.execute(
        select(Transaction)
        .join(InvoiceTransaction, InvoiceTransaction.transaction_id == Transaction.id)
        .where(InvoiceTransaction.invoice_id == invoice.id)
        .with_for_update(of=Transaction)
    ).scalar_one_or_none()
    if row is not None:
        return row
    row = session.execute(
        select(Transaction)
        .where(
            Transaction.invoiceId == invoice.id,
            or_(Transaction.tenantId == invoice.tenantId, Transaction.tenantId.is_(None)),
        )
        .order_by(Transaction.id)
        .limit(1)
        .with_for_update()
    ).scalar_one_or_none()
    if row is not None:
        session.add(InvoiceTransaction(invoice_id=invoice.id, transaction_id=row.id))
    return row


def transactions_for(session: Session, invoices: list[Invoice]) -> dict[int, Transaction]:
    """`transaction_for` for a batch of locked invoices, in two statements."""
    by_key = dict(session.execute(
        select(InvoiceTransaction.invoice_id, Transaction)
        .join(Transaction, InvoiceTransaction.transaction_id == Transaction.id)
        .where(InvoiceTransaction.invoice_id.in_([i.id for i in invoices]))
        .order_by(Transaction.id)
        .with_for_update(of=Transaction)
    ).all())
    missing = {i.id: i for i in invoices if i.id not in by_key}
    if missing:
        tenants = {i.tenantId for i in missing.values() if i.tenantId is not None}
        for row in session.execute(
            select(Transaction)
            .where(
                Transaction.invoiceId.in_(list(missing)),
                or_(Transaction.tenantId.in_(tenants), Transaction.tenantId.is_(None)),
            )
            .order_by(Transaction.id)
            .with_for_update()
        ).scalars():
            invoice = missing[row.invoiceId]
            if row.invoiceId not in by_key and row.tenantId in (None, invoice.tenantId):
                by_key[row.invoiceId] = row
                session.add(InvoiceTransaction(invoice_id=row.invoiceId, transaction_id=row.id))
    return by_key


def _create(session: Session, invoice: Invoice) -> Transaction:
    total = invoice.amountCents
    fee = platform_fee_cents(total, get_settings().platform_fee_bps)
    row = Transaction(
        clientUserId=invoice.clientUserId,
        providerId=invoice.marketplaceProviderId,
        listingId=invoice.marketplaceListingId,
        invoiceType=invoice.marketplaceInvoiceType or "service",
        tenantId=invoice.tenantId,
        invoiceId=invoice.id,
        serviceDescription=invoice.description or _listing_title(session, invoice)
        or f"Invoice {invoice.invoiceNumber}",
        totalCents=total,
        platformFeeCents=fee,
        providerPayoutCents=total - fee,
        status=lifecycle.PENDING_INVOICE,
        createdAt=utcnow(),
    )
    session.add(InvoiceTransaction(invoice_id=invoice.id, transaction=row))
    log.info("transaction created for invoice %s", invoice.id, extra={"invoice_id": invoice.id})
    return row


def _listing_title(session: Session, invoice: Invoice) -> str | None:
    if invoice.marketplaceListingId is None:
        return None
    return session.execute(
        select(ServiceListing.title).where(ServiceListing.id == invoice.marketplaceListingId)
    ).scalar_one_or_none()


# --- advancing ---------------------------------------------------------------------------


def sync_invoice(
    session: Session,
    invoice: Invoice,
    facts: InvoiceFacts,
    *,
    refresh_refunds: bool,
    known: dict[int, Transaction] | None = None,
) -> Outcome:
    """Create the invoice's transaction if it has none and may have one, then merge `facts`
    into it. The caller holds the invoice row lock; `known`, the result of `transactions_for`
    when the caller already looked its invoices' transactions up, spares the lookup (and
    receives the transaction created here)."""
    outcome = Outcome()
    row = transaction_for(session, invoice) if known is None else known.get(invoice.id)
    if row is None:
        reason = skip_reason(invoice)
        if reason is not None:
            log.warning(
                "invoice %s gets no transaction: %s", invoice.id, reason,
                extra={"invoice_id": invoice.id, "reason": reason},
            )
            outcome.skipped = reason
            return outcome
        row = _create(session, invoice)
        outcome.created = True
        if known is not None:
            known[invoice.id] = row
    outcome.provider_id = row.providerId
    if row.status not in lifecycle.PAID_STATES:
        _follow_amount(row, invoice)
    outcome.advanced = _merge(row, facts, invoice)
    if outcome.created or refresh_refunds or (outcome.advanced and row.status in lifecycle.PAID_STATES):
        outcome.refunds_changed = apply_refunds(session, invoice, row)
    return outcome


def _follow_amount(row: Transaction, invoice: Invoice) -> None:
    """Until it is paid, a transaction's amounts are the invoice's: the app may edit a draft or
    open invoice. From payment on they are what was paid (the caller stops calling)."""
    if row.totalCents == invoice.amountCents:
        return
    fee = platform_fee_cents(invoice.amountCents, get_settings().platform_fee_bps)
    log.info("invoice %s amount changed from %s to %s; transaction %s follows", invoice.id, row.totalCents,
             invoice.amountCents, row.id, extra={"invoice_id": invoice.id})
    row.totalCents, row.platformFeeCents, row.providerPayoutCents = (
        invoice.amountCents, fee, invoice.amountCents - fee)


def _merge(row: Transaction, facts: InvoiceFacts, invoice: Invoice) -> bool:
    invoice_id = invoice.id
    before = row.status
    voided = facts.voided or invoice.voidedAt is not None
    row.status = lifecycle.merge(before, facts.target, voided=voided)
    if row.status == lifecycle.PAID and before == lifecycle.CANCELLED:
        log.warning("invoice %s was paid after it was marked uncollectible; transaction paid", invoice_id,
                    extra={"invoice_id": invoice_id})
    if row.status == before and facts.target != before:
        if before == lifecycle.CANCELLED and facts.target == lifecycle.PAID:
            log.warning(
                "invoice %s shows a payment but it was voided; transaction left cancelled", invoice_id,
                extra={"invoice_id": invoice_id},
            )
        elif facts.target == lifecycle.CANCELLED and before in lifecycle.PAID_STATES:
            log.warning(
                "invoice %s was voided or marked uncollectible after payment; transaction left %s",
                invoice_id, before, extra={"invoice_id": invoice_id},
            )
        else:
            log.debug("invoice %s: %s after %s changes nothing", invoice_id, facts.target, before)
    # Set once: later facts never rewrite when it was invoiced or paid.
    if row.invoicedAt is None and (row.status in lifecycle.INVOICED_STATES or facts.invoiced_at):
        row.invoicedAt = facts.invoiced_at or facts.at
    if row.paidAt is None and row.status in lifecycle.PAID_STATES:
        row.paidAt = facts.paid_at or facts.at
    return row.status != before


# Refunded cents of an invoice's payment: per charge, the cumulative `amount_refunded` of its
# newest snapshot when that snapshot is the newest word on its refunds (no refund of it changed
# since: a refund that failed afterwards is no longer in it), else the sum of its counted
# refunds; plus every lost dispute's amount (the money went back; a lost dispute leaves
# `amount_refunded` as it was). Which is newer is read from the objects' versions
# (domain/versions.py), so the answer does not depend on the order events arrive in; each by
# its own key (a subquery per row, not a join: a plan cached while the versions table was
# small would scan all of it for every payment).
# Written to the transaction's refund row in the same statement (none when nothing is
# refunded); `changed` says whether that row changed.
_APPLY_REFUNDS_SQL = text(
    """
    WITH charges AS (
        SELECT c.charge_id, c.amount_refunded, c.refunded,
               (SELECT v.event_created FROM marketplace_worker.stripe_object_versions v
                WHERE v.object_id = c.charge_id) AS seen
        FROM marketplace_worker.stripe_charges c
        WHERE c.charge_id = :charge_id OR c.payment_intent_id = :payment_intent_id
    ), refunds AS (
        SELECT coalesce(r.charge_id, r.payment_intent_id) AS charge_key,
               coalesce(sum(r.amount) FILTER (WHERE r.status IN ('succeeded', 'pending')), 0) AS counted,
               max((SELECT v.event_created FROM marketplace_worker.stripe_object_versions v
                    WHERE v.object_id = r.refund_id)) AS newest
        FROM marketplace_worker.stripe_refunds r
        WHERE r.charge_id = :charge_id OR r.payment_intent_id = :payment_intent_id
        GROUP BY 1
    ), lost AS (
        SELECT coalesce(sum(amount), 0) AS cents FROM marketplace_worker.stripe_disputes
        WHERE (charge_id = :charge_id OR payment_intent_id = :payment_intent_id) AND status = 'lost'
    ), per_charge AS (
        SELECT c.charge_id IS NOT NULL AND coalesce(c.seen >= r.newest, true) AS charge_is_newest,
               c.amount_refunded, c.refunded, r.counted
        FROM charges c FULL JOIN refunds r ON r.charge_key = c.charge_id
    ), total AS (
        SELECT coalesce(sum(CASE WHEN charge_is_newest THEN amount_refunded ELSE counted END), 0)
                   + (SELECT cents FROM lost) AS refunded_cents,
               coalesce(bool_or(charge_is_newest AND refunded), false) AS fully_refunded
        FROM per_charge
    ), set_row AS (
        INSERT INTO marketplace_worker.transaction_refunds AS t (transaction_id, refunded_cents, updated_at)
        SELECT CAST(:transaction_id AS bigint), refunded_cents, now() FROM total WHERE refunded_cents <> 0
        ON CONFLICT (transaction_id) DO UPDATE
            SET refunded_cents = excluded.refunded_cents, updated_at = now()
            WHERE t.refunded_cents <> excluded.refunded_cents
        RETURNING 1
    ), cleared_row AS (
        DELETE FROM marketplace_worker.transaction_refunds
        WHERE transaction_id = :transaction_id AND (SELECT refunded_cents FROM total) = 0
        RETURNING 1
    )
    SELECT refunded_cents, fully_refunded,
           EXISTS (SELECT 1 FROM set_row) OR EXISTS (SELECT 1 FROM cleared_row) AS changed
    FROM total
    """
)


def apply_refunds(session: Session, invoice: Invoice, row: Transaction) -> bool:
    """Bring the transaction's refunded cents (refunds and lost disputes) and a full refund's
    status up to date."""
    if invoice.stripeChargeId is None and invoice.stripePaymentIntentId is None:
        return False  # no payment linked, so no refund either (links are never removed)
    if row.id is None:  # created by this call: its id keys the refund row
        session.flush()
    refunded, fully, changed = session.execute(_APPLY_REFUNDS_SQL, {
        "charge_id": invoice.stripeChargeId, "payment_intent_id": invoice.stripePaymentIntentId,
        "transaction_id": row.id,
    }).one()
    if refunded > 0 and (fully or refunded >= row.totalCents):
        before = row.status
        row.status = lifecycle.merge(before, lifecycle.REFUNDED)
        changed = changed or row.status != before
    return changed


def touch(session: Session, outcomes: list[Outcome]) -> None:
    """Mark the providers whose transactions changed, for the stats pass."""
    touch_providers(session, [o.provider_id for o in outcomes if o.touched])
