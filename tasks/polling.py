"""Invoice polling and completion (queue `polling`), run by beat; thin wrappers."""

from __future__ import annotations

from config import ConfigError, get_settings
from domain import completion, polling
from domain.stripe_api import get_client
from models.db import session_scope
from tasks.base import job


def stripe_client_or_none():
    """The poller still syncs the app's invoices without a Stripe key; it only skips Stripe reads."""
    try:
        return get_client()
    except ConfigError:
        return None


# Runs are bounded (POLL_MAX_INVOICES_PER_RUN, POLL_STRIPE_READS_PER_RUN) to end well within
# the 5-minute cadence; a longer one only delays the next slot (a job never overlaps itself).
@job(soft_time_limit=600, time_limit=660)
def poll_invoices() -> polling.PollResult:
    return polling.poll_invoices(session_scope, stripe_client_or_none())


@job(soft_time_limit=600, time_limit=660)
def complete_transactions() -> dict[str, int]:
    return {"completed": completion.complete_transactions(session_scope, get_settings().completion_hold_days)}
