"""Stripe charge, refund and dispute events: recorded per Stripe object (newest snapshot
wins) and applied to the transaction of the invoice the payment belongs to."""

from __future__ import annotations

from sqlalchemy.orm import Session

from domain.dispatch import InvalidPayload, handles
from domain.transactions import apply_charge, apply_dispute, apply_refund
from models import StripeEvent


def _object(event: StripeEvent, kind: str) -> dict:
    obj = event.payload["data"]["object"]
    if obj.get("object") != kind:
        raise InvalidPayload(f"{event.type} carries a {obj.get('object')!r}, not a {kind}")
    return obj


@handles("charge.refunded")
def charge_event(session: Session, event: StripeEvent) -> None:
    apply_charge(session, _object(event, "charge"), event.created, event.id)


@handles("refund.created", "refund.updated", "refund.failed", "charge.refund.updated")
def refund_event(session: Session, event: StripeEvent) -> None:
    apply_refund(session, _object(event, "refund"), event.created, event.id)


@handles(
    "charge.dispute.created",
    "charge.dispute.updated",
    "charge.dispute.closed",
    "charge.dispute.funds_withdrawn",
    "charge.dispute.funds_reinstated",
)
def dispute_event(session: Session, event: StripeEvent) -> None:
    apply_dispute(session, _object(event, "dispute"), event.created, event.id)
