"""Stripe Connect events: connected accounts' status, the platform's transfers to them and
their payouts. Transfers and payouts are mirrored (newest snapshot wins) and their account
is marked for the next reconciliation pass, which does the matching (domain/connect/run.py)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from domain.connect.accounts import DEAUTHORIZED, snapshot_of, sync_account
from domain.connect.mirror import payout_row, record_payouts, record_transfers, transfer_row
from domain.errors import InvalidPayload
from domain.handlers.registry import handles
from domain.payload import event_object
from models import StripeEvent


@handles("account.updated")
def account_updated(session: Session, event: StripeEvent) -> None:
    obj = event_object(event, "account")
    account = obj.get("id") or event.account
    if not isinstance(account, str) or not account:
        raise InvalidPayload("account.updated without an account id")
    sync_account(session, account, snapshot_of(obj), created=event.created, version_id=event.id)


@handles("account.application.deauthorized")
def account_deauthorized(session: Session, event: StripeEvent) -> None:
    # data.object is the platform's application; the account is the event's.
    if not event.account:
        raise InvalidPayload("account.application.deauthorized without an account")
    sync_account(session, event.account, DEAUTHORIZED, created=event.created, version_id=event.id)


# A connected account's own transfer (Connect endpoint) is not money the platform sent.
@handles("transfer.created", "transfer.updated", "transfer.reversed", platform_only=True)
def transfer_event(session: Session, event: StripeEvent) -> None:
    record_transfers(session, [transfer_row(event_object(event, "transfer"), event.created, event.id)])


# The platform's own payouts to its bank owe no provider anything (SPEC §5 reconciles the
# connected accounts' payouts only): recorded as ignored, with the reason, before any handler.
@handles("payout.paid", "payout.failed", "payout.canceled", "payout.updated", "payout.reconciliation_completed",
         connect_only=True)
def payout_event(session: Session, event: StripeEvent) -> None:
    record_payouts(session, [payout_row(event.account, event_object(event, "payout"), event.created, event.id)])
