"""Stripe invoice events: every one carries a snapshot of the invoice, and every snapshot is
applied the same way (mirror if newest, merge into the transaction), whatever its type."""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from domain.handlers.registry import handles
from domain.payload import event_object
from domain.invoice_mirror import BUSY, Snapshot, apply_invoice_snapshots
from models import StripeEvent

log = logging.getLogger(__name__)


@handles(
    "invoice.created",
    "invoice.finalized",
    "invoice.paid",
    "invoice.payment_succeeded",
    "invoice.payment_failed",
    "invoice.voided",
    "invoice.marked_uncollectible",
    "invoice.updated",
    batch=True,
    platform_only=True,
)
def invoice_events(session: Session, events: list[StripeEvent], *, skip_busy: bool) -> list[StripeEvent]:
    snapshots = []
    for event in events:
        obj = event_object(event, "invoice")
        if event.type == "invoice.payment_failed":
            log.info(
                "payment failed for Stripe invoice %s (attempt %s)", obj.get("id"), obj.get("attempt_count"),
                extra={"event_id": event.id},
            )
        snapshots.append(Snapshot(obj, event.created, event.id))
    outcomes = apply_invoice_snapshots(session, snapshots, skip_busy=skip_busy)
    return [event for event, outcome in zip(events, outcomes) if outcome.skipped == BUSY]
