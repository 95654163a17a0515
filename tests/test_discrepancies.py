"""Working discrepancies (domain/connect/discrepancies.py): acknowledging one, its history as
reconciliation runs change it, listing and counting them; real runs against the fake Stripe
API where the amounts come from Stripe, the stored findings directly for the filters."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from domain.connect import classify
from domain.connect import discrepancies as d
from domain.connect.classify import Finding
from models import DiscrepancyChange, DiscrepancyState
from models.db import session_scope
from tests.test_reconcile import connect_provider, paid_transaction, pay_out, run, send_transfer


def listed(**filters) -> list[d.Discrepancy]:
    with session_scope() as session:
        return d.list_discrepancies(session, **filters)


def changes(discrepancy_id: int) -> list[tuple[str, str, int | None, int | None]]:
    with session_scope() as session:
        return [(e.change, e.by, e.expected_cents, e.seen_cents) for e in d.history(session, discrepancy_id)]


def unacknowledged(account: str | None = None) -> int:
    with session_scope() as session:
        return d.count_unacknowledged(session, account)


def ack(discrepancy_id: int, note: str = "topping up by hand", by: str = "ana") -> d.Discrepancy:
    with session_scope() as session:
        return d.ack(session, discrepancy_id, note, by)


def store(*findings: Finding) -> int:
    with session_scope() as session:
        return classify.upsert_findings(session, list(findings))


def finding(kind: str = "amount_mismatch", subject: str = "1", account: str = "acct_a", **fields) -> Finding:
    fields.setdefault("expected_cents", 9_500)
    fields.setdefault("seen_cents", 9_000)
    fields.setdefault("currency", "eur")
    return Finding(kind=kind, subject=subject, account=account, detail=f"{kind} {subject}", **fields)


def test_an_acknowledgement_holds_while_the_amounts_do_and_is_cleared_when_they_change(db, stripe_api):
    provider = connect_provider(db)
    account = provider.stripeConnectAccountId
    txn = paid_transaction(db, provider)
    send_transfer(stripe_api, account, txn, amount=9_000)
    run(account)
    [found] = listed()
    assert (found.kind, found.state, found.expected_cents, found.seen_cents) == (
        "amount_mismatch", DiscrepancyState.OPEN, 9_500, 9_000)
    assert unacknowledged() == unacknowledged(account) == 1

    acked = ack(found.id, note="  the rest goes out by hand on Monday ", by="ana")
    assert (acked.state, acked.acknowledged_by, acked.acknowledged_note) == (
        DiscrepancyState.ACKNOWLEDGED, "ana", "the rest goes out by hand on Monday")
    assert [x.id for x in listed()] == [found.id]  # still listed
    assert unacknowledged() == 0

    # Seen again with the same amounts: the acknowledgement stands.
    assert run(account).opened == 0
    [again] = listed()
    assert (again.state, again.acknowledged_by, again.acknowledged_at) == (
        DiscrepancyState.ACKNOWLEDGED, "ana", acked.acknowledged_at)
    assert unacknowledged() == 0

    # Another 200 arrive: still short, by another amount. Open again, and the history says why.
    send_transfer(stripe_api, account, txn, amount=200, created=int(time.time()) - 60)
    assert run(account).opened == 0
    [reopened] = listed()
    assert (reopened.id, reopened.state, reopened.seen_cents) == (found.id, DiscrepancyState.OPEN, 9_200)
    assert (reopened.acknowledged_at, reopened.acknowledged_by, reopened.acknowledged_note) == (None, None, None)
    assert unacknowledged() == 1
    assert changes(found.id) == [
        ("opened", "reconcile", 9_500, 9_000),
        ("acknowledged", "ana", 9_500, 9_000),
        ("amount_changed", "reconcile", 9_500, 9_200),
        ("reopened", "reconcile", 9_500, 9_200),
    ]
    with session_scope() as session:
        events = d.history(session, found.id)
    assert events[2].note == "before: expected 9500, seen 9000 usd (minor units)"
    assert events[3].note == "the amounts changed after ana acknowledged it"
    assert events[1].note == "the rest goes out by hand on Monday"

    # The last 300 arrive and a payout carries everything: the run no longer sees it.
    transfers = [send_transfer(stripe_api, account, txn, amount=300, created=int(time.time()) - 50)]
    pay_out(stripe_api, account, transfers, created=int(time.time()) - 30)
    ack(found.id, note="waiting for the last 300", by="bo")
    assert run(account).resolved == 1
    assert listed() == []
    [resolved] = listed(state="all")
    assert resolved.state == DiscrepancyState.RESOLVED and resolved.resolved_at is not None
    assert resolved.acknowledged_by == "bo"  # the last acknowledgement stays on the record
    assert [c[:2] for c in changes(found.id)][-2:] == [("acknowledged", "bo"), ("resolved", "reconcile")]
    assert unacknowledged() == 0


def test_an_amount_change_on_an_unacknowledged_one_is_history_only(db):
    store(finding(seen_cents=9_000))
    [found] = listed()
    assert store(finding(seen_cents=9_100)) == 0
    assert store(finding(currency="usd", seen_cents=9_100)) == 0
    assert [c[0] for c in changes(found.id)] == ["opened", "amount_changed", "amount_changed"]
    assert listed()[0].state == DiscrepancyState.OPEN


def test_back_after_it_was_resolved_it_is_a_new_occurrence_without_the_old_acknowledgement(db):
    store(finding())
    [found] = listed()
    ack(found.id)
    with session_scope() as session:
        assert classify.resolve_unseen(session, ("amount_mismatch",), "acct_a", []) == 1
    assert store(finding()) == 1  # same amounts, but it had been resolved
    [back] = listed()
    assert (back.id, back.state, back.acknowledged_by, back.resolved_at) == (
        found.id, DiscrepancyState.OPEN, None, None)
    assert back.first_seen_at > found.first_seen_at
    assert [c[0] for c in changes(found.id)] == ["opened", "acknowledged", "resolved", "opened"]
    assert unacknowledged() == 1


def test_one_batch_writes_each_discrepancys_own_history(db):
    store(finding(subject="1"), finding(subject="2"), finding(subject="3"))
    by_subject = {x.subject: x for x in listed()}
    ack(by_subject["2"].id)
    ack(by_subject["3"].id)
    # One statement: 1 unchanged, 2 changed (acknowledged), 3 unchanged (acknowledged), 4 new.
    opened = store(finding(subject="1"), finding(subject="2", expected_cents=9_400), finding(subject="3"),
                   finding(subject="4"))
    assert opened == 1
    assert [c[0] for c in changes(by_subject["1"].id)] == ["opened"]
    assert [c[0] for c in changes(by_subject["2"].id)] == ["opened", "acknowledged", "amount_changed", "reopened"]
    assert [c[0] for c in changes(by_subject["3"].id)] == ["opened", "acknowledged"]
    assert {x.subject: x.state for x in listed()} == {
        "1": DiscrepancyState.OPEN, "2": DiscrepancyState.OPEN, "3": DiscrepancyState.ACKNOWLEDGED,
        "4": DiscrepancyState.OPEN}
    assert unacknowledged() == 3

    with session_scope() as session:
        assert classify.resolve_unseen(session, ("amount_mismatch",), "acct_a", [finding(subject="1")]) == 3
    assert [x.subject for x in listed()] == ["1"]
    for subject in ("2", "3"):
        assert changes(by_subject[subject].id)[-1][:2] == ("resolved", "reconcile")
    assert unacknowledged() == 1


def test_filters_by_state_account_kind_and_since(db):
    store(finding("amount_mismatch", "1", "acct_a"), finding("missing_transfer", "2", "acct_a"),
          finding("orphan_transfer", "tr_1", "acct_b", expected_cents=None), finding("amount_mismatch", "3", "acct_b"))
    with session_scope() as session:
        classify.resolve_unseen(session, ("amount_mismatch",), "acct_b", [])
        # Subject 1 was last seen two days ago.
        session.execute(text("UPDATE marketplace_worker.reconcile_discrepancies "
                             "SET last_seen_at = now() - interval '2 days' WHERE subject = '1'"))

    def subjects(**filters) -> list[str]:
        return sorted(x.subject for x in listed(**filters))

    assert subjects() == ["1", "2", "tr_1"]
    assert subjects(state="all") == ["1", "2", "3", "tr_1"]
    assert subjects(account="acct_a") == ["1", "2"]
    assert subjects(state="all", account="acct_b") == ["3", "tr_1"]
    assert subjects(kind="amount_mismatch") == ["1"]
    assert subjects(state="all", kind="amount_mismatch") == ["1", "3"]
    assert subjects(since=datetime.now(UTC) - timedelta(days=1)) == ["2", "tr_1"]
    assert subjects(since=datetime.now(UTC).replace(tzinfo=None) - timedelta(days=3)) == ["1", "2", "tr_1"]
    assert subjects(account="acct_c") == []
    assert unacknowledged("acct_a") == 2 and unacknowledged("acct_b") == 1
    with pytest.raises(ValueError):
        listed(state="closed")


def test_a_listed_discrepancy_carries_what_finance_needs(db):
    store(finding("amount_mismatch", "7", "acct_a", transaction_id=7, transfer_ids=["tr_1", "tr_2"],
                  expected_cents=1_234, seen_cents=-5, currency="kwd"))
    [found] = listed()
    ack(found.id, note="checked with the provider", by="ana")
    [found] = listed()
    exported = found.as_json()
    assert exported["expected"] == {"minor_units": 1_234, "currency": "kwd", "amount": "1.234"}
    assert exported["seen"] == {"minor_units": -5, "currency": "kwd", "amount": "-0.005"}
    assert {k: exported[k] for k in ("id", "kind", "state", "account", "subject", "transaction_id", "transfer_ids",
                                     "acknowledged_by", "acknowledged_note", "resolved_at")} == {
        "id": found.id, "kind": "amount_mismatch", "state": "acknowledged", "account": "acct_a", "subject": "7",
        "transaction_id": 7, "transfer_ids": ["tr_1", "tr_2"], "acknowledged_by": "ana",
        "acknowledged_note": "checked with the provider", "resolved_at": None}
    assert exported["first_seen_at"].endswith("+00:00") and exported["acknowledged_at"] is not None
    with session_scope() as session:
        [opened, acked] = [e.as_json() for e in d.history(session, found.id)]
    assert (opened["change"], opened["by"], acked["change"], acked["note"]) == (
        "opened", "reconcile", "acknowledged", "checked with the provider")


@pytest.mark.parametrize(
    ("note", "by", "error"),
    [
        ("", "ana", d.InvalidAcknowledgement),
        ("   ", "ana", d.InvalidAcknowledgement),
        (None, "ana", d.InvalidAcknowledgement),
        ("a note", "", d.InvalidAcknowledgement),
        ("a note", " \t", d.InvalidAcknowledgement),
    ],
)
def test_an_acknowledgement_needs_a_note_and_a_name(db, note, by, error):
    store(finding())
    [found] = listed()
    with pytest.raises(error):
        ack(found.id, note=note, by=by)
    assert listed() == [found]
    assert changes(found.id) == [("opened", "reconcile", 9_500, 9_000)]


def test_acknowledging_an_unknown_or_resolved_discrepancy_is_refused_and_changes_nothing(db):
    store(finding(subject="1"), finding(subject="2"))
    with session_scope() as session:
        classify.resolve_unseen(session, ("amount_mismatch",), "acct_a", [finding(subject="1")])
    [open_one, resolved] = sorted(listed(state="all"), key=lambda x: x.subject)
    before = listed(state="all")

    with pytest.raises(d.DiscrepancyNotFound, match="no discrepancy 999999"):
        ack(999_999)
    with pytest.raises(d.DiscrepancyResolved, match=f"discrepancy {resolved.id} was resolved at .*nothing to acknowledge"):
        ack(resolved.id)
    with session_scope() as session:
        assert d.get_discrepancy(session, resolved.id) == resolved
        with pytest.raises(d.DiscrepancyNotFound):
            d.history(session, 999_999)
        with pytest.raises(d.DiscrepancyNotFound):
            d.get_discrepancy(session, 999_999)

    assert listed(state="all") == before
    assert [c[0] for c in changes(resolved.id)] == ["opened", "resolved"]
    assert [c[0] for c in changes(open_one.id)] == ["opened"]
    assert issubclass(d.DiscrepancyResolved, d.DiscrepancyError) and issubclass(d.DiscrepancyNotFound, d.DiscrepancyError)


def test_unknown_destinations_get_their_history_too(db):
    from domain.connect import run as connect_run

    with session_scope() as session:
        session.execute(text(
            "INSERT INTO marketplace_worker.connect_transfers (id, destination, amount, amount_reversed, currency, "
            "created, as_of, as_of_id) VALUES ('tr_nobody', 'acct_nobodyhasthis1', 700, 0, 'jpy', 1, 1, '~api')"))
        assert connect_run.report_unknown_destinations(session) == (1, 0)
    [found] = listed()
    assert (found.kind, found.seen_cents, found.currency) == ("unknown_destination", 700, "jpy")
    with session_scope() as session:
        session.execute(text("DELETE FROM marketplace_worker.connect_transfers"))
        assert connect_run.report_unknown_destinations(session) == (0, 1)
    assert [c[:2] for c in changes(found.id)] == [("opened", "reconcile"), ("resolved", "reconcile")]
    assert DiscrepancyChange.RESOLVED == "resolved"
