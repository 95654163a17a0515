"""What the system under test must show after the chaos run, from the deliveries and the
generated histories alone: nothing accepted lost, nothing hostile stored, nothing applied
twice, and every invoice in the state its history says (the oracle)."""

from __future__ import annotations

from collections import Counter

import psycopg

from harness.chaos.deliveries import Answer
from harness.chaos.scenario import EXPECTED_MIRROR, Scenario


def audit(sut_url: str, scenario: Scenario, answers: list[Answer], accepted_ids: set[str]) -> dict:
    genuine_ids = {e.id for e in scenario.events}
    with psycopg.connect(sut_url) as conn:
        inbox = dict(conn.execute("SELECT id, status FROM marketplace_worker.stripe_events").fetchall())
        parked = conn.execute(
            "SELECT id, type, coalesce(last_error, '') FROM marketplace_worker.stripe_events "
            "WHERE status = 'parked' ORDER BY id").fetchall()
        transactions = conn.execute(
            """SELECT t."invoiceId", count(*), min(t.status), max(t.status),
                      max(coalesce(r.refunded_cents, 0)), max(t."totalCents")
               FROM marketplace.transactions t
               LEFT JOIN marketplace_worker.transaction_refunds r ON r.transaction_id = t.id
               GROUP BY t."invoiceId" """).fetchall()
        mirrors = dict(conn.execute('SELECT id, status FROM "Invoice"').fetchall())
        sweeps = conn.execute(
            "SELECT count(*), coalesce(sum((counts->>'enqueued')::int), 0) FROM marketplace_worker.job_runs "
            "WHERE job = 'sweep_inbox' AND outcome = 'ok'").fetchone()
    lost = sorted(i for i in accepted_ids if inbox.get(i) in (None, "received", "retrying"))
    never_accepted = sorted(genuine_ids - accepted_ids)
    hostile_stored = sorted(set(inbox) - accepted_ids)
    by_invoice = {row[0]: row for row in transactions}
    applied_twice, oracle = [], []
    unlinkable = 0
    for plan in scenario.invoices:
        row = by_invoice.get(plan.id)
        if row is not None and row[1] > 1:
            applied_twice.append(f"invoice {plan.id}: {row[1]} transactions")
        if row is not None and (row[4] > plan.refunded and plan.outcome is not None or row[4] > row[5]):
            applied_twice.append(f"invoice {plan.id}: {row[4]} cents refunded, Stripe refunded {plan.refunded}")
        if plan.outcome is None:
            continue
        if not plan.gets_transaction:
            if row is not None and plan.app_transaction_id is None:
                oracle.append(f"invoice {plan.id} ({'deleted' if plan.deleted else 'not marketplace'}) "
                              f"got a transaction")
            if not plan.marketplace and mirrors[plan.id] != plan.status:
                oracle.append(f"non-marketplace invoice {plan.id} changed to {mirrors[plan.id]}")
            continue
        if plan.refunded and not plan.refunds_visible:
            unlinkable += 1
            continue
        expected, expected_refund = plan.expected_status, plan.refunded
        mirror = EXPECTED_MIRROR.get(plan.outcome, "paid")
        if row is None:
            oracle.append(f"invoice {plan.id} ({plan.outcome}, {plan.shape}): no transaction")
        elif (row[2], row[4]) != (expected, expected_refund):
            oracle.append(f"invoice {plan.id} ({plan.outcome}, {plan.shape}): {row[2]} refunded {row[4]}, "
                          f"expected {expected} refunded {expected_refund}")
        if mirrors[plan.id] != mirror:
            oracle.append(f"invoice {plan.id} ({plan.outcome}{', in one second' if plan.instant else ''}, "
                          f"{plan.shape}): mirror {mirrors[plan.id]}, expected {mirror}")
    return {
        "statuses": Counter(inbox.values()), "parked": parked, "lost": lost, "never_accepted": never_accepted,
        "hostile_stored": hostile_stored, "applied_twice": applied_twice, "oracle": oracle,
        "unlinkable": unlinkable, "sweeps": tuple(sweeps),
    }
