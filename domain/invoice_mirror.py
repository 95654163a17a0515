"""The app's `"Invoice"` row mirrored from Stripe. Every Stripe invoice snapshot (a webhook's,
or an API read's) is applied the same way: copied onto the app's row when it is the newest
seen, its payment linked to the invoice (domain/payments.py), then merged into the invoice's
transaction (domain/ledger.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, or_, select
from sqlalchemy.orm import Session

from domain import lifecycle, versions
from domain.clock import from_unix, utcnow
from domain.errors import InvalidPayload, NotYetKnown
from domain.ledger import InvoiceFacts, Outcome, sync_invoice, touch, transactions_for
from domain.payload import required_id
from domain.payments import (link_payment, link_recorded_payments, payment_links, payment_of_invoice,
                             recorded_payments)
from models import Invoice

log = logging.getLogger(__name__)


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
    checked = [(snapshot, required_id(snapshot.obj, "invoice"), facts_from_stripe(snapshot.obj, snapshot.created))
               for snapshot in snapshots]
    invoices = _lock_invoices_for_snapshots(
        session, [(stripe_id, snapshot.obj) for snapshot, stripe_id, _ in checked], skip_busy=skip_busy)
    known = transactions_for(
        session, [i for i in dict.fromkeys(invoices) if isinstance(i, Invoice) and i.isMarketplaceInvoice])
    recorded = recorded_payments(session, list(dict.fromkeys(
        stripe_id for (_, stripe_id, _), invoice in zip(checked, invoices)
        if isinstance(invoice, Invoice) and invoice.isMarketplaceInvoice and invoice.stripeInvoiceId is None)))
    newer = _advance_versions(session, checked, invoices)
    outcomes = []
    for (snapshot, stripe_id, facts), invoice, advanced in zip(checked, invoices, newer):
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
        linked = _mirror(session, invoice, snapshot.obj, snapshot.created, snapshot.event_id, advanced, recorded)
        outcomes.append(sync_invoice(session, invoice, facts, refresh_refunds=linked, known=known))
    touch(session, outcomes)
    return outcomes


def _advance_versions(
    session: Session, checked: list[tuple[Snapshot, str, InvoiceFacts]], invoices: list[Invoice | None | str]
) -> list[dict[str, bool]]:
    """Each mirrored snapshot's versions advanced at once (`versions.advance_all`), in the
    order `_mirror` would advance them one by one: its invoice's, then its payment links'.
    An invoice not yet known by its Stripe id gets its links' versions advanced by `_mirror`
    itself: the payments recorded before it was known are linked between its snapshots'."""
    wanted, owners = [], []
    for n, ((snapshot, stripe_id, _), invoice) in enumerate(zip(checked, invoices)):
        if not isinstance(invoice, Invoice) or not invoice.isMarketplaceInvoice:
            continue
        rank = _rank(snapshot.obj)
        wanted.append((stripe_id, "invoice", snapshot.created, snapshot.event_id, rank))
        owners.append((n, stripe_id))
        if invoice.stripeInvoiceId is None:
            continue
        for key, value in payment_links(invoice.stripeInvoiceId, *payment_of_invoice(snapshot.obj)):
            if value:
                wanted.append((key, "invoice_link", snapshot.created, snapshot.event_id, rank))
                owners.append((n, key))
    newer: list[dict[str, bool]] = [{} for _ in checked]
    for (n, key), answer in zip(owners, versions.advance_all(session, wanted)):
        newer[n][key] = answer
    return newer


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


def _unix(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidPayload(f"{name} is not a unix timestamp")
    return value


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


# An invoice's progress, for snapshots of one second (see domain/versions.py).
INVOICE_STATUS_RANK = {"draft": 0, "open": 1, "uncollectible": 2, "paid": 3, "void": 3}


def _rank(obj: dict[str, Any]) -> int:
    return INVOICE_STATUS_RANK.get(obj.get("status"), 0) if isinstance(obj.get("status"), str) else 0


def _mirror(session: Session, invoice: Invoice, obj: dict[str, Any], created: int, event_id: str,
            newer: dict[str, bool], recorded: dict[str, list[Row]]) -> bool:
    """Copy Stripe's invoice onto the app's row when this snapshot is the newest seen; fill
    the payment ids. Returns whether the invoice got linked to a new charge or PaymentIntent.
    `newer`: the versions already advanced for this snapshot (`_advance_versions`);
    `recorded`: the payments recorded for invoices not yet known by their Stripe id."""
    stripe_id = obj["id"]
    values: dict[str, Any] = {}
    newly_known = invoice.stripeInvoiceId is None
    if newly_known:
        values["stripeInvoiceId"] = stripe_id
    rank = _rank(obj)
    if newer[stripe_id]:
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
    linked = link_payment(session, invoice, charge_id, payment_intent_id, created, event_id, rank, newer=newer)
    if newly_known:
        linked |= link_recorded_payments(session, invoice, recorded.get(stripe_id, []))
    return linked
