"""Invoice polling: the safety net behind the webhooks, and the only path for manual payments.

1. Changed invoices. For each status of marketplace invoices, a watermark on
   ("updatedAt", id) in `marketplace_worker.watermarks` and keyset pages on the index
   ("isMarketplaceInvoice", status, "updatedAt"): a run reads what changed since the last one
   (plus an overlap window for late commits and clock skew), never the whole table. Each
   changed invoice is locked and synced exactly as a webhook would (domain/transactions.py):
   its transaction is created if missing and advanced from the app's own status.
2. Stuck Stripe invoices. Stripe-backed invoices still draft/open with no event for long,
   open ones past their due date, and paid ones whose payment was never linked (basil
   webhooks carry no `payments`) are read from the Stripe API, a bounded number per run,
   and applied through the webhook's own function.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import stripe
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from config import Settings, get_settings
from domain import transactions
from domain.clock import utcnow
from domain.dispatch import InvalidPayload, NotYetKnown
from domain.stripe_api import with_rate_limit_retry
from models import Invoice, Watermark

log = logging.getLogger(__name__)

SessionFactory = Callable[[], AbstractContextManager[Session]]

WATERMARK_PREFIX = "invoice_poll:"
# The version an API read is recorded with: Stripe's object is newer than every event stored
# before the read. "api" sorts before every "evt_…", so an event of the same second wins.
API_READ_EVENT_ID = "api_read"


@dataclass
class PollResult:
    created: int = 0
    advanced: int = 0
    refreshed_from_stripe: int = 0
    skipped: Counter = field(default_factory=Counter)

    def count(self, outcome: transactions.Outcome) -> None:
        self.created += outcome.created
        self.advanced += outcome.advanced
        if outcome.skipped:
            self.skipped[outcome.skipped] += 1

    def as_dict(self) -> dict:
        return {
            "created": self.created,
            "advanced": self.advanced,
            "refreshed_from_stripe": self.refreshed_from_stripe,
            "skipped": dict(sorted(self.skipped.items())),
        }


def poll_invoices(
    session_factory: SessionFactory, client: stripe.StripeClient | None, settings: Settings | None = None
) -> PollResult:
    settings = settings or get_settings()
    result = PollResult()
    unlinked = sync_changed_invoices(session_factory, settings, result)
    if client is None:
        log.warning("STRIPE_API_KEY is not set: stuck invoices are not re-read from Stripe")
    else:
        refresh_stuck_invoices(session_factory, client, settings, result, also=unlinked)
    log.info("invoice poll: %s", result.as_dict())
    return result


# --- 1. changed invoices --------------------------------------------------------------------

# Distinct statuses of marketplace invoices by a loose index scan: one index probe per status.
_STATUSES_SQL = text(
    """
    WITH RECURSIVE s(status) AS (
        SELECT min(status) FROM "Invoice" WHERE "isMarketplaceInvoice"
        UNION ALL
        SELECT (SELECT min(status) FROM "Invoice" WHERE "isMarketplaceInvoice" AND status > s.status)
        FROM s WHERE s.status IS NOT NULL
    )
    SELECT status FROM s WHERE status IS NOT NULL
    """
)

# One keyset page of one status, in index order.
_PAGE_SQL = text(
    """
    SELECT id, "updatedAt" FROM "Invoice"
    WHERE "isMarketplaceInvoice" AND status = :status
      AND "updatedAt" >= :after_at AND "updatedAt" <= :until
      AND ("updatedAt", id) > (:after_at, :after_id)
    ORDER BY "updatedAt", id
    LIMIT :limit
    """
)

_SAVE_WATERMARK = text(
    """
    INSERT INTO marketplace_worker.watermarks AS w (name, position_at, position_id, updated_at)
    VALUES (:name, :at, :id, now())
    ON CONFLICT (name) DO UPDATE
        SET position_at = excluded.position_at, position_id = excluded.position_id, updated_at = now()
        WHERE (w.position_at, w.position_id) < (excluded.position_at, excluded.position_id)
    """
)

EPOCH = datetime(1970, 1, 1)


def sync_changed_invoices(session_factory: SessionFactory, settings: Settings, result: PollResult) -> list[int]:
    """Sync every marketplace invoice changed since the last run. Returns the ids of paid
    Stripe invoices whose payment is not linked yet (to be read from Stripe)."""
    overlap = timedelta(seconds=settings.poll_overlap_seconds)
    with session_factory() as session:
        # The database's clock, in the app's naive-UTC form: the upper bound of this run.
        until = session.execute(text("SELECT (now() AT TIME ZONE 'UTC')::timestamp(3)")).scalar_one()
        statuses = list(session.execute(_STATUSES_SQL).scalars())
        marks = {
            w.name: (w.position_at, w.position_id)
            for w in session.execute(
                select(Watermark).where(Watermark.name.in_([WATERMARK_PREFIX + s for s in statuses]))
            ).scalars()
        }
    budget = settings.poll_max_invoices_per_run
    unlinked: list[int] = []
    for status in statuses:
        name = WATERMARK_PREFIX + status
        at, last_id = marks.get(name, (None, None))
        if at is None:
            cursor = (EPOCH, 0)
        elif last_id:  # the last run stopped mid-way (its budget ran out): resume exactly there
            cursor = (at, last_id)
        else:  # the last run read to the end: re-read its overlap window for late commits
            cursor = (at - overlap, 0)
        while budget > 0:
            limit = min(settings.poll_batch_size, budget)
            with session_factory() as session:
                page = session.execute(
                    _PAGE_SQL,
                    {"status": status, "after_at": cursor[0], "after_id": cursor[1], "until": until,
                     "limit": limit},
                ).all()
                if page:
                    unlinked += _sync_batch(session, [row.id for row in page], result)
                    cursor = (page[-1].updatedAt, page[-1].id)
                done = len(page) < limit
                # Once a status is read to the end, the next run starts from this run's start
                # (minus the overlap) rather than from the last change it found.
                mark = (until, 0) if done else cursor
                session.execute(_SAVE_WATERMARK, {"name": name, "at": mark[0], "id": mark[1]})
            budget -= len(page)
            if done:
                break
    return unlinked


def _sync_batch(session: Session, invoice_ids: list[int], result: PollResult) -> list[int]:
    # Invoice rows first, in id order, then their transactions: the lock order of every writer.
    invoices = session.execute(
        select(Invoice).where(Invoice.id.in_(invoice_ids)).order_by(Invoice.id).with_for_update()
    ).scalars().all()
    known = transactions.transactions_for(session, invoices)
    now = utcnow()
    outcomes, unlinked = [], []
    for invoice in invoices:
        if not invoice.isMarketplaceInvoice:
            continue  # changed by the app since the page was read
        # Refunds are brought up to date where they can change: on creation, on reaching
        # paid, and whenever an invoice gets linked to its payment (webhook or Stripe read).
        outcome = transactions.sync_invoice(
            session, invoice, transactions.facts_from_app(invoice, now), refresh_refunds=False, known=known
        )
        result.count(outcome)
        outcomes.append(outcome)
        linked = invoice.stripeChargeId is not None or invoice.stripePaymentIntentId is not None
        if invoice.stripeInvoiceId and invoice.status == "paid" and not linked and invoice.deletedAt is None:
            unlinked.append(invoice.id)
    transactions.touch(session, outcomes)
    return unlinked


# --- 2. stuck Stripe invoices ---------------------------------------------------------------

# Candidates, most overdue first: draft/open with no Stripe sighting (event or API read) for
# `stale` seconds (never seen: since the invoice last changed), or open past its due date with
# none for `recheck` seconds. Reads the draft/open part of the status index only.
_STUCK_SQL = text(
    """
    SELECT i.id, i."stripeInvoiceId"
    FROM "Invoice" i
    LEFT JOIN marketplace_worker.stripe_object_versions v ON v.object_id = i."stripeInvoiceId"
    WHERE i."isMarketplaceInvoice" AND i.status IN ('draft', 'open')
      AND i."stripeInvoiceId" IS NOT NULL AND i."deletedAt" IS NULL
      AND (
        coalesce(v.updated_at, i."updatedAt" AT TIME ZONE 'UTC') < now() - make_interval(secs => :stale)
        OR (i.status = 'open' AND i."dueAt" < (now() AT TIME ZONE 'UTC')
            AND coalesce(v.updated_at, i."updatedAt" AT TIME ZONE 'UTC') < now() - make_interval(secs => :recheck))
      )
    ORDER BY i."dueAt" < (now() AT TIME ZONE 'UTC') DESC NULLS LAST,
             coalesce(v.updated_at, i."updatedAt" AT TIME ZONE 'UTC'), i.id
    LIMIT :limit
    """
)

_UNLINKED_SQL = text(
    """
    SELECT i.id, i."stripeInvoiceId"
    FROM "Invoice" i
    LEFT JOIN marketplace_worker.stripe_object_versions v ON v.object_id = i."stripeInvoiceId"
    WHERE i.id = ANY(:ids) AND i."stripeChargeId" IS NULL AND i."stripePaymentIntentId" IS NULL
      AND (v.event_id IS DISTINCT FROM :api_read OR v.updated_at < now() - make_interval(secs => :recheck))
    ORDER BY i.id
    LIMIT :limit
    """
)


def stuck_invoices(session: Session, settings: Settings, also: list[int] = ()) -> list[tuple[int, str]]:
    limit = settings.poll_stripe_reads_per_run
    rows = []
    if also and limit:
        rows = session.execute(
            _UNLINKED_SQL,
            {"ids": list(also), "api_read": API_READ_EVENT_ID, "recheck": settings.poll_recheck_seconds,
             "limit": limit},
        ).all()
    if len(rows) < limit:
        rows += session.execute(
            _STUCK_SQL,
            {"stale": settings.poll_stale_after_seconds, "recheck": settings.poll_recheck_seconds,
             "limit": limit - len(rows)},
        ).all()
    return [(row.id, row.stripeInvoiceId) for row in rows]


def refresh_stuck_invoices(
    session_factory: SessionFactory, client: stripe.StripeClient, settings: Settings, result: PollResult,
    also: list[int] = (),
) -> None:
    """Read stuck invoices from Stripe (no lock held meanwhile) and apply each like a webhook."""
    with session_factory() as session:
        candidates = stuck_invoices(session, settings, also)
    for invoice_id, stripe_id in candidates:
        try:
            fetched = with_rate_limit_retry(
                lambda: client.v1.invoices.retrieve(stripe_id, {"expand": ["payments"]}), attempts=3
            )
        except stripe.InvalidRequestError as error:
            log.warning("Stripe has no invoice %s (app invoice %s): %s", stripe_id, invoice_id, error)
            result.skipped["stripe_not_found"] += 1
            continue
        except stripe.RateLimitError:
            log.warning("Stripe rate limit: stuck invoices left for the next poll")
            result.skipped["stripe_rate_limited"] += 1
            break
        except stripe.StripeError as error:
            log.warning("could not read invoice %s from Stripe: %s", stripe_id, error)
            result.skipped["stripe_error"] += 1
            continue
        read_at = int(time.time())
        try:
            with session_factory() as session:
                [outcome] = transactions.apply_invoice_snapshots(
                    session, [transactions.Snapshot(fetched.to_dict(), read_at, API_READ_EVENT_ID)]
                )
        except (InvalidPayload, NotYetKnown) as error:
            log.warning("invoice %s read from Stripe could not be applied: %s", stripe_id, error)
            result.skipped["stripe_unappliable"] += 1
            continue
        result.refreshed_from_stripe += 1
        result.count(outcome)
