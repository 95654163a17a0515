"""Marketplace transactions: created once per marketplace invoice, advanced from what Stripe
and the app say about the invoice and its payment (SPEC §3).

Every writer here follows the lock order documented in domain/dispatch.py: the `"Invoice"`
row first (FOR UPDATE), then its transaction row, then the worker's per-object rows. Under
the invoice lock, a transaction is looked up and created only when absent, which is what
keeps it to one row per invoice; the transactions table has no unique key (nor index) on
"invoiceId", so the worker keeps its own in `invoice_transactions` (models/ledger.py).

Charges, refunds and disputes are recorded as facts keyed by Stripe id even when no invoice
is linked to their payment yet; whoever links an invoice to a charge or PaymentIntent later
recomputes its refunds. A per-payment advisory lock closes the race between the two:

    linker:   invoice lock -> sets stripeChargeId/PaymentIntentId -> payment lock -> reads facts
    recorder: finds no invoice -> payment lock -> looks again -> records the fact

so either the recorder sees the committed link, or the linker reads the committed fact.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import or_, select, text
from sqlalchemy.orm import Session

from config import get_settings
from domain import lifecycle, versions
from domain.clock import from_unix, utcnow
from domain.errors import InvalidPayload, NotYetKnown
from domain.stats_touch import touch_providers
from models import Invoice, InvoiceTransaction, ServiceListing, StripeCharge, Transaction

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
    ).tuples().all())
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
        outcome.refunds_changed = _apply_refunds(session, invoice, row)
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
# newest snapshot when one was seen, else the sum of its counted refunds; plus every lost
# dispute's amount (the money went back; a lost dispute leaves `amount_refunded` as it was).
_REFUNDED_SQL = text(
    """
    WITH charges AS (
        SELECT charge_id, amount_refunded, refunded FROM marketplace_worker.stripe_charges
        WHERE charge_id = :charge_id OR payment_intent_id = :payment_intent_id
    ), refunds AS (
        SELECT coalesce(charge_id, payment_intent_id) AS charge_key,
               coalesce(sum(amount) FILTER (WHERE status IN ('succeeded', 'pending')), 0) AS counted
        FROM marketplace_worker.stripe_refunds
        WHERE charge_id = :charge_id OR payment_intent_id = :payment_intent_id
        GROUP BY 1
    ), lost AS (
        SELECT coalesce(sum(amount), 0) AS cents FROM marketplace_worker.stripe_disputes
        WHERE (charge_id = :charge_id OR payment_intent_id = :payment_intent_id) AND status = 'lost'
    )
    SELECT coalesce(sum(coalesce(c.amount_refunded, r.counted)), 0) + (SELECT cents FROM lost) AS refunded_cents,
           coalesce(bool_or(c.refunded), false) AS fully_refunded
    FROM charges c FULL JOIN refunds r ON r.charge_key = c.charge_id
    """
)

_SET_REFUND = text(
    """
    INSERT INTO marketplace_worker.transaction_refunds AS t (transaction_id, refunded_cents, updated_at)
    VALUES (:transaction_id, :refunded_cents, now())
    ON CONFLICT (transaction_id) DO UPDATE
        SET refunded_cents = excluded.refunded_cents, updated_at = now()
        WHERE t.refunded_cents <> excluded.refunded_cents
    RETURNING 1
    """
)

_CLEAR_REFUND = text(
    "DELETE FROM marketplace_worker.transaction_refunds WHERE transaction_id = :transaction_id RETURNING 1"
)


def _apply_refunds(session: Session, invoice: Invoice, row: Transaction) -> bool:
    """Bring the transaction's refunded cents (refunds and lost disputes) and a full refund's
    status up to date."""
    if invoice.stripeChargeId is None and invoice.stripePaymentIntentId is None:
        return False  # no payment linked, so no refund either (links are never removed)
    if row.id is None:
        session.flush([row])
    refunded, fully = session.execute(
        _REFUNDED_SQL,
        {"charge_id": invoice.stripeChargeId, "payment_intent_id": invoice.stripePaymentIntentId},
    ).one()
    params = {"transaction_id": row.id, "refunded_cents": refunded}
    changed = session.execute(_SET_REFUND if refunded else _CLEAR_REFUND, params).first() is not None
    if refunded > 0 and (fully or refunded >= row.totalCents):
        before = row.status
        row.status = lifecycle.merge(before, lifecycle.REFUNDED)
        changed = changed or row.status != before
    return changed


def touch(session: Session, outcomes: list[Outcome]) -> None:
    touch_providers(session, [o.provider_id for o in outcomes if o.touched])


# --- Stripe invoices -----------------------------------------------------------------------


def facts_from_stripe(obj: dict[str, Any], created: int) -> InvoiceFacts:
    transitions = obj.get("status_transitions") or {}
    if not isinstance(transitions, dict):
        raise InvalidPayload("invoice status_transitions is not an object")
    times = {name: _unix(transitions.get(name), f"status_transitions.{name}") for name in
             ("finalized_at", "paid_at", "voided_at", "marked_uncollectible_at")}
    return InvoiceFacts(
        target=lifecycle.target_from_invoice(
            obj.get("status"),
            finalized_at=times["finalized_at"],
            paid_at=times["paid_at"],
            voided_at=times["voided_at"],
            uncollectible_at=times["marked_uncollectible_at"],
        ),
        invoiced_at=from_unix(times["finalized_at"]),
        paid_at=from_unix(times["paid_at"]),
        at=from_unix(created),
        voided=times["voided_at"] is not None or obj.get("status") == "void",
    )


def facts_from_app(invoice: Invoice, now: datetime) -> InvoiceFacts:
    """What the app's own invoice row says (manual payments: the app marks it paid)."""
    return InvoiceFacts(
        target=lifecycle.target_from_invoice(
            invoice.status, finalized_at=invoice.issuedAt, paid_at=invoice.paidAt, voided_at=invoice.voidedAt
        ),
        invoiced_at=invoice.issuedAt,
        paid_at=invoice.paidAt,
        at=now,
        voided=invoice.voidedAt is not None or invoice.status == "void",
    )


@dataclass(frozen=True)
class Snapshot:
    """A Stripe invoice as one event (or one API read, `created` being the read time) saw it."""

    obj: dict[str, Any]
    created: int
    event_id: str


# A snapshot left alone because another transaction holds its invoice (with `skip_busy`).
BUSY = "busy"


def apply_invoice_snapshots(session: Session, snapshots: list[Snapshot], *, skip_busy: bool = False) -> list[Outcome]:
    """Apply Stripe invoice snapshots (webhooks', or reads from the API), in order: mirror each
    onto the app's invoice if it is the newest seen, and advance the transaction.

    However many snapshots, their invoices are locked in one statement, in id order, and their
    transactions looked up in two: what lets a batch of events cost little more per event
    than its own changes. With `skip_busy`, a snapshot whose invoice another transaction holds
    is not waited for: its outcome is skipped as BUSY, for the caller to apply later."""
    checked = [(snapshot, _stripe_id(snapshot.obj), facts_from_stripe(snapshot.obj, snapshot.created))
               for snapshot in snapshots]
    invoices = _lock_invoices_for_snapshots(
        session, [(stripe_id, snapshot.obj) for snapshot, stripe_id, _ in checked], skip_busy=skip_busy)
    known = transactions_for(
        session, [i for i in dict.fromkeys(invoices) if isinstance(i, Invoice) and i.isMarketplaceInvoice])
    outcomes = []
    for (snapshot, stripe_id, facts), invoice in zip(checked, invoices):
        if invoice == BUSY:
            outcomes.append(Outcome(skipped=BUSY))
            continue
        if invoice is None:
            log.info("Stripe invoice %s is not one of the app's invoices; ignored", stripe_id)
            outcomes.append(Outcome(skipped="unknown_invoice"))
            continue
        if not invoice.isMarketplaceInvoice:
            outcomes.append(Outcome(skipped="not_marketplace"))
            continue
        linked = _mirror(session, invoice, snapshot.obj, snapshot.created, snapshot.event_id)
        outcomes.append(sync_invoice(session, invoice, facts, refresh_refunds=linked, known=known))
    touch(session, outcomes)
    return outcomes


def _stripe_id(obj: dict[str, Any]) -> str:
    stripe_id = obj.get("id")
    if not isinstance(stripe_id, str) or not stripe_id:
        raise InvalidPayload("invoice without an id")
    return stripe_id


def _app_invoice_id(stripe_id: str, obj: dict[str, Any]) -> int | None:
    """The app's invoice id in the metadata: the app puts it on every invoice it creates in
    Stripe, so without it (and without a known stripeInvoiceId) the invoice is not the app's."""
    metadata = obj.get("metadata") or {}
    app_id = metadata.get("invoiceId") if isinstance(metadata, dict) else None
    if app_id is None:
        return None
    try:
        return int(app_id)
    except (TypeError, ValueError):
        raise InvalidPayload(f"invoice {stripe_id} metadata.invoiceId is not an id: {app_id!r}") from None


def _lock_invoices_for_snapshots(
    session: Session, wanted: list[tuple[str, dict[str, Any]]], *, skip_busy: bool
) -> list[Invoice | None | str]:
    """Each snapshot's invoice (None: not the app's; BUSY: held elsewhere, with `skip_busy`),
    found by Stripe id, else by the app id in its metadata; every candidate row locked at
    once, in id order."""
    app_ids = {stripe_id: _app_invoice_id(stripe_id, obj) for stripe_id, obj in wanted}
    candidates = or_(Invoice.stripeInvoiceId.in_(list(app_ids)),
                     Invoice.id.in_([i for i in app_ids.values() if i is not None]))
    rows = session.execute(
        select(Invoice).where(candidates).order_by(Invoice.id).with_for_update(skip_locked=skip_busy)
    ).scalars().all()
    by_stripe_id = {row.stripeInvoiceId: row for row in rows if row.stripeInvoiceId is not None}
    by_id = {row.id: row for row in rows}
    busy_stripe_ids, busy_ids = set(), set()
    if skip_busy and any(stripe_id not in by_stripe_id for stripe_id in app_ids):
        # Rows the locking read skipped exist, and another transaction holds them.
        for invoice_id, stripe_id in session.execute(select(Invoice.id, Invoice.stripeInvoiceId).where(candidates)):
            if invoice_id not in by_id:
                busy_ids.add(invoice_id)
                busy_stripe_ids.add(stripe_id)
    found = []
    for stripe_id, _ in wanted:
        invoice = by_stripe_id.get(stripe_id)
        invoice_id = app_ids[stripe_id]
        if invoice is None and (stripe_id in busy_stripe_ids or invoice_id in busy_ids):
            invoice = BUSY
        elif invoice is None and invoice_id is not None:
            invoice = by_id.get(invoice_id)
            if invoice is None:
                raise NotYetKnown(f"app invoice {invoice_id} (Stripe {stripe_id}) is not in the database yet")
            if invoice.stripeInvoiceId is not None and invoice.stripeInvoiceId != stripe_id:
                raise InvalidPayload(
                    f"app invoice {invoice_id} is linked to {invoice.stripeInvoiceId}, not {stripe_id}"
                )
        found.append(invoice)
    return found


def _lock_one(session: Session, *where) -> Invoice | None:
    return session.execute(
        select(Invoice).where(*where).order_by(Invoice.id).limit(1).with_for_update()
    ).scalar_one_or_none()


# An invoice's progress, for snapshots of one second (see domain/versions.py).
INVOICE_STATUS_RANK = {"draft": 0, "open": 1, "uncollectible": 2, "paid": 3, "void": 3}


def _mirror(session: Session, invoice: Invoice, obj: dict[str, Any], created: int, event_id: str) -> bool:
    """Copy Stripe's invoice onto the app's row when this snapshot is the newest seen; fill
    the payment ids. Returns whether the invoice got linked to a new charge or PaymentIntent."""
    stripe_id = obj["id"]
    values: dict[str, Any] = {}
    newly_known = invoice.stripeInvoiceId is None
    if newly_known:
        values["stripeInvoiceId"] = stripe_id
    rank = INVOICE_STATUS_RANK.get(obj.get("status"), 0) if isinstance(obj.get("status"), str) else 0
    if versions.advance(session, stripe_id, "invoice", created, event_id, rank):
        transitions = obj.get("status_transitions") or {}
        status, amount_paid = obj.get("status"), obj.get("amount_paid")
        if not isinstance(status, str) or isinstance(amount_paid, bool) or not isinstance(amount_paid, int):
            raise InvalidPayload(f"invoice {stripe_id} lacks status or amount_paid")
        values |= {
            "status": status,
            "amountPaidCents": amount_paid,
            "paidAt": from_unix(transitions.get("paid_at")),
            # A void is final in Stripe: no later snapshot takes it back.
            "voidedAt": from_unix(transitions.get("voided_at")) or invoice.voidedAt,
        }
    changed = {name: value for name, value in values.items() if getattr(invoice, name) != value}
    if changed:
        for name, value in changed.items():
            setattr(invoice, name, value)
        invoice.updatedAt = utcnow()
    charge_id, payment_intent_id = payment_of_invoice(obj)
    linked = link_payment(session, invoice, charge_id, payment_intent_id, created, event_id, rank)
    if newly_known:
        # An invoice_payment.paid that came before the app's invoice was known by its Stripe
        # id was recorded; the lock pairs with `apply_invoice_payment`'s second look.
        _lock_keys(session, [f"stripe-invoice:{stripe_id}"])
        for payment in session.execute(_RECORDED_PAYMENTS, {"stripe_invoice_id": stripe_id}):
            linked |= link_payment(session, invoice, payment.charge_id, payment.payment_intent_id,
                                   payment.event_created, payment.event_id, PAYMENT_LINK_RANK)
    return linked


# The rank of an `invoice_payment.paid`'s link: a paid payment, as a paid invoice's snapshot.
PAYMENT_LINK_RANK = 3

_RECORDED_PAYMENTS = text(
    """
    SELECT charge_id, payment_intent_id, event_created, event_id
    FROM marketplace_worker.stripe_invoice_payments
    WHERE stripe_invoice_id = :stripe_invoice_id AND status = 'paid'
    ORDER BY event_created, event_id
    """
)


def link_payment(
    session: Session, invoice: Invoice, charge_id: str | None, payment_intent_id: str | None,
    created: int, event_id: str, rank: int,
) -> bool:
    """Link the (locked) invoice to the charge and PaymentIntent that paid it, from whatever
    told: an invoice snapshot, an `invoice_payment.paid`, a read of Stripe's invoice payments.
    Each link follows the newest source that names one (a retried payment changes the charge).
    Returns whether a link is new; the caller then brings the refunds up to date."""
    stripe_id = invoice.stripeInvoiceId
    new_links = []
    for column, value in (("stripeChargeId", charge_id), ("stripePaymentIntentId", payment_intent_id)):
        if value and versions.advance(session, f"{stripe_id}#{column}", "invoice_link", created, event_id, rank):
            if getattr(invoice, column) != value:
                setattr(invoice, column, value)
                new_links.append(value)
    if new_links:
        invoice.updatedAt = utcnow()
        lock_payments(session, new_links)
        if invoice.stripeChargeId is None and invoice.stripePaymentIntentId is not None:
            _charge_from_facts(session, invoice)
    return bool(new_links)


def _charge_from_facts(session: Session, invoice: Invoice) -> None:
    """A basil invoice names its PaymentIntent, not the charge; a charge of that
    PaymentIntent recorded earlier fills it, as the charge's event would had it come later."""
    charge_id = session.execute(
        select(StripeCharge.charge_id)
        .where(StripeCharge.payment_intent_id == invoice.stripePaymentIntentId)
        .order_by(StripeCharge.charge_id)
        .limit(1)
    ).scalar_one_or_none()
    if charge_id is not None:
        invoice.stripeChargeId = charge_id


def payment_of_invoice(obj: dict[str, Any]) -> tuple[str | None, str | None]:
    """(charge id, PaymentIntent id) of an invoice in either shape: top-level `charge` /
    `payment_intent` before 2025-03-31.basil, `payments.data[].payment` after (only present
    when expanded). A paid payment wins over an open or canceled one."""
    charge_id, payment_intent_id = _ref(obj.get("charge")), _ref(obj.get("payment_intent"))
    payments = obj.get("payments")
    if isinstance(payments, dict) and isinstance(payments.get("data"), list):
        ranked = sorted(
            (p for p in payments["data"] if isinstance(p, dict)),
            key=lambda p: (p.get("status") != "paid", not p.get("is_default")),
        )
        for item in ranked:
            payment = item.get("payment") or {}
            charge_id = charge_id or _ref(payment.get("charge"))
            payment_intent_id = payment_intent_id or _ref(payment.get("payment_intent"))
    return charge_id, payment_intent_id


# --- charges, refunds, disputes --------------------------------------------------------------


_LOCK_KEY = text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))")


def _lock_keys(session: Session, keys: list[str]) -> None:
    for key in sorted(set(keys)):
        session.execute(_LOCK_KEY, {"key": key})


def lock_payments(session: Session, payment_ids: list[str]) -> None:
    """Serialize the recording of a payment's facts with the linking of an invoice to it."""
    _lock_keys(session, [f"stripe-payment:{payment_id}" for payment_id in payment_ids])


def _lock_invoice_for_payment(
    session: Session, charge_id: str | None, payment_intent_id: str | None, *,
    stripe_invoice_id: str | None = None, app_invoice_id: Any = None,
) -> Invoice | None:
    """The invoice a charge, refund or dispute belongs to, locked; None when none is linked.

    Looks by the invoice's charge, then its PaymentIntent, then what the charge itself names
    (its `invoice` before basil, `metadata.invoiceId`). When nothing is linked, it takes the
    payment lock and looks again, so a link committed meanwhile is not missed."""

    def find() -> Invoice | None:
        by_payment = [c for c in (
            Invoice.stripeChargeId == charge_id if charge_id else None,
            Invoice.stripePaymentIntentId == payment_intent_id if payment_intent_id else None,
        ) if c is not None]
        if by_payment:
            found = session.execute(
                select(Invoice).where(or_(*by_payment))
                .order_by((Invoice.stripeChargeId == charge_id).desc().nulls_last(), Invoice.id)
                .limit(1).with_for_update()
            ).scalar_one_or_none()
            if found is not None:
                return found
        if stripe_invoice_id:
            found = _lock_one(session, Invoice.stripeInvoiceId == stripe_invoice_id)
            if found is not None:
                return found
        if isinstance(app_invoice_id, str) and app_invoice_id.isdigit():
            return _lock_one(session, Invoice.id == int(app_invoice_id))
        return None

    invoice = find()
    if invoice is None:
        lock_payments(session, [p for p in (charge_id, payment_intent_id) if p])
        invoice = find()
    return invoice


def _link_payment(session: Session, invoice: Invoice, charge_id: str | None, payment_intent_id: str | None) -> None:
    """Fill the invoice's missing payment ids from a charge that names the invoice."""
    filled = []
    for column, value in (("stripeChargeId", charge_id), ("stripePaymentIntentId", payment_intent_id)):
        if value and getattr(invoice, column) is None:
            setattr(invoice, column, value)
            filled.append(value)
    if filled:
        invoice.updatedAt = utcnow()
        lock_payments(session, filled)


def _after_payment_fact(session: Session, invoice: Invoice | None, what: str) -> Outcome:
    if invoice is None:
        log.info("%s matches no invoice yet; recorded until an invoice is linked to its payment", what)
        return Outcome(skipped="unlinked_payment")
    row = transaction_for(session, invoice)
    if row is None:
        return Outcome(skipped="no_transaction")
    outcome = Outcome(provider_id=row.providerId, refunds_changed=_apply_refunds(session, invoice, row))
    touch(session, [outcome])
    return outcome


_UPSERT_CHARGE = text(
    """
    INSERT INTO marketplace_worker.stripe_charges AS c
        (charge_id, payment_intent_id, amount, amount_refunded, refunded, updated_at)
    VALUES (:id, :payment_intent_id, :amount, :amount_refunded, :refunded, now())
    ON CONFLICT (charge_id) DO UPDATE SET
        payment_intent_id = excluded.payment_intent_id, amount = excluded.amount,
        amount_refunded = excluded.amount_refunded, refunded = excluded.refunded, updated_at = now()
    """
)


def apply_charge(session: Session, obj: dict[str, Any], created: int, event_id: str) -> Outcome:
    """A charge snapshot (charge.refunded): its cumulative refunds, newest snapshot wins."""
    charge_id = _required_id(obj, "charge")
    payment_intent_id = _ref(obj.get("payment_intent"))
    metadata = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    invoice = _lock_invoice_for_payment(
        session, charge_id, payment_intent_id,
        stripe_invoice_id=_ref(obj.get("invoice")), app_invoice_id=metadata.get("invoiceId"),
    )
    if invoice is not None and not invoice.isMarketplaceInvoice:
        return Outcome(skipped="not_marketplace")
    if invoice is not None:
        _link_payment(session, invoice, charge_id, payment_intent_id)
    if versions.advance(session, charge_id, "charge", created, event_id):
        session.execute(_UPSERT_CHARGE, {
            "id": charge_id, "payment_intent_id": payment_intent_id,
            "amount": _cents(obj, "amount"), "amount_refunded": _cents(obj, "amount_refunded"),
            "refunded": obj.get("refunded") is True,
        })
    return _after_payment_fact(session, invoice, f"charge {charge_id}")


def _upsert_payment_object(session: Session, table: str, key: str, values: dict[str, Any]) -> None:
    """Store the newest snapshot of a refund or dispute (the caller checked it is newest)."""
    session.execute(
        text(
            f"""
            INSERT INTO marketplace_worker.{table}
                ({key}, charge_id, payment_intent_id, amount, status, updated_at)
            VALUES (:id, :charge_id, :payment_intent_id, :amount, :status, now())
            ON CONFLICT ({key}) DO UPDATE SET
                charge_id = excluded.charge_id, payment_intent_id = excluded.payment_intent_id,
                amount = excluded.amount, status = excluded.status, updated_at = now()
            """
        ),
        values,
    )


def apply_refund(session: Session, obj: dict[str, Any], created: int, event_id: str) -> Outcome:
    """A refund snapshot (refund.created / refund.updated / ...): amount and status, newest wins."""
    refund_id = _required_id(obj, "refund")
    charge_id, payment_intent_id = _ref(obj.get("charge")), _ref(obj.get("payment_intent"))
    if charge_id is None and payment_intent_id is None:
        raise InvalidPayload(f"refund {refund_id} names neither a charge nor a PaymentIntent")
    status = obj.get("status")
    if not isinstance(status, str):
        raise InvalidPayload(f"refund {refund_id} has no status")
    invoice = _lock_invoice_for_payment(session, charge_id, payment_intent_id)
    if invoice is not None and not invoice.isMarketplaceInvoice:
        return Outcome(skipped="not_marketplace")
    if versions.advance(session, refund_id, "refund", created, event_id, 0 if status == "pending" else 1):
        _upsert_payment_object(session, "stripe_refunds", "refund_id", {
            "id": refund_id, "charge_id": charge_id, "payment_intent_id": payment_intent_id,
            "amount": _cents(obj, "amount"), "status": status,
        })
    return _after_payment_fact(session, invoice, f"refund {refund_id}")


def apply_dispute(session: Session, obj: dict[str, Any], created: int, event_id: str) -> Outcome:
    """A dispute snapshot: its newest status decides whether it holds back completion."""
    dispute_id = _required_id(obj, "dispute")
    charge_id, payment_intent_id = _ref(obj.get("charge")), _ref(obj.get("payment_intent"))
    status = obj.get("status")
    if not isinstance(status, str) or (charge_id is None and payment_intent_id is None):
        raise InvalidPayload(f"dispute {dispute_id} lacks a status or a charge")
    invoice = _lock_invoice_for_payment(session, charge_id, payment_intent_id)
    if invoice is not None and not invoice.isMarketplaceInvoice:
        return Outcome(skipped="not_marketplace")
    if versions.advance(session, dispute_id, "dispute", created, event_id):
        _upsert_payment_object(session, "stripe_disputes", "dispute_id", {
            "id": dispute_id, "charge_id": charge_id, "payment_intent_id": payment_intent_id,
            "amount": _cents(obj, "amount"), "status": status,
        })
        if status not in lifecycle.DISPUTE_SETTLED:
            log.warning("dispute %s on charge %s is open (%s)", dispute_id, charge_id, status)
    # A lost dispute counts as a refund of its amount; a won one undoes nothing counted.
    return _after_payment_fact(session, invoice, f"dispute {dispute_id}")


_UPSERT_INVOICE_PAYMENT = text(
    """
    INSERT INTO marketplace_worker.stripe_invoice_payments AS p
        (invoice_payment_id, stripe_invoice_id, charge_id, payment_intent_id, status, event_created, event_id,
         updated_at)
    VALUES (:id, :stripe_invoice_id, :charge_id, :payment_intent_id, :status, :created, :event_id, now())
    ON CONFLICT (invoice_payment_id) DO UPDATE SET
        charge_id = excluded.charge_id, payment_intent_id = excluded.payment_intent_id, status = excluded.status,
        event_created = excluded.event_created, event_id = excluded.event_id, updated_at = now()
    """
)


def apply_invoice_payment(session: Session, obj: dict[str, Any], created: int, event_id: str) -> Outcome:
    """An InvoicePayment snapshot (`invoice_payment.paid`): on current API versions the one
    event that says which charge or PaymentIntent paid an invoice. Recorded, then linked to the
    app's invoice if it is known by its Stripe id; else linked when it becomes known."""
    payment_id = _required_id(obj, "invoice_payment")
    stripe_invoice_id, status, payment = _ref(obj.get("invoice")), obj.get("status"), obj.get("payment")
    if stripe_invoice_id is None or not isinstance(status, str) or not isinstance(payment, dict):
        raise InvalidPayload(f"invoice_payment {payment_id} lacks its invoice, status or payment")
    charge_id, payment_intent_id = _ref(payment.get("charge")), _ref(payment.get("payment_intent"))
    if versions.advance(session, payment_id, "invoice_payment", created, event_id, 1 if status == "paid" else 0):
        session.execute(_UPSERT_INVOICE_PAYMENT, {
            "id": payment_id, "stripe_invoice_id": stripe_invoice_id, "charge_id": charge_id,
            "payment_intent_id": payment_intent_id, "status": status, "created": created, "event_id": event_id,
        })
    invoice = _lock_one(session, Invoice.stripeInvoiceId == stripe_invoice_id)
    if invoice is None:
        # The mirror that fills the Stripe id takes this lock before reading what was recorded.
        _lock_keys(session, [f"stripe-invoice:{stripe_invoice_id}"])
        invoice = _lock_one(session, Invoice.stripeInvoiceId == stripe_invoice_id)
    if invoice is None:
        log.info("invoice payment %s of %s recorded until the app's invoice is known", payment_id, stripe_invoice_id)
        return Outcome(skipped="unknown_invoice")
    if not invoice.isMarketplaceInvoice:
        return Outcome(skipped="not_marketplace")
    if status != "paid" or not link_payment(
            session, invoice, charge_id, payment_intent_id, created, event_id, PAYMENT_LINK_RANK):
        return Outcome()
    return _after_payment_fact(session, invoice, f"invoice payment {payment_id}")


def apply_charge_link(session: Session, invoice_id: int, charge_id: str, created: int, event_id: str) -> Outcome:
    """The charge of an invoice's PaymentIntent, read from Stripe: link it and count what was
    recorded against it."""
    invoice = _lock_one(session, Invoice.id == invoice_id)
    if invoice is None or not link_payment(session, invoice, charge_id, None, created, event_id, PAYMENT_LINK_RANK):
        return Outcome()
    return _after_payment_fact(session, invoice, f"charge {charge_id}")


# --- payload helpers -----------------------------------------------------------------------


def _ref(value: Any) -> str | None:
    """An id field, whether Stripe sent the id or the expanded object."""
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) and value else None


def _required_id(obj: dict[str, Any], kind: str) -> str:
    object_id = obj.get("id")
    if not isinstance(object_id, str) or not object_id:
        raise InvalidPayload(f"{kind} without an id")
    return object_id


def _cents(obj: dict[str, Any], name: str) -> int:
    value = obj.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidPayload(f"{obj.get('object', 'object')} {obj.get('id')} {name} is not an integer")
    return value


def _unix(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidPayload(f"{name} is not a unix timestamp")
    return value
