"""Stripe Connect payouts reconciliation (queue `reconciliation`); thin wrappers over
domain/connect/run.py.

`reconcile_all` (beat, nightly) and `reconcile_dirty` (beat, every few minutes: the accounts
named by transfer/payout events since) fan out one `reconcile_account` message per account,
so every worker consuming the queue takes a share. Each piece is recorded in
`marketplace_worker.fanout_items` before its message is published (domain/fanout.py), so a
broker that loses the messages loses no reconciliation: the fan-out sweeper re-enqueues them.
`reconcile_account` only reads from Stripe and is idempotent; while another worker holds the
same account it retries later.
"""

from __future__ import annotations

import logging
from functools import lru_cache

import stripe
from celery import shared_task

from config import get_settings
from domain.connect import run as connect_run
from domain.connect.reader import StripeReader, reader_for
from models.db import get_engine, session_scope
from tasks.base import LONGEST_TASK_SECONDS, job
from tasks.fanout import PieceTask, fan_out

log = logging.getLogger(__name__)

# A worker already reconciling the account will be done by then.
BUSY_RETRY_SECONDS = 60


@lru_cache(maxsize=1)
def _reader() -> StripeReader:
    # One per worker process, made after the fork: its HTTP sessions keep connections to
    # Stripe alive from one account to the next.
    return reader_for(get_settings())


RECONCILE_ACCOUNT = "tasks.reconciliation.reconcile_account"


@shared_task(
    name=RECONCILE_ACCOUNT,
    base=PieceTask,
    bind=True,
    autoretry_for=(stripe.APIConnectionError, stripe.APIError, stripe.RateLimitError),
    retry_backoff=30,
    retry_jitter=True,
    max_retries=5,
    soft_time_limit=1800,
    time_limit=LONGEST_TASK_SECONDS,
)
def reconcile_account(self, account: str, since: int | None = None) -> dict:
    """Reconcile one connected account; `since` (unix seconds) overrides its listing window."""
    settings = get_settings()
    result = connect_run.reconcile_account(
        session_scope, get_engine(), _reader(), account, grace=connect_run.transfer_grace(settings), since=since,
    )
    if result.skipped == "busy":
        raise self.retry(countdown=BUSY_RETRY_SECONDS)
    return {"skipped": result.skipped, "calls": result.calls, "completed": len(result.completed),
            "outcomes": dict(result.outcomes)}


def _fan_out(accounts: list[str], since: int | None = None) -> int:
    """One piece per account not already pending; returns how many were published."""
    return fan_out(RECONCILE_ACCOUNT, ((account, [account, since]) for account in accounts))


@job
def reconcile_all(since: int | None = None) -> dict:
    """Every account with activity, and transfers to accounts no provider has."""
    with session_scope() as session:
        accounts, unknown = connect_run.start_pass(session)
    return {"accounts": len(accounts), "enqueued": _fan_out(accounts, since), "unknown_destination": unknown}


@job
def reconcile_dirty() -> dict:
    """The accounts transfer and payout events named since they were last reconciled."""
    with session_scope() as session:
        accounts = connect_run.dirty_accounts(session)
    return {"accounts": len(accounts), "enqueued": _fan_out(accounts)}
