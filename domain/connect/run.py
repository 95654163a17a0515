"""Stripe Connect payouts reconciliation (SPEC §5): one account's run, and the passes over
the accounts with activity.

For a `stripe_connect` provider, money reaches the provider in two hops: a transfer to the
connected account (`tr_...`, which creates a `py_...` payment there), then the account's
payout to its bank (`po_...`). The transfer comes from either fund flow: the platform's own
(separate charges and transfers, `providerPayoutCents`), or Stripe's for a destination charge
(`transfer_data.destination`: the whole charge, its application fee collected back from the
account). Reconciliation proves the second hop the way Stripe documents it: the transfer's
`destination_payment` appears as the `source` of a balance transaction inside a **paid**
automatic payout (`GET /v1/balance_transactions?payout=` with `Stripe-Account`). A payout that
failed or was canceled returns its money to the account's balance; the `payout_failure` /
`payout_cancel` balance transaction then rides in a later payout, which is followed to see the
money leave again. Stripe itemizes no manual payout: on an account on manual payouts the
transfer's money being available on the account (its `payment` balance transaction's
`available_on`) is what completes a transaction.

One account's run:
  1. takes a per-account advisory lock (two workers on one account: one does the work);
  2. lists, read-only and `limit=100`, the platform's transfers to the account (each with its
     source charge and application fee expanded) and the account's payouts created in the
     window (reader.py);
  3. stores them in the mirror (mirror.py), which webhook events also feed, so each listing
     only needs the window since the last, and matches the transfers that are new or matched
     nothing yet to the provider's transactions;
  4. reads what the mirror now calls for: the balance transactions of every finished
     automatic payout not listed before (a payout's contents never change); on manual payouts,
     the account's `payment` balance transactions not stored yet (`connect_payments`); the
     application fees of destination charges reversed since their fee was last read; and, when
     no standard payout tells whether the account is on manual payouts, its payout schedule;
  5. classifies, in SQL, every paid transaction of the provider (and the completed ones
     whose payout may still fail, whose transfer changed after a reversal, or with an open
     discrepancy), completes the paid-out ones (unless a dispute holds them), and upserts
     discrepancies (classify.py).

The run holds no database transaction open while it talks to Stripe. A pass over every
account with activity starts with `start_pass`: the worker's tasks fan its accounts out, the
command line reconciles them one after another (`reconcile_active`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import stripe
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session

from config import Settings
from domain import lifecycle
from domain.clock import from_unix
from domain.connect import mirror
from domain.connect.classify import (
    UNKNOWN_DESTINATION,
    AccountResult,
    Finding,
    classify_and_apply,
    match_transfers,
    resolve_unseen,
    upsert_findings,
)
from domain.connect.reader import StripeReader, list_transfers_and_payouts, read_after_store
from domain.errors import describe
from models import ConnectAccount, Provider
from models.db import SessionFactory

log = logging.getLogger(__name__)

DAY = 86_400
# Each listing reaches back this far before the previous one: an object Stripe created just
# before that listing may have become visible only after it.
OVERLAP_SECONDS = DAY
# An account's first run also reports transfers this old that match nothing.
FIRST_LOOKBACK_SECONDS = 35 * DAY
# A paid payout can still turn `failed` (Stripe: within 5 business days): payouts created
# this recently are listed on every run of the account, whatever its window.
PAYOUT_FAILURE_WINDOW_SECONDS = 14 * DAY


# --- planning a run ------------------------------------------------------------------------


@dataclass
class Plan:
    since: int  # transfers (and payouts) created at or after this are listed
    payouts_since: int
    covers_default_window: bool  # whether the listing may advance `listed_until`


def _provider_of(session: Session, account: str) -> int | None:
    return session.execute(
        select(Provider.id).where(
            Provider.stripeConnectAccountId == account, Provider.paymentMode == "stripe_connect"
        )
    ).scalar_one_or_none()


def _unix(naive_utc: datetime) -> int:
    return int(naive_utc.replace(tzinfo=UTC).timestamp())


def plan_run(session: Session, account: str, provider_id: int, since: int | None, now: int) -> Plan:
    """The listing window: from the previous listing (less an overlap), or on the first run
    from the oldest transaction still waiting for its payout (at least FIRST_LOOKBACK_SECONDS)."""
    state = session.get(ConnectAccount, account)
    if state is not None and state.listed_until is not None:
        default_since = state.listed_until - OVERLAP_SECONDS
    else:
        oldest_paid = session.execute(
            text('SELECT min(coalesce("paidAt", "createdAt")) FROM marketplace.transactions '
                 'WHERE "providerId" = :provider AND status = :paid'),
            {"provider": provider_id, "paid": lifecycle.PAID},
        ).scalar()
        default_since = min(_unix(oldest_paid) if oldest_paid else now, now - FIRST_LOOKBACK_SECONDS) - OVERLAP_SECONDS
    chosen = default_since if since is None else since
    # A payout still on its way changes status without a new `created`: list back to it.
    oldest_unsettled = session.execute(
        text("SELECT min(created) FROM marketplace_worker.connect_payouts "
             "WHERE account = :account AND status IN ('pending', 'in_transit')"),
        {"account": account},
    ).scalar()
    payouts_since = min(chosen, now - PAYOUT_FAILURE_WINDOW_SECONDS)
    if oldest_unsettled is not None:
        payouts_since = min(payouts_since, oldest_unsettled)
    return Plan(since=chosen, payouts_since=payouts_since, covers_default_window=chosen <= default_since)



# --- one account ---------------------------------------------------------------------------


def _lock_key(account: str) -> str:
    return f"marketplace_worker.reconcile:{account}"


def reconcile_account(
    session_factory: SessionFactory,
    engine: Engine,
    reader: StripeReader,
    account: str,
    *,
    grace: timedelta,
    since: int | None = None,
    now: int | None = None,
) -> AccountResult:
    """Reconcile one connected account (see the module docstring). Idempotent: a rerun with
    nothing new changes only `last_seen_at`."""
    now = int(time.time()) if now is None else now
    # The lock lives on its own autocommit connection: no transaction stays open while
    # Stripe answers, and the lock goes away with the connection if the worker dies.
    with engine.connect() as lock_conn:
        lock_conn = lock_conn.execution_options(isolation_level="AUTOCOMMIT")
        key = {"key": _lock_key(account)}
        if not lock_conn.execute(text("SELECT pg_try_advisory_lock(hashtextextended(:key, 0))"), key).scalar():
            return AccountResult(account, skipped="busy")
        try:
            with session_factory() as session:
                provider_id = _provider_of(session, account)
                if provider_id is None:
                    return AccountResult(account, skipped="no_provider")
                plan = plan_run(session, account, provider_id, since, now)
                # The database's clock, as the dirty marks carry it.
                started = session.execute(text("SELECT clock_timestamp()")).scalar_one()
                changed_since = _changed_since(session, account)
            calls_before = reader.calls
            listing = list_transfers_and_payouts(reader, account, plan.since, plan.payouts_since, now)
            def what_to_read(session: Session, mode: str) -> tuple[list[str], int | None, list]:
                return (mirror.payouts_to_itemize(session, account),
                        mirror.payments_since(session, account, provider_id) if mode == "manual" else None,
                        mirror.fees_to_read(session, account, changed_since))

            with session_factory() as session:
                mirror.store(session, listing)
                match_transfers(session, account, provider_id)
                mode = mirror.payout_mode(session, account)
                read_schedule = mode == "unknown" and mirror.schedule_read_due(session, account, provider_id,
                                                                         from_unix(now).replace(tzinfo=UTC))
                if not read_schedule:
                    to_read = what_to_read(session, mode)
            if read_schedule:
                try:
                    account_obj = reader.retrieve("accounts", account)
                except (stripe.InvalidRequestError, stripe.PermissionError) as error:
                    # Deauthorized or gone: the schedule stays unknown until the next read is due.
                    log.warning("payout schedule of %s not readable: %s", account, error.user_message,
                                extra={"account": account})
                    account_obj = {}
                with session_factory() as session:
                    mirror.store_schedule(session, account, account_obj)
                    mode = mirror.payout_mode(session, account)
                    to_read = what_to_read(session, mode)
            reads = read_after_store(reader, account, *to_read)
            with session_factory() as session:
                mirror.store(session, reads)
                result = classify_and_apply(session, account, provider_id, completed_since=plan.payouts_since,
                                            grace=grace, now=from_unix(now), payouts=mode,
                                            changed_since=changed_since, matched=True)
                _finish_state(session, account, now if plan.covers_default_window else None, started)
            result.calls = reader.calls - calls_before
        finally:
            lock_conn.execute(text("SELECT pg_advisory_unlock(hashtextextended(:key, 0))"), key)
    log.info("reconciled %s", result.describe(), extra={"account": account})
    return result


def _changed_since(session: Session, account: str) -> datetime:
    """Transfers changed after this are looked at again: the previous run's start, less an
    overlap (a change committed while it ran). The first run looks at all."""
    state = session.get(ConnectAccount, account)
    if state is None or state.last_reconciled_at is None:
        return datetime(1970, 1, 1, tzinfo=UTC)
    return state.last_reconciled_at - timedelta(seconds=OVERLAP_SECONDS)


def _finish_state(session: Session, account: str, listed_until: int | None, started: datetime) -> None:
    """Record how far the listing got, and clear the dirty mark unless an event came in after
    this run began (that event's account is then taken by the next pass)."""
    session.execute(
        text(
            """
            INSERT INTO marketplace_worker.connect_accounts AS a (account, listed_until, last_reconciled_at)
            VALUES (:account, :listed_until, now())
            ON CONFLICT (account) DO UPDATE SET
                listed_until = coalesce(excluded.listed_until, a.listed_until),
                last_reconciled_at = now(), updated_at = now(),
                dirty_at = CASE WHEN a.dirty_at <= :started THEN NULL ELSE a.dirty_at END
            """
        ),
        {"account": account, "listed_until": listed_until, "started": started},
    )



# --- the nightly pass -----------------------------------------------------------------------

_ACTIVE_ACCOUNTS = text(
    """
    SELECT p."stripeConnectAccountId" AS account
    FROM marketplace.providers p
    WHERE p."paymentMode" = 'stripe_connect' AND p."stripeConnectAccountId" IS NOT NULL
      AND (EXISTS (SELECT 1 FROM marketplace_worker.connect_accounts a
                   WHERE a.account = p."stripeConnectAccountId" AND a.dirty_at IS NOT NULL)
           OR EXISTS (SELECT 1 FROM marketplace.transactions t
                      WHERE t."providerId" = p.id AND t.status = :paid)
           OR EXISTS (SELECT 1 FROM marketplace_worker.reconcile_discrepancies d
                      WHERE d.account = p."stripeConnectAccountId" AND d.resolved_at IS NULL))
    ORDER BY 1
    """
)


def active_accounts(session: Session) -> list[str]:
    """Accounts with something to reconcile: news from events, paid transactions waiting for
    their payout, or open discrepancies to re-check."""
    return list(session.execute(_ACTIVE_ACCOUNTS, {"paid": lifecycle.PAID}).scalars())


_DIRTY_ACCOUNTS = text(
    """
    SELECT a.account FROM marketplace_worker.connect_accounts a
    WHERE a.dirty_at IS NOT NULL
      AND EXISTS (SELECT 1 FROM marketplace.providers p
                  WHERE p."stripeConnectAccountId" = a.account AND p."paymentMode" = 'stripe_connect')
    ORDER BY 1
    """
)


def dirty_accounts(session: Session) -> list[str]:
    """Accounts transfer or payout events named since their last reconciliation."""
    return list(session.execute(_DIRTY_ACCOUNTS).scalars())


_UNKNOWN_DESTINATIONS = text(
    """
    SELECT tr.id, tr.destination, tr.amount - tr.amount_reversed AS net, tr.currency
    FROM marketplace_worker.connect_transfers tr
    WHERE NOT EXISTS (SELECT 1 FROM marketplace.providers p
                      WHERE p."stripeConnectAccountId" = tr.destination AND p."paymentMode" = 'stripe_connect')
    ORDER BY tr.id
    """
)


def report_unknown_destinations(session: Session) -> tuple[int, int]:
    """Transfers the platform sent to accounts no `stripe_connect` provider has; returns
    (how many are open now, how many got resolved)."""
    findings = [
        Finding(kind=UNKNOWN_DESTINATION, subject=row.id, account=row.destination, seen_cents=row.net,
                currency=row.currency, transfer_ids=[row.id],
                detail=f"transfer to {row.destination}, which no stripe_connect provider has")
        for row in session.execute(_UNKNOWN_DESTINATIONS)
    ]
    upsert_findings(session, findings)
    return len(findings), resolve_unseen(session, (UNKNOWN_DESTINATION,), None, findings)


# --- reconciling accounts one after another ------------------------------------------------


def transfer_grace(settings: Settings) -> timedelta:
    """How long a paid transaction waits for its transfer before it is `missing_transfer`."""
    return timedelta(hours=settings.reconcile_transfer_grace_hours)


def start_pass(session: Session) -> tuple[list[str], int]:
    """Begin a pass over every account with activity: report the transfers to accounts no
    stripe_connect provider has; returns the accounts to reconcile and how many such transfers
    are open."""
    accounts = active_accounts(session)
    unknown, _ = report_unknown_destinations(session)
    return accounts, unknown


@dataclass
class Reconciled:
    """Accounts reconciled one after another."""

    results: list[AccountResult] = field(default_factory=list)
    unknown_destination: int | None = None  # open transfers to no provider's account (a pass only)
    failed: dict[str, str] = field(default_factory=dict)  # account -> its error (a pass only)

    def counts(self) -> dict[str, Any]:
        return {"accounts": len(self.results), "unknown_destination": self.unknown_destination,
                "failed": len(self.failed)}

    def describe(self) -> str:
        totals: Counter = Counter()
        for result in self.results:
            totals.update(result.outcomes)
        outcomes = ", ".join(f"{kind} {n}" for kind, n in sorted(totals.items())) or "nothing to reconcile"
        failed = f"; {len(self.failed)} account(s) failed" if self.failed else ""
        return (f"reconciled {len(self.results)} account(s) with {sum(r.calls for r in self.results)} Stripe "
                f"call(s): {outcomes}; completed {sum(len(r.completed) for r in self.results)}{failed}")


def reconcile_accounts(session_factory: SessionFactory, engine: Engine, reader: StripeReader, accounts: list[str],
                       *, settings: Settings, since: int | None = None, keep_going: bool = False,
                       progress: Callable[[int, int], None] | None = None) -> Reconciled:
    """Reconcile each account in turn with the settings' transfer grace; `progress(done, total)`
    after each account. With `keep_going`, an account that fails (its access revoked, Stripe
    failing for it) is recorded in `failed` and the others go on; else its error propagates."""
    grace = transfer_grace(settings)
    done = Reconciled()
    for n, account in enumerate(accounts, 1):
        try:
            done.results.append(reconcile_account(session_factory, engine, reader, account, grace=grace,
                                                  since=since))
        except Exception as error:
            if not keep_going:
                raise
            log.warning("account %s not reconciled: %s", account, describe(error), extra={"account": account})
            done.failed[account] = describe(error)
        if progress is not None:
            progress(n, len(accounts))
    return done


def reconcile_active(session_factory: SessionFactory, engine: Engine, reader: StripeReader, *,
                     settings: Settings, since: int | None = None,
                     progress: Callable[[int, int], None] | None = None) -> Reconciled:
    """A whole pass in this process: every account with activity, one after another."""
    with session_factory() as session:
        accounts, unknown = start_pass(session)
    done = reconcile_accounts(session_factory, engine, reader, accounts, settings=settings, since=since,
                              keep_going=True, progress=progress)
    done.unknown_destination = unknown
    return done
