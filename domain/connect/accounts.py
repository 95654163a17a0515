"""Connected accounts' status on their provider (SPEC §5): `stripeConnectOnboardingComplete`
(details submitted and charges enabled) and `stripeConnectPayoutsEnabled` follow the newest
snapshot of the account, from `account.updated`, `account.application.deauthorized` or an
API read.

Snapshots are ordered by Stripe's `created`, which has one-second resolution, and onboarding
sends several `account.updated` in one second: their order is unknown, and the random event
id must not decide which one stays. So a tie is applied provisionally (the larger id, so
every delivery order ends the same) and recorded on a durable to-do,
`connect_account_states.read_after`; `read_accounts` (run by the events catch-up) then reads
the account with `GET /v1/accounts/{id}`, outside any event's transaction, and applies what
Stripe says as a snapshot timestamped from before the request was sent. That read outranks
every event of an earlier second; an event of a later second outranks it (its snapshot was
taken after the read started); an event of the same second ties again and asks for another
read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import stripe
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from domain.clock import utcnow
from domain.stripe_api import with_rate_limit_retry
from domain.versions import API_READ_ID
from models import Provider
from models.db import SessionFactory

log = logging.getLogger(__name__)

# API reads of tied accounts per catch-up run; the rest wait for the next run.
READS_PER_RUN = 100
# A failed read is retried after this, doubling per failure, at most READ_RETRY_MAX_SECONDS.
READ_RETRY_BASE_SECONDS = 60
READ_RETRY_MAX_SECONDS = 6 * 3600


@dataclass(frozen=True)
class AccountSnapshot:
    onboarding_complete: bool
    payouts_enabled: bool
    deauthorized: bool = False


DEAUTHORIZED = AccountSnapshot(onboarding_complete=False, payouts_enabled=False, deauthorized=True)


def snapshot_of(account: dict[str, Any]) -> AccountSnapshot:
    """What the provider keeps of a Stripe Account object."""
    return AccountSnapshot(
        onboarding_complete=account.get("details_submitted") is True and account.get("charges_enabled") is True,
        payouts_enabled=account.get("payouts_enabled") is True,
    )


_LOCK_VERSION = text(
    "SELECT event_created, event_id FROM marketplace_worker.stripe_object_versions "
    "WHERE object_id = :account FOR UPDATE"
)
_WRITE_VERSION = text(
    """
    INSERT INTO marketplace_worker.stripe_object_versions
        (object_id, object_type, event_created, rank, event_id, updated_at)
    VALUES (:account, 'account', :created, 0, :version_id, now())
    ON CONFLICT (object_id) DO UPDATE
        SET event_created = excluded.event_created, rank = 0, event_id = excluded.event_id, updated_at = now()
    """
)
_SET_DEAUTHORIZED = text(
    """
    INSERT INTO marketplace_worker.connect_account_states AS s (account, deauthorized)
    VALUES (:account, :deauthorized)
    ON CONFLICT (account) DO UPDATE SET deauthorized = excluded.deauthorized, updated_at = now()
        WHERE s.deauthorized IS DISTINCT FROM excluded.deauthorized
    """
)
_REQUEST_READ = text(
    """
    INSERT INTO marketplace_worker.connect_account_states AS s (account, read_after)
    VALUES (:account, :second)
    ON CONFLICT (account) DO UPDATE
        SET read_after = greatest(s.read_after, excluded.read_after), read_retry_at = NULL, updated_at = now()
    """
)


def sync_account(
    session: Session, account: str, snapshot: AccountSnapshot, *, created: int, version_id: str
) -> str:
    """Apply a snapshot of `account` (an event's, or an API read's with API_READ_ID) when it is
    the newest; returns what happened: updated, unchanged, stale, tie, unknown_account."""
    provider = session.execute(
        select(Provider).where(Provider.stripeConnectAccountId == account).with_for_update()
    ).scalar_one_or_none()
    if provider is None:
        log.warning("account snapshot for %s, which no provider has; nothing changed", account,
                    extra={"account": account, "event_id": version_id})
        return "unknown_account"
    newest = session.execute(_LOCK_VERSION, {"account": account}).first()
    if newest is not None and (newest.event_created > created or (newest.event_created, newest.event_id) == (
        created, version_id
    )):
        return "stale"
    tie = newest is not None and newest.event_created == created
    if tie and _kept(session, provider, account) == snapshot:
        return "unchanged"  # whichever of the two is newer, the provider ends the same
    if tie:
        session.execute(_REQUEST_READ, {"account": account, "second": created})
        log.info("two snapshots of %s in second %d: the account will be read from Stripe", account, created,
                 extra={"account": account, "event_id": version_id})
        if version_id < newest.event_id:
            return "tie"
    session.execute(_WRITE_VERSION, {"account": account, "created": created, "version_id": version_id})
    session.execute(_SET_DEAUTHORIZED, {"account": account, "deauthorized": snapshot.deauthorized})
    if (provider.stripeConnectOnboardingComplete, provider.stripeConnectPayoutsEnabled) == (
        snapshot.onboarding_complete, snapshot.payouts_enabled
    ):
        return "tie" if tie else "unchanged"
    provider.stripeConnectOnboardingComplete = snapshot.onboarding_complete
    provider.stripeConnectPayoutsEnabled = snapshot.payouts_enabled
    provider.updatedAt = utcnow()
    log.info("provider %s Connect flags: onboarding complete %s, payouts enabled %s", provider.id,
             snapshot.onboarding_complete, snapshot.payouts_enabled,
             extra={"account": account, "provider_id": provider.id})
    return "tie" if tie else "updated"


def _kept(session: Session, provider: Provider, account: str) -> AccountSnapshot:
    deauthorized = session.execute(
        text("SELECT deauthorized FROM marketplace_worker.connect_account_states WHERE account = :account"),
        {"account": account},
    ).scalar()
    return AccountSnapshot(bool(provider.stripeConnectOnboardingComplete), bool(provider.stripeConnectPayoutsEnabled),
                           deauthorized is True)


# --- the to-do of API reads ----------------------------------------------------------------

_DUE_READS = text(
    """
    SELECT account, read_after FROM marketplace_worker.connect_account_states
    WHERE read_after IS NOT NULL AND (read_retry_at IS NULL OR read_retry_at <= now())
    ORDER BY updated_at, account
    LIMIT :limit
    """
)
# A read settles the ties of the seconds before it was sent; a tie recorded meanwhile stays.
_SETTLED = text(
    """
    UPDATE marketplace_worker.connect_account_states
    SET read_after = NULL, read_attempts = 0, read_error = NULL, read_retry_at = NULL, updated_at = now()
    WHERE account = :account AND read_after < :read_at
    """
)
_READ_FAILED = text(
    """
    UPDATE marketplace_worker.connect_account_states
    SET read_attempts = read_attempts + 1, read_error = :error, updated_at = now(),
        read_retry_at = now() + make_interval(secs => least(:cap, :base * power(2, least(read_attempts, 20))))
    WHERE account = :account
    """
)


@dataclass
class AccountReads:
    read: int = 0
    applied: dict[str, str] = field(default_factory=dict)  # account -> sync_account's outcome
    failed: dict[str, str] = field(default_factory=dict)  # account -> error


def read_accounts(session_factory: SessionFactory, client: stripe.StripeClient, *,
                  limit: int = READS_PER_RUN, clock: Callable[[], float] = time.time) -> AccountReads:
    """Read the accounts whose snapshots tied and apply what Stripe says. A failed read is
    logged and retried later with backoff; the to-do is never dropped."""
    result = AccountReads()
    with session_factory() as session:
        due = session.execute(_DUE_READS, {"limit": limit}).all()
    for account, read_after in due:
        read_at = int(clock())  # before the request: the read reflects every earlier second
        if read_at <= read_after:
            continue  # the tie is in this very second: a read now could tie again
        try:
            obj = with_rate_limit_retry(lambda: client.v1.accounts.retrieve(account)).to_dict()
        except stripe.AuthenticationError:
            raise  # the platform's key: no read can succeed
        except stripe.StripeError as error:
            message = f"{type(error).__name__}: {error.user_message or error}"
            log.warning("reading account %s failed: %s", account, message, extra={"account": account})
            result.failed[account] = message
            with session_factory() as session:
                session.execute(_READ_FAILED, {"account": account, "error": message[:500],
                                               "base": READ_RETRY_BASE_SECONDS, "cap": READ_RETRY_MAX_SECONDS})
            continue
        result.read += 1
        with session_factory() as session:
            result.applied[account] = sync_account(session, account, snapshot_of(obj), created=read_at,
                                                   version_id=API_READ_ID)
            session.execute(_SETTLED, {"account": account, "read_at": read_at})
    return result
