"""Invoice polling and completion (queue `polling`), run by beat; thin wrappers."""

from __future__ import annotations

import logging

from config import ConfigError, get_settings
from domain import completion, polling
from domain.jobs import run_once
from domain.stripe_api import get_client
from models.db import session_scope
from worker import app

log = logging.getLogger(__name__)


def stripe_client_or_none():
    """The poller still syncs the app's invoices without a Stripe key; it only skips Stripe reads."""
    try:
        return get_client()
    except ConfigError:
        return None


# Runs are bounded (POLL_MAX_INVOICES_PER_RUN, POLL_STRIPE_READS_PER_RUN) to end well within
# the 5-minute cadence; a longer one only delays the next slot (run_once skips overlaps).
@app.task(name="tasks.polling.poll_invoices", soft_time_limit=600, time_limit=660)
def poll_invoices() -> dict:
    with run_once("poll_invoices") as run:
        result = polling.poll_invoices(session_scope, stripe_client_or_none())
        run.counts = result.as_dict()
    return run.counts


@app.task(name="tasks.polling.complete_transactions", soft_time_limit=600, time_limit=660)
def complete_transactions() -> int:
    with run_once("complete_transactions") as run:
        completed = completion.complete_transactions(session_scope, get_settings().completion_hold_days)
        run.counts = {"completed": completed}
    return completed
