"""Catch-up from Stripe's events API: events the endpoint never received (the receiver
was down, or Stripe gave up) are stored through the same inbox path as a webhook.

Stripe keeps events for 30 days. The window starts at the newest stored event's
time minus an overlap, so events delivered out of order around an outage are
listed again and deduplicated by id.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

import stripe
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from config import get_settings
from domain.dispatch import handled_types
from domain.inbox import INSERT_EVENTS_SQL, IncomingEvent, event_from_dict, insert_params
from domain.stripe_api import with_rate_limit_retry
from models import Provider, StripeEvent

log = logging.getLogger(__name__)

STRIPE_RETENTION_SECONDS = 30 * 24 * 3600
OVERLAP_SECONDS = 3600
TYPES_PER_CALL = 20  # Stripe's limit for the `types` filter


@dataclass
class CatchUpResult:
    listed: int = 0
    stored: list[str] = field(default_factory=list)


def window_start(session: Session, now: int | None = None) -> int:
    now = now or int(time.time())
    newest = session.execute(
        select(func.max(StripeEvent.created)).where(StripeEvent.endpoint != "catchup")
    ).scalar()
    oldest_allowed = now - STRIPE_RETENTION_SECONDS + 60
    if newest is None:
        return oldest_allowed
    return max(oldest_allowed, newest - OVERLAP_SECONDS)


def connect_accounts(session: Session) -> list[str]:
    return list(
        session.execute(
            select(Provider.stripeConnectAccountId)
            .where(Provider.paymentMode == "stripe_connect", Provider.stripeConnectAccountId.is_not(None))
            .order_by(Provider.stripeConnectAccountId)
        ).scalars()
    )


def list_missed_events(client: stripe.StripeClient, since: int, account: str | None) -> list[dict]:
    types = list(handled_types())
    options = {"stripe_account": account} if account else {}
    events: list[dict] = []
    for start in range(0, len(types), TYPES_PER_CALL):
        params = {"types": types[start:start + TYPES_PER_CALL], "created": {"gte": since}, "limit": 100}
        page = with_rate_limit_retry(lambda: client.v1.events.list(params, options))
        while True:
            events.extend(item.to_dict() for item in page.data)
            if not page.has_more:
                break
            last = page.data[-1].id
            page = with_rate_limit_retry(
                lambda: client.v1.events.list({**params, "starting_after": last}, options)
            )
    return events


def store_missed(session: Session, events: list[dict], account: str | None) -> list[str]:
    """Store events not yet in the inbox; returns the ids stored now."""
    livemode = get_settings().stripe_livemode
    incoming: list[IncomingEvent] = []
    for data in events:
        if account and not data.get("account"):
            data["account"] = account
        try:
            incoming.append(event_from_dict(data, json.dumps(data), "catchup", livemode=livemode))
        except ValueError as error:
            log.error("catch-up skipped a malformed event %s: %s", data.get("id"), error)
    if not incoming:
        return []
    rows = session.connection().exec_driver_sql(INSERT_EVENTS_SQL, insert_params(incoming))
    stored = {row[0] for row in rows}
    return [e.id for e in incoming if e.id in stored and not e.ignored_reason]


def catch_up(session_factory, client: stripe.StripeClient) -> CatchUpResult:
    """List the platform's events, then each Connect account's, and store what is missing."""
    result = CatchUpResult()
    with session_factory() as session:
        since = window_start(session)
        accounts = connect_accounts(session)
    for account in [None, *accounts]:
        events = list_missed_events(client, since, account)
        result.listed += len(events)
        with session_factory() as session:
            result.stored.extend(store_missed(session, events, account))
    if result.stored:
        log.warning("catch-up stored %d events the endpoint never received", len(result.stored))
    return result
