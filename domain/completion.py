"""Completion for `manual` and `stripe` providers (SPEC §3): a `paid` transaction becomes
`completed` once COMPLETION_HOLD_DAYS have passed since payment, with nothing refunded, no
dispute holding it, and its payment linked to its charge (until then its refunds are unknown).
(`stripe_connect` transactions complete in reconciliation, when their transfer is inside a paid
payout.)

Set-based, in batches of transaction rows locked FOR UPDATE SKIP LOCKED: completion locks
nothing but transaction rows, so it never waits on an event handler that holds an invoice,
and a row a handler holds is simply left for the next run.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import bindparam, text
from sqlalchemy.orm import Session

from domain import lifecycle
from domain.clock import utcnow
from domain.stats_touch import touch_providers
from models.db import SessionFactory

log = logging.getLogger(__name__)

BATCH_SIZE = 500

_COMPLETE_SQL = text(
    """
    WITH due AS (
        SELECT t.id
        FROM marketplace.transactions t
        JOIN marketplace.providers p ON p.id = t."providerId"
        JOIN "Invoice" i ON i.id = t."invoiceId"
        WHERE t.status = :paid AND p."paymentMode" IN ('manual', 'stripe')
          AND t."paidAt" <= :paid_before
          AND NOT EXISTS (
              SELECT 1 FROM marketplace_worker.transaction_refunds r WHERE r.transaction_id = t.id)
          -- a payment not yet linked to its charge may have refunds and disputes recorded
          -- against it that are not counted yet
          AND NOT EXISTS (
              SELECT 1 FROM marketplace_worker.stripe_invoice_reads u
              WHERE u.invoice_id = t."invoiceId" AND u.reason = 'unlinked')
          AND NOT EXISTS (
              SELECT 1 FROM marketplace_worker.stripe_disputes d
              WHERE (d.charge_id = i."stripeChargeId" OR d.payment_intent_id = i."stripePaymentIntentId")
                AND d.status NOT IN :settled)
        ORDER BY t.id
        LIMIT :batch
        FOR UPDATE OF t SKIP LOCKED
    )
    UPDATE marketplace.transactions t
    SET status = :completed, "completedAt" = :now
    FROM due
    WHERE t.id = due.id AND t.status = :paid
    RETURNING t.id, t."providerId"
    """
).bindparams(bindparam("settled", expanding=True))


def complete_batch(session: Session, hold_days: int, now: datetime | None = None, batch: int = BATCH_SIZE) -> int:
    """Complete up to `batch` due transactions; returns how many."""
    now = now or utcnow()
    rows = session.execute(
        _COMPLETE_SQL,
        {
            "paid": lifecycle.PAID, "completed": lifecycle.COMPLETED, "now": now,
            "paid_before": now - timedelta(days=hold_days), "settled": list(lifecycle.DISPUTE_SETTLED), "batch": batch,
        },
    ).all()
    touch_providers(session, [row.providerId for row in rows])
    return len(rows)


def complete_transactions(session_factory: SessionFactory, hold_days: int, batch: int = BATCH_SIZE) -> int:
    """Complete every due transaction, one short database transaction per batch."""
    total = 0
    while True:
        with session_factory() as session:
            done = complete_batch(session, hold_days, batch=batch)
        total += done
        if done < batch:
            break
    if total:
        log.info("completed %d transactions after the %d-day hold", total, hold_days)
    return total
