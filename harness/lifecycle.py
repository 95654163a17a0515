"""The transaction lifecycle tests' plumbing: store Stripe events in the inbox, process them
as the event task does (without Celery), and read back everything the worker derived."""

from __future__ import annotations

import json

from sqlalchemy import text
from sqlalchemy.orm import Session

from domain import dispatch
from domain.inbox import INSERT_EVENTS_SQL, event_from_dict, insert_params
from models.db import session_scope


def store(session: Session, *events: dict, endpoint: str = "platform") -> list[str]:
    """Insert events into the inbox as the receiver would, and commit; returns their ids."""
    incoming = [event_from_dict(e, json.dumps(e), endpoint, livemode=False) for e in events]
    session.connection().exec_driver_sql(INSERT_EVENTS_SQL, insert_params(incoming))
    session.commit()
    return [e["id"] for e in events]


def run(event_id: str, max_attempts: int = 5) -> str:
    """What tasks.events.process_event does, minus Celery."""
    return dispatch.attempt_event(session_scope, event_id, max_attempts=max_attempts).outcome


def run_batch(event_ids: list[str], max_attempts: int = 5) -> dict[str, str]:
    """What tasks.events.process_events does with one message of ids, minus Celery."""
    attempts = dispatch.attempt_batch(session_scope, event_ids, max_attempts=max_attempts)
    return {event_id: attempt.outcome for event_id, attempt in attempts.items()}


def deliver(session: Session, *events: dict) -> list[str]:
    """Store and process events one after the other; returns each outcome."""
    session.rollback()
    outcomes = []
    for event in events:
        store(session, event)
        outcomes.append(run(event["id"]))
    session.expire_all()
    return outcomes


def event_status(session: Session, event_id: str) -> tuple[str, str | None]:
    session.expire_all()
    return tuple(session.execute(
        text("SELECT status, last_error FROM marketplace_worker.stripe_events WHERE id = :id"), {"id": event_id}
    ).one())


def ledger_state(session: Session, invoice_id: int) -> dict:
    """Everything derived for one invoice, minus processing times: the transaction, the
    invoice mirror, refunds per transaction, and the recorded charges, refunds, disputes."""
    session.expire_all()

    def rows(sql: str, **params) -> list[tuple]:
        return [tuple(r) for r in session.execute(text(sql), {"invoice_id": invoice_id, **params})]

    return {
        "transactions": rows(
            'SELECT t.status, t."totalCents", t."platformFeeCents", t."providerPayoutCents", t."invoicedAt",'
            ' t."paidAt", t."completedAt", r.refunded_cents FROM marketplace.transactions t'
            ' LEFT JOIN marketplace_worker.transaction_refunds r ON r.transaction_id = t.id'
            ' WHERE t."invoiceId" = :invoice_id ORDER BY t.id'
        ),
        "invoice": rows(
            'SELECT status, "amountPaidCents", "paidAt", "voidedAt", "stripeInvoiceId", "stripeChargeId",'
            ' "stripePaymentIntentId" FROM "Invoice" WHERE id = :invoice_id'
        ),
        "charges": rows(
            "SELECT charge_id, payment_intent_id, amount, amount_refunded, refunded"
            " FROM marketplace_worker.stripe_charges ORDER BY 1"
        ),
        "refunds": rows(
            "SELECT refund_id, charge_id, amount, status FROM marketplace_worker.stripe_refunds ORDER BY 1"
        ),
        "disputes": rows("SELECT dispute_id, charge_id, status FROM marketplace_worker.stripe_disputes ORDER BY 1"),
    }
