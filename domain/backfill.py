"""Backfill from Stripe's history: the ledger of what happened before the worker was installed,
or longer ago than the 30 days of events Stripe keeps, read from Stripe's list endpoints
(`marketplace-worker backfill --since DATE [--account ACCT]`).

What is read, and how it is applied:
- the platform's invoices created since the date, each with its payments
  (`expand[]=data.payments`), then its charges, refunds and disputes; every object goes
  through the function its webhook goes through (domain/invoice_mirror.py,
  domain/payments.py), so the ledger is the one the events would have built. What no handled
  event would record is left out the same way: a charge that did not succeed (there is no
  `charge.failed` handler), an invoice payment that is not paid (only `invoice_payment.paid`
  is handled; an open or canceled payment's PaymentIntent never paid the invoice);
- then, for each connected account of a `stripe_connect` provider (not deauthorized), its
  transfers (with their reversals), payouts and payout contents, by one reconciliation of the
  account from the date (`reconcile_account(..., since=...)`), which matches them
  and completes what was paid out. Accounts wait for the platform streams: transfers are
  matched by the charge those streams link.

Each platform page is stamped as an API read: the time taken before its request, and the
event id `api_read`, so an event Stripe created while the page was in flight (or after) always
wins, and applying a page twice changes nothing.

Resuming. Each stream (and each account) has a cursor in `marketplace_worker.backfill_cursors`,
saved in the transaction that applies its page: the last object applied, as Stripe's
`starting_after`. A rerun with the same date asks Stripe for no page it has applied, and skips
streams and accounts that are done; a run with another date starts every stream it runs over
(a position is only meaningful within the listing it was taken from; applying again is
harmless). An account is one unit: its reconciliation stores nothing until it has listed all
its pages, so an interrupted account is listed again.

Failures. A platform stream's Stripe error stops that stream (its cursor keeps its place) and
the others go on; the accounts then wait for a rerun. One account's error (a 403 of an account
that left, a 429 past the backoff) is recorded on its cursor and the others go on. Only a 401,
the platform's own key, stops the run.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import stripe
from sqlalchemy import text
from sqlalchemy.orm import Session

from config import Settings, get_settings
from domain import catchup
from domain.connect.classify import AccountResult
from domain.connect.reader import StripeReader, reader_for
from domain.connect.run import reconcile_account, transfer_grace
from domain.errors import InvalidPayload, NotYetKnown, describe
from domain.invoice_mirror import Snapshot, apply_invoice_snapshots
from domain.ledger import Outcome
from domain.payments import apply_charge, apply_dispute, apply_invoice_payment, apply_refund
from domain.polling import API_READ_EVENT_ID
from domain.stripe_api import with_rate_limit_retry
from models.db import SessionFactory

log = logging.getLogger(__name__)

PLATFORM = "platform"
CONNECT = "connect"
# The platform's streams, in the order they run. Any order would give the same ledger (a fact
# recorded before its invoice is linked is counted when the link comes); this one links each
# invoice before its refunds arrive, so they are counted at once.
PLATFORM_STREAMS = ("invoices", "charges", "refunds", "disputes")
PAGE_SIZE = 100

_LOCK_KEY = "marketplace_worker.backfill"


class BackfillBusy(Exception):
    """Another backfill holds the lock: two would fight over the cursors."""


@dataclass(frozen=True)
class Progress:
    """A page applied: its stream, scope (`platform` or the account), and the stream's totals."""

    stream: str
    scope: str
    pages: int
    objects: int


@dataclass
class BackfillResult:
    since: int
    calls: int = 0  # Stripe requests of this run
    pages: int = 0  # pages applied by this run
    objects: Counter = field(default_factory=Counter)  # per stream, applied by this run
    skipped: Counter = field(default_factory=Counter)  # "<stream>: <reason>" -> objects
    done: list[str] = field(default_factory=list)  # "<stream> <scope>" finished by this run
    already_done: list[str] = field(default_factory=list)  # finished by an earlier run
    accounts: list[AccountResult] = field(default_factory=list)
    deauthorized: list[str] = field(default_factory=list)  # accounts not listed
    failed: dict[str, str] = field(default_factory=dict)  # "<stream> <scope>" -> error
    waiting: str | None = None  # why the accounts were not backfilled by this run

    @property
    def complete(self) -> bool:
        return not self.failed and self.waiting is None

    def counts(self) -> dict[str, Any]:
        return {"calls": self.calls, "pages": self.pages, "objects": dict(self.objects),
                "accounts": len(self.accounts), "failed": len(self.failed), "skipped": dict(self.skipped)}


# --- cursors -------------------------------------------------------------------------------

_CURSOR = text(
    """
    INSERT INTO marketplace_worker.backfill_cursors AS c (stream, scope, since)
    VALUES (:stream, :scope, :since)
    ON CONFLICT (stream, scope) DO UPDATE SET
        since = excluded.since, starting_after = NULL, last_created = NULL, pages = 0, objects = 0,
        done_at = NULL, last_error = NULL, updated_at = now()
        WHERE c.since <> excluded.since OR :restart
    """
)
_READ_CURSOR = text(
    "SELECT starting_after, last_created, pages, objects, done_at FROM marketplace_worker.backfill_cursors "
    "WHERE stream = :stream AND scope = :scope"
)
_PAGE_DONE = text(
    """
    UPDATE marketplace_worker.backfill_cursors
    SET starting_after = coalesce(:starting_after, starting_after),
        last_created = coalesce(:last_created, last_created),
        pages = pages + 1, objects = objects + :objects, last_error = NULL, updated_at = now(),
        done_at = CASE WHEN :done THEN now() END
    WHERE stream = :stream AND scope = :scope
    RETURNING pages, objects
    """
)
_FAILED = text(
    "UPDATE marketplace_worker.backfill_cursors SET last_error = :error, updated_at = now() "
    "WHERE stream = :stream AND scope = :scope"
)


@dataclass
class Cursor:
    stream: str
    scope: str
    starting_after: str | None
    last_created: int | None
    pages: int
    objects: int
    done: bool


def open_cursor(session: Session, stream: str, scope: str, since: int, *, restart: bool = False) -> Cursor:
    """The stream's cursor for a run from `since`: where the last run with that date got to;
    from the start when it had another date (or with `restart`)."""
    params = {"stream": stream, "scope": scope}
    session.execute(_CURSOR, {**params, "since": since, "restart": restart})
    row = session.execute(_READ_CURSOR, params).one()
    return Cursor(stream, scope, row.starting_after, row.last_created, row.pages, row.objects,
                  row.done_at is not None)


def cursors(session: Session) -> list[Any]:
    """Every stream's cursor, for operators."""
    return list(session.execute(text(
        "SELECT stream, scope, since, pages, objects, done_at, last_error FROM marketplace_worker.backfill_cursors "
        "ORDER BY stream <> 'invoices', stream, scope")))


def _page_done(session: Session, cursor: Cursor, last: dict[str, Any] | None, count: int, done: bool) -> None:
    row = session.execute(_PAGE_DONE, {
        "stream": cursor.stream, "scope": cursor.scope, "objects": count, "done": done,
        "starting_after": last["id"] if last else None, "last_created": last.get("created") if last else None,
    }).one()
    cursor.pages, cursor.objects, cursor.done = row.pages, row.objects, done
    if last:
        cursor.starting_after, cursor.last_created = last["id"], last.get("created")


def _record_failure(session_factory: SessionFactory, cursor: Cursor, error: str) -> None:
    with session_factory() as session:
        session.execute(_FAILED, {"stream": cursor.stream, "scope": cursor.scope, "error": error[:500]})


# --- the platform's streams ----------------------------------------------------------------


def _list_page(client: stripe.StripeClient, stream: str, since: int, cursor: Cursor) -> tuple[Any, int]:
    """One page of the stream after the cursor, and the time taken before its request."""
    service = getattr(client.v1, stream)
    params: dict[str, Any] = {"limit": PAGE_SIZE, "created": {"gte": since}}
    if stream == "invoices":
        params["expand"] = ["data.payments"]
    if cursor.starting_after:
        params["starting_after"] = cursor.starting_after
    read_at = int(time.time())
    try:
        return with_rate_limit_retry(lambda: service.list(params)), read_at
    except stripe.InvalidRequestError as error:
        if not cursor.starting_after or error.param != "starting_after":
            raise
    # The last object applied is gone (a draft invoice can be deleted): carry on from its
    # second instead. What that second holds is applied again, which changes nothing.
    log.warning("backfill %s: %s is gone from Stripe; resuming from its second", stream, cursor.starting_after)
    params.pop("starting_after")
    params["created"] = {"gte": since, "lte": cursor.last_created}
    read_at = int(time.time())
    return with_rate_limit_retry(lambda: service.list(params)), read_at


def _paid_payments(client: stripe.StripeClient, invoice: dict[str, Any], result: BackfillResult) -> None:
    """Keep only the invoice's paid payments (what `invoice_payment.paid` would tell), listing
    them apart when the invoice carries more than its first page."""
    payments = invoice.get("payments")
    if not isinstance(payments, dict):
        return
    data = payments.get("data") or []
    if payments.get("has_more"):
        data, after = [], None
        while True:
            params: dict[str, Any] = {"invoice": invoice["id"], "status": "paid", "limit": PAGE_SIZE}
            if after:
                params["starting_after"] = after
            page = with_rate_limit_retry(lambda p=params: client.v1.invoice_payments.list(p))
            result.calls += 1
            data += [p.to_dict() for p in page.data]
            if not page.has_more or not page.data:
                break
            after = page.data[-1].id
    invoice["payments"] = {**payments, "has_more": False,
                           "data": [p for p in data if isinstance(p, dict) and p.get("status") == "paid"]}


def _apply_invoices(session: Session, objs: list[dict[str, Any]], read_at: int) -> list[Outcome]:
    outcomes = apply_invoice_snapshots(session, [Snapshot(obj, read_at, API_READ_EVENT_ID) for obj in objs])
    for obj in objs:
        # Recorded as `invoice_payment.paid` would record it (the snapshot has linked it).
        for payment in (obj.get("payments") or {}).get("data") or []:
            apply_invoice_payment(session, payment, read_at, API_READ_EVENT_ID)
    return outcomes


def _one_by_one(fn: Callable[[Session, dict[str, Any], int, str], Outcome]):
    def apply(session: Session, objs: list[dict[str, Any]], read_at: int) -> list[Outcome]:
        return [fn(session, obj, read_at, API_READ_EVENT_ID) for obj in objs]
    return apply


_APPLY: dict[str, Callable[[Session, list[dict[str, Any]], int], list[Outcome]]] = {
    "invoices": _apply_invoices,
    "charges": _one_by_one(apply_charge),
    "refunds": _one_by_one(apply_refund),
    "disputes": _one_by_one(apply_dispute),
}


def _wanted(stream: str, obj: dict[str, Any]) -> bool:
    # Only `charge.succeeded` and `charge.refunded` are handled: a failed or pending charge
    # would otherwise fill an invoice's charge id with a payment that did not pay it.
    return stream != "charges" or obj.get("status") == "succeeded"


def _apply_page(session: Session, stream: str, objs: list[dict[str, Any]], read_at: int,
                result: BackfillResult) -> None:
    """Apply a page in one transaction; an object that cannot be applied (its app invoice not
    committed yet, a malformed payload) is counted and left, and the rest applied."""
    apply = _APPLY[stream]
    try:
        with session.begin_nested():
            outcomes = apply(session, objs, read_at)
    except (InvalidPayload, NotYetKnown):
        outcomes = []
        for obj in objs:
            try:
                with session.begin_nested():
                    outcomes += apply(session, [obj], read_at)
            except (InvalidPayload, NotYetKnown) as error:
                log.warning("backfill %s: %s not applied: %s", stream, obj.get("id"), describe(error))
                result.skipped[f"{stream}: {type(error).__name__}"] += 1
    for outcome in outcomes:
        if outcome.skipped:
            result.skipped[f"{stream}: {outcome.skipped}"] += 1


def backfill_stream(session_factory: SessionFactory, client: stripe.StripeClient, stream: str, since: int,
                    result: BackfillResult, *, restart: bool = False,
                    on_page: Callable[[Progress], None] | None = None) -> None:
    """List one platform stream from its cursor to the end, applying and saving page by page."""
    with session_factory() as session:
        cursor = open_cursor(session, stream, PLATFORM, since, restart=restart)
    if cursor.done:
        result.already_done.append(f"{stream} {PLATFORM}")
        return
    while True:
        try:
            page, read_at = _list_page(client, stream, since, cursor)
            result.calls += 1
            objs = [obj.to_dict() for obj in page.data]
            wanted = [obj for obj in objs if _wanted(stream, obj)]
            if stream == "invoices":
                for obj in wanted:
                    _paid_payments(client, obj, result)
        except stripe.AuthenticationError:
            raise
        except stripe.StripeError as error:
            message = f"{type(error).__name__}: {error.user_message or error}"
            log.warning("backfill of %s stopped after page %d: %s", stream, cursor.pages, message)
            result.failed[f"{stream} {PLATFORM}"] = message
            _record_failure(session_factory, cursor, message)
            return
        done = not page.has_more or not objs
        with session_factory() as session:
            _apply_page(session, stream, wanted, read_at, result)
            _page_done(session, cursor, objs[-1] if objs else None, len(wanted), done)
        result.pages += 1
        result.objects[stream] += len(wanted)
        if on_page:
            on_page(Progress(stream, PLATFORM, cursor.pages, cursor.objects))
        if done:
            result.done.append(f"{stream} {PLATFORM}")
            return


# --- connected accounts --------------------------------------------------------------------


def backfill_account(session_factory: SessionFactory, reader: StripeReader, account: str, since: int,
                     result: BackfillResult, *, grace: timedelta, restart: bool = False,
                     on_page: Callable[[Progress], None] | None = None) -> None:
    """An account's transfers, reversals and payouts since `since`, by one reconciliation."""
    with session_factory() as session:
        cursor = open_cursor(session, CONNECT, account, since, restart=restart)
        engine = session.get_bind()
    if cursor.done:
        result.already_done.append(f"{CONNECT} {account}")
        return
    calls_before = reader.calls
    try:
        outcome = reconcile_account(session_factory, engine, reader, account, grace=grace, since=since)
        error = {"busy": "another reconciliation of the account is running",
                 "no_provider": "no stripe_connect provider has this account"}.get(outcome.skipped or "")
    except stripe.AuthenticationError:
        raise
    except (stripe.StripeError, InvalidPayload) as failure:
        outcome, error = None, describe(failure)
    finally:
        result.calls += reader.calls - calls_before
    if error is not None:
        log.warning("backfill of %s failed, the others go on: %s", account, error, extra={"account": account})
        result.failed[f"{CONNECT} {account}"] = error
        _record_failure(session_factory, cursor, error)
        return
    result.accounts.append(outcome)
    with session_factory() as session:
        _page_done(session, cursor, None, sum(outcome.outcomes.values()), True)
    result.pages += 1
    result.done.append(f"{CONNECT} {account}")
    if on_page:
        on_page(Progress(CONNECT, account, cursor.pages, cursor.objects))


# --- a run ---------------------------------------------------------------------------------


def backfill(
    session_factory: SessionFactory,
    client: stripe.StripeClient,
    *,
    since: int,
    account: str | None = None,
    restart: bool = False,
    on_page: Callable[[Progress], None] | None = None,
    settings: Settings | None = None,
) -> BackfillResult:
    """Backfill the platform's streams then every connected account (or, with `account`, that
    account only) from `since` (unix seconds), resuming where the last run with that date got
    to. Raises BackfillBusy when another backfill is running."""
    settings = settings or get_settings()
    result = BackfillResult(since=since)
    with session_factory() as session:
        engine = session.get_bind()
    # The lock lives on its own autocommit connection, released with it if the process dies.
    with engine.connect() as lock_conn:
        lock_conn = lock_conn.execution_options(isolation_level="AUTOCOMMIT")
        key = {"key": _LOCK_KEY}
        if not lock_conn.execute(text("SELECT pg_try_advisory_lock(hashtextextended(:key, 0))"), key).scalar():
            raise BackfillBusy("another backfill is running")
        try:
            _run(session_factory, client, result, account=account, restart=restart, on_page=on_page,
                 settings=settings)
        finally:
            lock_conn.execute(text("SELECT pg_advisory_unlock(hashtextextended(:key, 0))"), key)
    log.info("backfill from %s: %s", since, result.counts())
    return result


def _run(session_factory: SessionFactory, client: stripe.StripeClient, result: BackfillResult, *,
         account: str | None, restart: bool, on_page: Callable[[Progress], None] | None,
         settings: Settings) -> None:
    since = result.since
    if account is None:
        for stream in PLATFORM_STREAMS:
            backfill_stream(session_factory, client, stream, since, result, restart=restart, on_page=on_page)
        platform_failed = sorted(k for k in result.failed if k.endswith(f" {PLATFORM}"))
        if platform_failed:
            result.waiting = f"{platform_failed[0]} did not finish"
            return
        with session_factory() as session:
            accounts = catchup.connect_accounts(session)
            result.deauthorized = _deauthorized(session)
    else:
        with session_factory() as session:
            if catchup.is_deauthorized(session, account):
                result.deauthorized = [account]
                return
        accounts = [account]
    reader = reader_for(settings, client)
    grace = transfer_grace(settings)
    for acct in accounts:
        backfill_account(session_factory, reader, acct, since, result, grace=grace, restart=restart,
                         on_page=on_page)


def _deauthorized(session: Session) -> list[str]:
    return list(session.execute(text(
        """
        SELECT p."stripeConnectAccountId" FROM marketplace.providers p
        JOIN marketplace_worker.connect_account_states s ON s.account = p."stripeConnectAccountId"
        WHERE p."paymentMode" = 'stripe_connect' AND s.deauthorized
        ORDER BY 1
        """
    )).scalars())
