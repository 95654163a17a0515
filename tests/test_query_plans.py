"""The event path reads `stripe_object_versions` by key even in a plan Postgres made while the
table was small. A worker's connection prepares the statements it runs often, and Postgres
keeps their generic plans for as long as the connection lives and the statistics stand: a plan
that scanned the table at a few hundred rows went on scanning it whole, for every payment and
every batch, as it grew (the refund recomputation was the costliest statement of a fresh
database's first minutes, and grew with the table)."""

from __future__ import annotations

import re

import psycopg
import pytest
from sqlalchemy import TextClause

from domain import ledger, versions

GROWN = 20_000


def _fill(start: int, stop: int) -> str:
    """Charges, one refund each, and their versions, numbered from start to stop."""
    ids = f"generate_series({start}, {stop - 1}) AS n"
    return f"""
        INSERT INTO marketplace_worker.stripe_object_versions (object_id, object_type, event_created, rank, event_id)
        SELECT 'ch_' || n, 'charge', 1, 0, 'evt_' || n FROM {ids};
        INSERT INTO marketplace_worker.stripe_charges (charge_id, payment_intent_id, amount, amount_refunded, refunded)
        SELECT 'ch_' || n, 'pi_' || n, 1000, 100, false FROM {ids};
        INSERT INTO marketplace_worker.stripe_refunds (refund_id, charge_id, payment_intent_id, amount, status)
        SELECT 're_' || n, 'ch_' || n, 'pi_' || n, 100, 'succeeded' FROM {ids};
    """


def _prepared(statement: TextClause, types: dict[str, str]) -> str:
    """The statement as PREPARE takes it: each `:name` its numbered parameter."""
    names = list(types)
    return re.sub(r"(?<!:):(\w+)", lambda m: f"${names.index(m.group(1)) + 1}", str(statement))


CASES = {
    "refunds": (ledger._APPLY_REFUNDS_SQL,
                {"charge_id": "text", "payment_intent_id": "text", "transaction_id": "bigint"},
                "('ch_400', 'pi_400', 1)"),
    "versions_in_order": (versions._NEWER_IN_ORDER,
                          {"object_ids": "text[]", "created": "bigint[]", "ranks": "smallint[]", "event_ids": "text[]"},
                          "(ARRAY['ch_400', 'ch_19999', 'ch_new'], ARRAY[2, 2, 2], ARRAY[0, 0, 0], "
                          "ARRAY['evt_x', 'evt_x', 'evt_x'])"),
}


@pytest.mark.parametrize("name", CASES)
def test_a_plan_made_on_a_small_versions_table_still_reads_it_by_key(db, name):
    statement, types, arguments = CASES[name]
    url = db.get_bind().url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url) as conn:  # its own: the prepared statement and the rows go with it
        conn.execute(_fill(0, 300))
        conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        conn.execute(f"PREPARE {name} ({', '.join(types.values())}) AS {_prepared(statement, types)}")
        conn.execute(f"EXECUTE {name} {arguments}")  # the plan is made now, and kept
        conn.execute(_fill(300, GROWN))
        plan = "\n".join(row[0] for row in conn.execute(f"EXPLAIN (COSTS OFF) EXECUTE {name} {arguments}"))
        conn.rollback()
    assert "Index Scan using pk_stripe_object_versions" in plan, plan
    assert "Seq Scan on stripe_object_versions" not in plan, plan
