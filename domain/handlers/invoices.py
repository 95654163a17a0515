"""Stripe invoice events: every one carries a snapshot of the invoice, and every snapshot is
applied the same way (mirror if newest, merge into the transaction), whatever its type."""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from domain.dispatch import InvalidPayload, handles
from domain.transactions import apply_invoice_snapshot
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
)
def invoice_event(session: Session, event: StripeEvent) -> None:
    obj = event.payload["data"]["object"]
    if obj.get("object") != "invoice":
        raise InvalidPayload(f"{event.type} carries a {obj.get('object')!r}, not an invoice")
    if event.type == "invoice.payment_failed":
        log.info(
            "payment failed for Stripe invoice %s (attempt %s)", obj.get("id"), obj.get("attempt_count"),
            extra={"event_id": event.id},
        )
    apply_invoice_snapshot(session, obj, event.created, event.id)
