"""Invoice polling: the safety net behind the webhooks, and the only path for manual payments.

1. Changed invoices. For each status of marketplace invoices, a watermark on
   ("updatedAt", id) in `marketplace_worker.watermarks` and keyset pages on the index
   ("isMarketplaceInvoice", status, "updatedAt"): a run reads what changed since the last one
   (plus an overlap window for late commits and clock skew), never the whole table. Each
   changed invoice is locked and synced exactly as a webhook would (domain/ledger.py):
   its transaction is created if missing and advanced from the app's own status. The same
   pass keeps the to-do list of Stripe reads (`stripe_invoice_reads`) in step with it.
2. Stripe reads that are due. From that to-do list, by its index on when each is due: paid
   invoices not yet linked to their charge (current API versions' webhooks carry no payment;
   retried with backoff until linked, whatever fails), then draft/open ones with no news from
   Stripe for long or open past their due date. A bounded number per run; what the budget
   leaves stays due for the next run. Each read is applied through the webhook's own function.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import stripe
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from config import Settings, get_settings
from domain import lifecycle
from domain.clock import utcnow
from domain.errors import InvalidPayload, NotYetKnown, describe
from domain.invoice_mirror import Snapshot, apply_invoice_snapshots
from domain.ledger import InvoiceFacts, Outcome, sync_invoice, touch, transactions_for
from domain.payments import apply_charge_link, payment_of_invoice
from domain.stripe_api import with_rate_limit_retry
from models import Invoice, StripeInvoiceRead, Watermark
from models.db import SessionFactory

log = logging.getLogger(__name__)

WATERMARK_PREFIX = "invoice_poll:"
# The version an API read is recorded with: Stripe's object is newer than every event stored
# before the read. "api" sorts before every "evt_…", so an event of the same second wins (the
# opposite of a Connect read's domain.versions.API_READ_ID).
API_READ_EVENT_ID = "api_read"


@dataclass
class PollResult:
    created: int = 0
    advanced: int = 0
    refreshed_from_stripe: int = 0
    skipped: Counter = field(default_factory=Counter)

    def count(self, outcome: Outcome) -> None:
        self.created += outcome.created
        self.advanced += outcome.advanced
        if outcome.skipped:
            self.skipped[outcome.skipped] += 1

    def counts(self) -> dict:
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
    sync_changed_invoices(session_factory, settings, result)
    if client is None:
        log.warning("STRIPE_API_KEY is not set: invoices due for a read are not read from Stripe")
    else:
        refresh_from_stripe(session_factory, client, settings, result)
    log.info("invoice poll: %s", result.counts())
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


def sync_changed_invoices(session_factory: SessionFactory, settings: Settings, result: PollResult) -> None:
    """Sync every marketplace invoice changed since the last run."""
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
    for status in statuses:
        name = WATERMARK_PREFIX + status
        at, last_id = marks.get(name, (None, None))
        # Every run starts its overlap window behind where the last one got to, whether that
        # run read to the end or stopped on its budget: a change committed late behind the
        # last run's cursor is read all the same. Re-reading the window is not charged to the
        # budget, so a run that stopped on it always gets further than the last one.
        cursor = (EPOCH, 0) if at is None else (at - overlap, 0)
        resumed_from = (EPOCH, 0) if at is None or not last_id else (at, last_id)
        while budget > 0:
            limit = settings.poll_batch_size if cursor <= resumed_from else min(settings.poll_batch_size, budget)
            with session_factory() as session:
                page = session.execute(
                    _PAGE_SQL,
                    {"status": status, "after_at": cursor[0], "after_id": cursor[1], "until": until,
                     "limit": limit},
                ).all()
                if page:
                    _sync_batch(session, [row.id for row in page], result, settings)
                    cursor = (page[-1].updatedAt, page[-1].id)
                done = len(page) < limit
                # Once a status is read to the end, the next run starts from this run's start
                # (minus the overlap) rather than from the last change it found.
                mark = (until, 0) if done else cursor
                session.execute(_SAVE_WATERMARK, {"name": name, "at": mark[0], "id": mark[1]})
            budget -= sum(1 for row in page if (row.updatedAt, row.id) > resumed_from)
            if done:
                break


def _sync_batch(session: Session, invoice_ids: list[int], result: PollResult, settings: Settings) -> None:
    # Invoice rows first, in id order, then their transactions: the lock order of every writer.
    invoices = session.execute(
        select(Invoice).where(Invoice.id.in_(invoice_ids)).order_by(Invoice.id).with_for_update()
    ).scalars().all()
    known = transactions_for(session, invoices)
    now = utcnow()
    outcomes = []
    for invoice in invoices:
        if not invoice.isMarketplaceInvoice:
            continue  # changed by the app since the page was read
        # Refunds are brought up to date where they can change: on creation, on reaching
        # paid, and whenever an invoice gets linked to its payment (webhook or Stripe read).
        outcome = sync_invoice(session, invoice, facts_from_app(invoice, now), refresh_refunds=False, known=known)
        result.count(outcome)
        outcomes.append(outcome)
    touch(session, outcomes)
    schedule_reads(session, invoice_ids, settings)


def facts_from_app(invoice: Invoice, now: datetime) -> InvoiceFacts:
    """What the app's own invoice row says (manual payments: the app marks it paid)."""
    return InvoiceFacts(
        target=lifecycle.target_from_invoice(
            invoice.status, finalized_at=invoice.issuedAt, paid_at=invoice.paidAt, voided_at=invoice.voidedAt
        ),
        invoiced_at=invoice.issuedAt,
        paid_at=invoice.paidAt,
        at=now,
        voided=invoice.voidedAt is not None or invoice.status == "void",
    )


# --- the to-do list of Stripe reads ----------------------------------------------------------

# When a draft or open Stripe invoice is next due for a read: `stale` after its last sighting
# (an event or a read; never seen: its last change), an open one past its due date after
# `recheck`. Paid ones without their charge are due at once.
_DUE_SQL = """
    CASE WHEN i.status = 'paid' THEN now()
         WHEN i.status = 'open' AND i."dueAt" IS NOT NULL THEN least(
             coalesce(v.updated_at, i."updatedAt" AT TIME ZONE 'UTC') + make_interval(secs => :stale),
             greatest(i."dueAt" AT TIME ZONE 'UTC',
                      coalesce(v.updated_at, i."updatedAt" AT TIME ZONE 'UTC') + make_interval(secs => :recheck)))
         ELSE coalesce(v.updated_at, i."updatedAt" AT TIME ZONE 'UTC') + make_interval(secs => :stale)
    END
"""

_WANTED_SQL = """
    SELECT i.id, i."stripeInvoiceId", CASE WHEN i.status = 'paid' THEN 'unlinked' ELSE 'stale' END AS reason,
           """ + _DUE_SQL + """ AS due_at
    FROM "Invoice" i
    LEFT JOIN marketplace_worker.stripe_object_versions v ON v.object_id = i."stripeInvoiceId"
    WHERE i.id = ANY(:ids) AND i."isMarketplaceInvoice" AND i."stripeInvoiceId" IS NOT NULL
      AND i."deletedAt" IS NULL
      AND (i.status IN ('draft', 'open') OR (i.status = 'paid' AND i."stripeChargeId" IS NULL))
"""

# One statement for a batch: each invoice on the list with its due time, or off it. A row that
# keeps its reason keeps its backoff (a paid invoice still unlinked is not re-read at once
# because the app touched it).
_SCHEDULE_SQL = text(
    """
    WITH wanted AS (""" + _WANTED_SQL + """),
    gone AS (
        DELETE FROM marketplace_worker.stripe_invoice_reads r
        WHERE r.invoice_id = ANY(:ids) AND r.invoice_id NOT IN (SELECT id FROM wanted)
    )
    INSERT INTO marketplace_worker.stripe_invoice_reads AS r (invoice_id, stripe_invoice_id, reason, due_at)
    SELECT id, "stripeInvoiceId", reason, due_at FROM wanted
    ON CONFLICT (invoice_id) DO UPDATE SET
        stripe_invoice_id = excluded.stripe_invoice_id,
        due_at = CASE WHEN r.reason <> excluded.reason THEN excluded.due_at
                      WHEN r.reason = 'unlinked' OR r.attempts > 0 THEN greatest(r.due_at, excluded.due_at)
                      ELSE excluded.due_at END,
        attempts = CASE WHEN r.reason = excluded.reason THEN r.attempts ELSE 0 END,
        reason = excluded.reason, updated_at = now()
    """
)


def schedule_reads(session: Session, invoice_ids: list[int], settings: Settings) -> None:
    """Put the invoices that need a Stripe read on the to-do list (or keep them there, or take
    them off), each with when it is due."""
    session.execute(_SCHEDULE_SQL, {"ids": list(invoice_ids), "stale": settings.poll_stale_after_seconds,
                                    "recheck": settings.poll_recheck_seconds})


# Stale rows whose invoice Stripe told us about since they were scheduled (an event arrived)
# are put off without a read. Only due rows are looked at.
_PUT_OFF_SQL = text(
    """
    UPDATE marketplace_worker.stripe_invoice_reads r
    SET due_at = d.due_at, updated_at = now()
    FROM (
        SELECT r.invoice_id, """ + _DUE_SQL + """ AS due_at
        FROM marketplace_worker.stripe_invoice_reads r
        JOIN "Invoice" i ON i.id = r.invoice_id
        LEFT JOIN marketplace_worker.stripe_object_versions v ON v.object_id = i."stripeInvoiceId"
        WHERE r.reason = 'stale' AND r.attempts = 0 AND r.due_at <= now()
    ) d
    WHERE r.invoice_id = d.invoice_id AND d.due_at > now()
    """
)

_DUE_READS_SQL = text(
    """
    SELECT invoice_id, stripe_invoice_id FROM marketplace_worker.stripe_invoice_reads
    WHERE reason = :reason AND due_at <= now()
    ORDER BY due_at, invoice_id
    LIMIT :limit
    """
)

_READ_FAILED_SQL = text(
    """
    UPDATE marketplace_worker.stripe_invoice_reads
    SET attempts = attempts + 1, last_error = :error, updated_at = now(),
        due_at = now() + make_interval(secs => least(:cap, :base * power(2, attempts)))
    WHERE invoice_id = :invoice_id
    """
)


def due_reads(session: Session, settings: Settings) -> list[tuple[int, str]]:
    """(invoice id, Stripe id) of the reads due now, unlinked payments first, most
    overdue first, at most the run's budget."""
    limit = settings.poll_stripe_reads_per_run
    if not limit:
        return []
    session.execute(_PUT_OFF_SQL, {"stale": settings.poll_stale_after_seconds,
                                   "recheck": settings.poll_recheck_seconds})
    rows = []
    for reason in ("unlinked", "stale"):
        if len(rows) < limit:
            rows += session.execute(_DUE_READS_SQL, {"reason": reason, "limit": limit - len(rows)}).all()
    return [(row.invoice_id, row.stripe_invoice_id) for row in rows]


def read_failed(session: Session, invoice_id: int, error: str, settings: Settings) -> None:
    """A read that failed, was rate limited or did not get the link: due again after a
    backoff, never dropped."""
    session.execute(_READ_FAILED_SQL, {
        "invoice_id": invoice_id, "error": error[:500], "base": settings.poll_link_retry_base_seconds,
        "cap": settings.poll_stale_after_seconds,
    })


def read_invoice(client: stripe.StripeClient, stripe_id: str) -> tuple[dict, int]:
    """Stripe's invoice with its payments, and the time of the read: taken before the request,
    so the snapshot never outranks an event Stripe created while the read was in flight."""
    read_at = int(time.time())
    fetched = with_rate_limit_retry(
        lambda: client.v1.invoices.retrieve(stripe_id, {"expand": ["payments"]}), attempts=3)
    return fetched.to_dict(), read_at


def read_charge_of(client: stripe.StripeClient, payment_intent_id: str) -> str | None:
    """The succeeded charge of a PaymentIntent (current API versions name the PaymentIntent on
    the invoice's payment, not the charge)."""
    charges = with_rate_limit_retry(
        lambda: client.v1.charges.list({"payment_intent": payment_intent_id, "limit": 10}), attempts=3)
    paid = [c for c in charges.data if getattr(c, "status", None) == "succeeded"]
    return paid[0].id if paid else None


def refresh_from_stripe(
    session_factory: SessionFactory, client: stripe.StripeClient, settings: Settings, result: PollResult
) -> None:
    """Read what is due from Stripe (no lock held meanwhile) and apply each like a webhook."""
    with session_factory() as session:
        due = due_reads(session, settings)
    calls = 0
    for invoice_id, stripe_id in due:
        if calls >= settings.poll_stripe_reads_per_run:
            break  # the rest stays due for the next run
        try:
            calls += 1
            obj, read_at = read_invoice(client, stripe_id)
            with session_factory() as session:
                [outcome] = apply_invoice_snapshots(session, [Snapshot(obj, read_at, API_READ_EVENT_ID)])
                payment_intent_id = _payment_intent_without_charge(session, invoice_id)
            if payment_intent_id is not None:
                calls += 1
                charge_id = read_charge_of(client, payment_intent_id)
                if charge_id is not None:
                    with session_factory() as session:
                        apply_charge_link(session, invoice_id, charge_id, read_at, API_READ_EVENT_ID)
        except stripe.RateLimitError as error:
            log.warning("Stripe rate limit: reads left for the next poll")
            result.skipped["stripe_rate_limited"] += 1
            _failed(session_factory, invoice_id, error, settings)
            break
        except (stripe.StripeError, InvalidPayload, NotYetKnown) as error:
            log.warning("could not read invoice %s (app invoice %s) from Stripe: %s", stripe_id, invoice_id, error)
            result.skipped[_failure_kind(error)] += 1
            _failed(session_factory, invoice_id, error, settings)
            continue
        result.refreshed_from_stripe += 1
        result.count(outcome)
        with session_factory() as session:
            read_done(session, invoice_id, obj, settings)


def _failure_kind(error: BaseException) -> str:
    if isinstance(error, stripe.InvalidRequestError) and error.http_status == 404:
        return "stripe_not_found"
    return "stripe_error" if isinstance(error, stripe.StripeError) else "stripe_unappliable"


def _payment_intent_without_charge(session: Session, invoice_id: int) -> str | None:
    return session.execute(
        select(Invoice.stripePaymentIntentId)
        .where(Invoice.id == invoice_id, Invoice.stripeChargeId.is_(None), Invoice.status == "paid")
    ).scalar_one_or_none()


def read_done(session: Session, invoice_id: int, obj: dict, settings: Settings) -> None:
    """Reschedule an invoice after a read. Still draft/open: not read again before the recheck
    interval. Paid but still without its charge: a payment Stripe has no charge for (paid out
    of band) is taken off the list; any other is read again after a backoff."""
    schedule_reads(session, [invoice_id], settings)
    row = session.get(StripeInvoiceRead, invoice_id)
    if row is None:
        return
    if row.reason == "stale":
        row.attempts, row.last_error = 0, None
        row.due_at = max(row.due_at, datetime.now(UTC) + timedelta(seconds=settings.poll_recheck_seconds))
        return
    if payment_of_invoice(obj) == (None, None):
        log.info("Stripe invoice %s was paid without a charge (out of band); nothing to link", obj.get("id"))
        session.delete(row)
        return
    read_failed(session, invoice_id, "paid, but Stripe has no succeeded charge for its payment yet", settings)


def _failed(session_factory: SessionFactory, invoice_id: int, error: BaseException, settings: Settings) -> None:
    with session_factory() as session:
        read_failed(session, invoice_id, describe(error), settings)
