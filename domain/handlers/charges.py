"""Stripe charge, refund, dispute and invoice payment events: recorded per Stripe object
(newest snapshot wins) and applied to the transaction of the invoice the payment belongs to.
Only the platform's own: a connected account's are about its own money."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy.orm import Session

from domain.errors import InvalidPayload, describe
from domain.handlers.registry import forget_rows, handles
from domain.payload import event_object
from domain.payments import (PaymentInvoices, PaymentRefs, apply_charge, apply_dispute, apply_invoice_payment,
                             apply_refund, charge_refs, invoice_payment_refs, refund_refs)
from models import StripeEvent

log = logging.getLogger(__name__)

# charge.succeeded too: on current API versions it is what ties a PaymentIntent to its charge
# without an API read (invoice_payment.paid names only the PaymentIntent).
_CHARGE_TYPES = ("charge.succeeded", "charge.refunded")
_REFUND_TYPES = ("refund.created", "refund.updated", "refund.failed", "charge.refund.updated")
_DISPUTE_TYPES = (
    "charge.dispute.created",
    "charge.dispute.updated",
    "charge.dispute.closed",
    "charge.dispute.funds_withdrawn",
    "charge.dispute.funds_reinstated",
)
_INVOICE_PAYMENT_TYPES = ("invoice_payment.paid",)

# Per type: the function that applies it, the Stripe object it carries, what names its invoice.
_APPLY: dict[str, tuple[Callable, str, Callable[[dict], PaymentRefs]]] = (
    dict.fromkeys(_CHARGE_TYPES, (apply_charge, "charge", charge_refs))
    | dict.fromkeys(_REFUND_TYPES, (apply_refund, "refund", refund_refs))
    | dict.fromkeys(_DISPUTE_TYPES, (apply_dispute, "dispute", refund_refs))
    | dict.fromkeys(_INVOICE_PAYMENT_TYPES, (apply_invoice_payment, "invoice_payment", invoice_payment_refs))
)


def _apply(session: Session, event: StripeEvent, invoices: PaymentInvoices | None = None) -> None:
    apply, kind, _ = _APPLY[event.type]
    apply(session, event_object(event, kind), event.created, event.id, invoices)


def _refs(event: StripeEvent) -> list[PaymentRefs]:
    _, kind, refs = _APPLY[event.type]
    try:
        return [refs(event_object(event, kind))]
    except InvalidPayload:  # refused when it is applied
        return []


def _apply_together(session: Session, events: list[StripeEvent]) -> None:
    """The events in order, their invoices and transactions looked up and locked together
    first (`PaymentInvoices.locked_for`): the rows each finds are those it would find alone."""
    invoices = PaymentInvoices.locked_for(session, [refs for event in events for refs in _refs(event)])
    # The rows the events change are held, and their changes go out in one flush at the end:
    # each event finds them as its predecessors left them among those held, and the database
    # is only asked about what is not held (`PaymentInvoices.find` flushes before it asks).
    with session.no_autoflush:
        for event in events:
            _apply(session, event, invoices)
    session.flush()  # here, so that what it refuses fails the batch's savepoint
    invoices.touch_changed()


class _Held(logging.Filter):
    """Keeps this thread's log records from the handlers (each record once, whichever handlers
    it passes through); other threads' go through."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()
        self.records: dict[int, logging.LogRecord] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread != self.thread:
            return True
        self.records.setdefault(id(record), record)
        return False


@contextmanager
def _logs_kept_if_committed() -> Iterator[None]:
    """What the block logs is written once it has succeeded, and dropped if it raises: a shared
    attempt that is rolled back is applied again event by event, which logs again (a dispute
    alert or a "transaction created" line must not appear twice, or for work undone)."""
    held = _Held()
    handlers = list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(held)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(held)
    for record in held.records.values():
        logging.getLogger(record.name).handle(record)


@handles(*_APPLY, batch=True, platform_only=True, last=True)
def payment_events(session: Session, events: list[StripeEvent], *, skip_busy: bool) -> list[StripeEvent]:
    """A batch's payment events, in order, each finding the rows it would find alone.

    They share one savepoint; if one of them fails (or, with `skip_busy`, waits too long for a
    row), the batch's are applied again each in a savepoint of its own and only the failing
    ones are left, as events of a handler registered one by one would be."""
    if not skip_busy or len(events) == 1:  # the caller's savepoint, if any, is the event's own
        for n, event in enumerate(events):
            if n:
                forget_rows(session)
            _apply(session, event)
        return []
    try:
        with _logs_kept_if_committed(), session.begin_nested():
            _apply_together(session, events)
        return []
    except Exception as error:
        log.debug("payment events %s apply one at a time: %s", [e.id for e in events], describe(error))
    left = []
    for event in events:
        forget_rows(session)
        try:
            with session.begin_nested():
                _apply(session, event)
        except Exception as error:
            log.debug("event %s left for later: %s", event.id, describe(error))
            left.append(event)
    return left
