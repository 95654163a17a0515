"""Which function handles which Stripe event type. A leaf: handlers import it to register
themselves; `domain.handlers` imports them all, so its `HANDLERS` is the whole table."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.orm import Session

from models import StripeEvent

Handler = Callable[[Session, StripeEvent], None]
# Called with all of a batch's events of its types; with skip_busy, it may leave the events
# whose rows another transaction holds, and returns them.
BatchHandler = Callable[..., list[StripeEvent]]


@dataclass(frozen=True)
class Registered:
    fn: Handler | BatchHandler
    batch: bool
    platform_only: bool
    connect_only: bool = False
    last: bool = False


HANDLERS: dict[str, Registered] = {}


def handles(*event_types: str, batch: bool = False, platform_only: bool = False,
            connect_only: bool = False, last: bool = False) -> Callable:
    """Register a handler of `event_types`: `fn(session, event)`, or with `batch=True`
    `fn(session, events, skip_busy=...) -> events left`, called once with all of a batch's
    events of those types (in order), for handlers that can share their lookups and locks.
    Batch handlers run first, in the order their types first appear in the batch, those with
    `last` after the others (after the invoice snapshots that create the transactions their
    events apply to); handlers called one event at a time run after every batch handler.

    With `platform_only`, the types describe the platform's own money (invoices, charges,
    refunds, disputes, transfers): the same types from a connected account are about that
    account's own objects, whatever their metadata says, and are recorded as ignored.
    With `connect_only`, the types matter only from a connected account (its payouts): the
    platform's own are recorded as ignored."""
    def register(fn):
        for event_type in event_types:
            if event_type in HANDLERS:
                raise RuntimeError(f"two handlers for {event_type}")
            HANDLERS[event_type] = Registered(fn, batch, platform_only, connect_only, last)
        return fn

    return register


def forget_rows(session: Session) -> None:
    """Write out what a handler changed and let the next one read every row afresh, as it
    would in a transaction of its own (the inbox rows stay: only the marking touches them)."""
    session.flush()
    for obj in list(session.identity_map.values()):
        if not isinstance(obj, StripeEvent):
            session.expire(obj)
