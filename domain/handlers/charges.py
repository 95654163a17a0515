"""Stripe charge, refund and dispute events: recorded per Stripe object (newest snapshot
wins) and applied to the transaction of the invoice the payment belongs to."""

from __future__ import annotations

from sqlalchemy.orm import Session

from domain.dispatch import event_object, handles
from domain.transactions import apply_charge, apply_dispute, apply_refund
from models import StripeEvent


@handles("charge.refunded")
def charge_event(session: Session, event: StripeEvent) -> None:
    apply_charge(session, event_object(event, "charge"), event.created, event.id)


@handles("refund.created", "refund.updated", "refund.failed", "charge.refund.updated")
def refund_event(session: Session, event: StripeEvent) -> None:
    apply_refund(session, event_object(event, "refund"), event.created, event.id)


@handles(
    "charge.dispute.created",
    "charge.dispute.updated",
    "charge.dispute.closed",
    "charge.dispute.funds_withdrawn",
    "charge.dispute.funds_reinstated",
)
def dispute_event(session: Session, event: StripeEvent) -> None:
    apply_dispute(session, event_object(event, "dispute"), event.created, event.id)
