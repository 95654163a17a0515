"""Stripe charge, refund, dispute and invoice payment events: recorded per Stripe object
(newest snapshot wins) and applied to the transaction of the invoice the payment belongs to.
Only the platform's own: a connected account's are about its own money."""

from __future__ import annotations

from sqlalchemy.orm import Session

from domain.handlers.registry import handles
from domain.payload import event_object
from domain.payments import apply_charge, apply_dispute, apply_invoice_payment, apply_refund
from models import StripeEvent


# charge.succeeded too: on current API versions it is what ties a PaymentIntent to its charge
# without an API read (invoice_payment.paid names only the PaymentIntent).
@handles("charge.succeeded", "charge.refunded", platform_only=True)
def charge_event(session: Session, event: StripeEvent) -> None:
    apply_charge(session, event_object(event, "charge"), event.created, event.id)


@handles("refund.created", "refund.updated", "refund.failed", "charge.refund.updated", platform_only=True)
def refund_event(session: Session, event: StripeEvent) -> None:
    apply_refund(session, event_object(event, "refund"), event.created, event.id)


@handles(
    "charge.dispute.created",
    "charge.dispute.updated",
    "charge.dispute.closed",
    "charge.dispute.funds_withdrawn",
    "charge.dispute.funds_reinstated",
    platform_only=True,
)
def dispute_event(session: Session, event: StripeEvent) -> None:
    apply_dispute(session, event_object(event, "dispute"), event.created, event.id)


@handles("invoice_payment.paid", platform_only=True)
def invoice_payment_event(session: Session, event: StripeEvent) -> None:
    apply_invoice_payment(session, event_object(event, "invoice_payment"), event.created, event.id)
