"""Provider stats (SPEC §4): the definitions, the incremental and full passes, and their
behaviour when webhooks and the app change data while a pass runs."""

from __future__ import annotations

import math
import random
import threading
import time
from datetime import timedelta
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from domain import stats
from domain.clock import utcnow
from domain.stats_touch import touch_providers
from models import Provider, Review, ServiceListing, Transaction, TransactionRefund
from models.db import get_engine, make_session, session_scope
from harness import factories as f
from harness.flow import wait_for
from worker.cli import main as cli

OVERLAP = timedelta(minutes=5)
LONG_AGO = timedelta(days=1)


# ------------------------------------------------------------------------------ helpers ---


def stored(session: Session, provider_id: int) -> tuple:
    """(totalListings, totalTransactions, totalRevenueCents, averageRating) as stored."""
    return tuple(session.execute(
        select(Provider.totalListings, Provider.totalTransactions, Provider.totalRevenueCents,
               Provider.averageRating).where(Provider.id == provider_id)
    ).one())


def updated_at(session: Session, provider_id: int):
    return session.execute(select(Provider.updatedAt).where(Provider.id == provider_id)).scalar_one()


def reference(session: Session) -> dict[int, tuple]:
    """SPEC §4 computed row by row in Python, for comparison with the SQL."""
    refunds = dict(session.execute(
        select(TransactionRefund.transaction_id, TransactionRefund.refunded_cents)).all())
    result = {provider_id: [0, 0, 0, []] for provider_id in session.execute(select(Provider.id)).scalars()}
    for provider_id, deleted_at in session.execute(
            select(ServiceListing.providerId, ServiceListing.deletedAt)):
        if deleted_at is None:
            result[provider_id][0] += 1
    for tx_id, provider_id, status, cents in session.execute(
            select(Transaction.id, Transaction.providerId, Transaction.status, Transaction.totalCents)):
        if status in ("paid", "completed"):
            result[provider_id][1] += 1
            result[provider_id][2] += cents - refunds.get(tx_id, 0)
    for provider_id, rating, deleted_at in session.execute(
            select(Review.providerId, Review.rating, Review.deletedAt)):
        if deleted_at is None and 1 <= rating <= 5:
            result[provider_id][3].append(rating)
    return {provider_id: (listings, count, cents, _half_up(ratings))
            for provider_id, (listings, count, cents, ratings) in result.items()}


def _half_up(ratings: list[int]) -> Decimal:
    if not ratings:
        return Decimal("0.00")
    exact = Fraction(sum(ratings), len(ratings))
    return (Decimal(math.floor(exact * 100 + Fraction(1, 2))) / 100).quantize(Decimal("0.01"))


def all_stored(session: Session) -> dict[int, tuple]:
    return {row[0]: tuple(row[1:]) for row in session.execute(
        select(Provider.id, Provider.totalListings, Provider.totalTransactions,
               Provider.totalRevenueCents, Provider.averageRating))}


def all_updated_at(session: Session) -> dict:
    return dict(session.execute(select(Provider.id, Provider.updatedAt)).all())


def incremental(overlap: timedelta = OVERLAP) -> stats.PassResult:
    with session_scope() as session:
        return stats.incremental_pass(session, overlap=overlap)


def full(batch_size: int = 1000, on_changes=None, range_size: int | None = None) -> stats.FullPassResult:
    with get_engine().connect() as connection:
        return stats.full_pass(connection, batch_size=batch_size, range_size=range_size, on_changes=on_changes)


def refund(session: Session, transaction: Transaction, cents: int) -> None:
    session.merge(TransactionRefund(transaction_id=transaction.id, refunded_cents=cents))
    session.flush()


def touched(session: Session) -> set[int]:
    return set(session.execute(
        text("SELECT provider_id FROM marketplace_worker.touched_providers")).scalars())


def old_provider(session: Session, **fields) -> Provider:
    """A provider whose rows all date from yesterday: outside any incremental window."""
    return f.provider(session, createdAt=f.at(1), updatedAt=f.at(1), **fields)


def rated(session: Session, provider: Provider, ratings: list[int], **fields) -> list[Review]:
    """Reviews with these ratings, each on a transaction of its own (status irrelevant)."""
    invoice = f.invoice(session, provider)
    return [f.review(session, f.transaction(session, invoice, status="invoiced"), rating, **fields)
            for rating in ratings]


# ---------------------------------------------------------------------- definitions ---


def test_each_definition_against_hand_computed_values(db):
    a = f.provider(db)
    for status in ("active", "active", "draft", "archived"):
        f.listing(db, a, status=status)
    f.listing(db, a, deletedAt=f.at(0))
    invoice = f.invoice(db, a)
    f.transaction(db, invoice, status="paid", totalCents=10_000)
    partly = f.transaction(db, invoice, status="completed", totalCents=20_000)
    refund(db, partly, 2_500)
    f.transaction(db, invoice, status="completed", totalCents=4_000)
    fully = f.transaction(db, invoice, status="refunded", totalCents=5_000)
    refund(db, fully, 5_000)
    for status in ("cancelled", "invoiced", "pending_invoice"):
        f.transaction(db, invoice, status=status, totalCents=7_000)
    # 33 / 8 = 4.125: half up gives 4.13 (half to even would give 4.12).
    rated(db, a, [5, 5, 5, 4, 4, 4, 3, 3])
    rated(db, a, [1], deletedAt=f.at(0))

    # 823 / 200 = 4.115: 4.12 on numeric (a float average is 4.11499... and rounds to 4.11).
    b = f.provider(db)
    rated(db, b, [5] * 23 + [4] * 177)
    f.listing(db, b, deletedAt=f.at(0))

    c = f.provider(db, totalListings=3, totalTransactions=2, totalRevenueCents=900,
                   averageRating=Decimal("4.50"))  # stale: it has nothing at all
    db.commit()

    with session_scope() as session:
        result = stats.recompute_providers(session, [a.id, b.id, c.id])

    assert stored(db, a.id) == (4, 3, 10_000 + 17_500 + 4_000, Decimal("4.13"))
    assert stored(db, b.id) == (0, 0, 0, Decimal("4.12"))
    assert stored(db, c.id) == (0, 0, 0, Decimal("0.00"))
    assert [change.provider_id for change in result.changes] == [a.id, b.id, c.id]
    assert result.changes[2].old == stats.ProviderStats(3, 2, 900, Decimal("4.50"))
    assert reference(db) == all_stored(db)


def test_a_rating_outside_one_to_five_is_left_out_and_fails_nobody(db):
    bad = f.provider(db)
    rated(db, bad, [4, 5, 1000, 0, -3])
    good = f.provider(db)
    rated(db, good, [3])
    db.commit()

    full()
    assert stored(db, bad.id)[3] == Decimal("4.50")
    assert stored(db, good.id)[3] == Decimal("3.00")
    with session_scope() as session:
        stats.recompute_providers(session, [bad.id, good.id])
    assert reference(db) == all_stored(db)


def test_only_changed_providers_are_written_and_get_a_new_updated_at(db):
    right = f.provider(db, updatedAt=f.at(1))  # nothing, and stats of nothing
    wrong = f.provider(db, updatedAt=f.at(1))
    f.listing(db, wrong)
    db.commit()
    yesterday = updated_at(db, right.id)

    before = utcnow()
    with session_scope() as session:
        first = stats.recompute_providers(session, [right.id, wrong.id])
    assert [c.provider_id for c in first.changes] == [wrong.id]
    assert updated_at(db, right.id) == yesterday
    assert updated_at(db, wrong.id) >= before.replace(microsecond=before.microsecond // 1000 * 1000)

    written = updated_at(db, wrong.id)
    with session_scope() as session:
        again = stats.recompute_providers(session, [right.id, wrong.id])
    assert again.changes == []
    assert updated_at(db, wrong.id) == written


def test_a_change_describes_the_fields_that_moved():
    change = stats.StatsChange(
        7, stats.ProviderStats(2, 1, 500, Decimal("4.50")), stats.ProviderStats(3, 1, 500, Decimal("4.33"))
    )
    assert change.describe() == "provider 7: totalListings 2 → 3, averageRating 4.50 → 4.33"


# ---------------------------------------------------------------------- incremental ---


def test_the_incremental_pass_picks_up_each_kind_of_change_and_nothing_else(db):
    by_webhook, new_listing, deleted_listing, new_review, deleted_review, untouched = (
        old_provider(db) for _ in range(6)
    )
    paid_later = f.transaction(db, f.invoice(db, by_webhook, amount_cents=8_000), status="invoiced")
    doomed_listing = f.listing(db, deleted_listing, createdAt=f.at(1), updatedAt=f.at(1))
    review_tx = f.transaction(db, f.invoice(db, new_review), status="completed", totalCents=3_000)
    doomed_review = rated(db, deleted_review, [2], createdAt=f.at(1))[0]
    f.listing(db, untouched, createdAt=f.at(1), updatedAt=f.at(1))
    db.commit()
    incremental()  # the first pass looks at everything and sets the watermark
    full()  # and the full pass covers providers with transactions only
    assert reference(db) == all_stored(db)

    # The untouched provider's stored stats go stale without any trace a pass could see:
    # the incremental pass must leave it alone (only the full pass rewrites it).
    db.execute(update(Provider).where(Provider.id == untouched.id).values(totalListings=99))
    db.commit()
    before = all_updated_at(db)

    db.execute(update(Transaction).where(Transaction.id == paid_later.id).values(status="paid"))
    touch_providers(db, [by_webhook.id])
    f.listing(db, new_listing)
    now = utcnow()
    db.execute(update(ServiceListing).where(ServiceListing.id == doomed_listing.id)
               .values(deletedAt=now, updatedAt=now))
    f.review(db, review_tx, 5)
    db.execute(update(Review).where(Review.id == doomed_review.id).values(deletedAt=now))
    db.commit()

    result = incremental()

    changed = {c.provider_id for c in result.changes}
    assert changed == {by_webhook.id, new_listing.id, deleted_listing.id, new_review.id, deleted_review.id}
    assert stored(db, by_webhook.id) == (0, 1, 8_000, Decimal("0.00"))
    assert stored(db, new_listing.id)[0] == 1
    assert stored(db, deleted_listing.id)[0] == 0
    assert stored(db, new_review.id)[3] == Decimal("5.00")
    assert stored(db, deleted_review.id)[3] == Decimal("0.00")
    assert stored(db, untouched.id)[0] == 99
    assert updated_at(db, untouched.id) == before[untouched.id]
    assert touched(db) == set()

    assert incremental().changes == []  # the same changes are not written twice
    full()
    assert reference(db) == all_stored(db)


def test_a_pass_that_fails_midway_leaves_its_work_for_the_next_one(db):
    provider = old_provider(db)
    f.transaction(db, f.invoice(db, provider), status="paid", totalCents=1_234)
    touch_providers(db, [provider.id])
    db.commit()

    session = make_session()
    stats.incremental_pass(session, overlap=OVERLAP)
    session.rollback()  # the worker died before committing
    session.close()
    assert touched(db) == {provider.id}
    assert stored(db, provider.id)[1:3] == (0, 0)

    incremental()
    assert stored(db, provider.id)[1:3] == (1, 1_234)
    assert touched(db) == set()


def test_an_app_change_committed_after_a_pass_read_the_tables_is_seen_by_the_next(db):
    provider = old_provider(db)
    db.commit()
    incremental()

    app = make_session()  # the app's transaction: its "updatedAt" is set before it commits
    f.listing(app, provider)
    incremental()
    app.commit()
    app.close()
    assert stored(db, provider.id)[0] == 0

    incremental()
    assert stored(db, provider.id)[0] == 1


def test_a_webhook_still_uncommitted_during_a_pass_is_counted_by_the_next(db):
    provider = old_provider(db)
    tx = f.transaction(db, f.invoice(db, provider), status="invoiced", totalCents=5_000)
    other = f.transaction(db, f.invoice(db, provider), status="invoiced", totalCents=700)
    touch_providers(db, [provider.id])  # touched earlier, not yet claimed
    db.commit()

    webhooks = [make_session(), make_session()]
    for webhook, row in zip(webhooks, (tx, other)):
        # Neither webhook of this provider, nor the pass, may wait for another.
        webhook.execute(text("SET LOCAL lock_timeout = '2s'"))
        webhook.execute(update(Transaction).where(Transaction.id == row.id).values(status="paid"))
        touch_providers(webhook, [provider.id])
    passes = []
    worker = threading.Thread(target=lambda: passes.append(incremental()))
    worker.start()
    worker.join(10)
    assert not worker.is_alive() and len(passes) == 1
    assert stored(db, provider.id)[1:3] == (0, 0)

    for webhook in webhooks:
        webhook.commit()
        webhook.close()
    assert touched(db) == {provider.id}
    incremental()
    assert stored(db, provider.id)[1:3] == (2, 5_700)
    assert touched(db) == set()


# ----------------------------------------------------------------------------- full ---


def test_the_full_pass_writes_every_stale_provider_in_batches(db):
    providers = [f.provider(db) for _ in range(7)]
    for i, provider in enumerate(providers):
        for _ in range(i % 3):
            f.listing(db, provider)
        if i % 2:
            f.transaction(db, f.invoice(db, provider, amount_cents=1_000 * i), status="completed",
                          totalCents=1_000 * i)
    db.execute(update(Provider).where(Provider.id == providers[0].id).values(averageRating=Decimal("3.00")))
    db.commit()
    expected, was = reference(db), all_stored(db)
    seen = []

    result = full(batch_size=3, on_changes=seen.extend)

    assert (result.providers, result.batches) == (7, 2)  # the 6 changed ones only are staged
    assert all_stored(db) == expected
    assert sorted(c.provider_id for c in seen) == sorted(p for p in expected if expected[p] != was[p])
    assert len(seen) == result.changed == 6
    assert full().changed == 0


def test_a_recompute_during_the_full_pass_is_not_overwritten_by_its_older_values(db):
    """The full pass stages values first and applies them batch by batch. Between two batches a
    webhook pays a transaction and the app deletes a listing, and the incremental pass writes
    the new stats of both providers; the later batch must not put the staged values back."""
    first, webhook_side, app_side = (old_provider(db) for _ in range(3))
    tx = f.transaction(db, f.invoice(db, webhook_side), status="invoiced", totalCents=2_500)
    listing = f.listing(db, app_side, createdAt=f.at(1), updatedAt=f.at(1))
    db.commit()
    incremental()
    # Stale without a trace, so that the first batch writes it and reports a change.
    db.execute(update(Provider).where(Provider.id == first.id).values(totalListings=7))
    db.commit()
    done = []

    def between_batches(changes):
        if done:
            return
        done.append(True)
        with session_scope() as s:
            s.execute(update(Transaction).where(Transaction.id == tx.id).values(status="paid"))
            touch_providers(s, [webhook_side.id])
            now = utcnow()
            s.execute(update(ServiceListing).where(ServiceListing.id == listing.id)
                      .values(deletedAt=now, updatedAt=now))
        incremental()

    full(batch_size=1, on_changes=between_batches)

    assert done
    assert stored(db, webhook_side.id)[1:3] == (1, 2_500)
    assert stored(db, app_side.id)[0] == 0
    assert reference(db) == all_stored(db)


def test_webhooks_changing_transactions_during_a_full_pass_lose_nothing(db):
    providers = [f.provider(db) for _ in range(30)]
    rng = random.Random(5)
    transactions = []
    for provider in providers:
        invoice = f.invoice(db, provider)
        for _ in range(4):
            transactions.append(f.transaction(
                db, invoice, status=rng.choice(["invoiced", "paid"]), totalCents=rng.randint(1, 90_000)))
    db.commit()
    ids = [(t.id, t.providerId) for t in transactions]
    stop = threading.Event()
    commits = []

    def webhooks():
        moves = {"invoiced": "paid", "paid": "completed", "completed": "refunded"}
        while not stop.is_set():
            tx_id, provider_id = rng.choice(ids)
            with session_scope() as s:
                status = s.execute(select(Transaction.status).where(Transaction.id == tx_id)
                                   .with_for_update()).scalar_one()
                if status in moves:
                    s.execute(update(Transaction).where(Transaction.id == tx_id)
                              .values(status=moves[status]))
                    if moves[status] == "refunded":
                        s.merge(TransactionRefund(transaction_id=tx_id, refunded_cents=1))
                    else:
                        s.merge(TransactionRefund(transaction_id=tx_id, refunded_cents=rng.randint(0, 3)))
                    touch_providers(s, [provider_id])
            commits.append(tx_id)
            if len(commits) % 5 == 0:
                incremental()

    thread = threading.Thread(target=webhooks)
    thread.start()
    try:
        wait_for(lambda: len(commits) >= 3, message="webhooks to start")
        during = len(commits)
        # A short pause per batch, so that webhooks land between batches.
        full(batch_size=2, on_changes=lambda changes: time.sleep(0.01))
        assert len(commits) > during
    finally:
        stop.set()
        thread.join(10)
    incremental()

    assert reference(db) == all_stored(db)


def stale_providers(session: Session, n: int) -> list[Provider]:
    """`n` providers with listings, transactions of every status and ratings, each stored with
    stats that are wrong for it."""
    providers = []
    for i in range(n):
        provider = f.provider(session, totalListings=9, totalTransactions=9, totalRevenueCents=9,
                              averageRating=Decimal("1.11"))
        for _ in range(i % 3):
            f.listing(session, provider)
        invoice = f.invoice(session, provider)
        for status in STATUSES[: 1 + i % len(STATUSES)]:
            f.transaction(session, invoice, status=status, totalCents=1_000 + 100 * i)
        rated(session, provider, [1 + (i + k) % 5 for k in range(i % 4)])
        providers.append(provider)
    session.commit()
    return providers


def make_stale(session: Session) -> None:
    session.execute(update(Provider).values(totalListings=9, totalTransactions=9, totalRevenueCents=9,
                                            averageRating=Decimal("1.11")))
    session.commit()


def test_provider_ranges_cover_every_id_once(db):
    ids = sorted(p.id for p in stale_providers(db, 7))

    ranges = stats.provider_ranges(db, 3)

    assert [(first, last) for first, last in ranges] == [
        (stats.FIRST_ID, ids[2]), (ids[2] + 1, ids[5]), (ids[5] + 1, stats.LAST_ID)]
    assert stats.provider_ranges(db, 6) == [(stats.FIRST_ID, ids[5]), (ids[5] + 1, stats.LAST_ID)]
    assert stats.provider_ranges(db, 7) == [(stats.FIRST_ID, stats.LAST_ID)]
    assert stats.provider_ranges(db, 100) == [(stats.FIRST_ID, stats.LAST_ID)]


def test_the_full_pass_in_ranges_writes_what_one_range_does(db):
    stale_providers(db, 10)
    expected = reference(db)

    in_ranges = full(batch_size=2, range_size=3)

    assert all_stored(db) == expected
    assert (in_ranges.providers, in_ranges.changed, in_ranges.batches) == (10, 10, 2 + 2 + 2 + 1)
    make_stale(db)
    assert full(batch_size=2).counts() == {"providers": 10, "batches": 5, "changed": 10}
    assert all_stored(db) == expected


def test_the_stage_keeps_the_changed_providers_and_each_range_applies_its_own_once(db):
    """The nightly job stages once and its range tasks apply: staging writes no provider, a
    range writes the staged providers of its ids only, and a range run again (retried, or
    swept after a lost message) writes nothing."""
    providers = stale_providers(db, 6)
    expected = reference(db)
    right = providers[0]
    db.execute(update(Provider).where(Provider.id == right.id)
               .values(**dict(zip(stats.COLUMNS, expected[right.id], strict=True))))
    db.commit()
    was, updated_before = all_stored(db), all_updated_at(db)
    ids = sorted(p.id for p in providers if p.id != right.id)

    def apply(first: int, last: int) -> stats.FullPassResult:
        with get_engine().connect() as connection:
            return stats.full_pass_range(connection, first=first, last=last, batch_size=10)

    with get_engine().connect() as connection:
        assert stats.stage_full_pass(connection).counts() == {"providers": 6, "staged": 5}
    assert all_stored(db) == was
    db.rollback()

    assert apply(ids[1], ids[2]).counts() == {"providers": 2, "batches": 1, "changed": 2}
    now = all_stored(db)
    assert {p for p in now if now[p] != was[p]} == {ids[1], ids[2]}
    db.rollback()
    assert apply(stats.FIRST_ID, stats.LAST_ID).counts() == {"providers": 5, "batches": 1, "changed": 3}
    assert apply(stats.FIRST_ID, stats.LAST_ID).changed == 0
    assert all_stored(db) == expected
    updated_after = all_updated_at(db)
    assert sorted(p for p in updated_after if updated_after[p] != updated_before[p]) == ids


# ------------------------------------------------------------------------ randomized ---

STATUSES = ["pending_invoice", "invoiced", "paid", "completed", "cancelled", "refunded"]

a_provider = st.fixed_dictionaries({
    "listings": st.lists(st.booleans(), max_size=4),  # soft-deleted?
    "transactions": st.lists(
        st.tuples(
            st.sampled_from(STATUSES),
            st.integers(0, 5_000_000),  # totalCents
            st.one_of(st.none(), st.floats(0, 1)),  # fraction refunded, if any refund is recorded
            st.one_of(st.none(), st.tuples(st.integers(1, 5), st.booleans())),  # review, deleted?
        ),
        max_size=6,
    ),
    "stale": st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 10_000),
                       st.sampled_from([Decimal("0.00"), Decimal("3.50"), Decimal("5.00")])),
})


def _empty(session: Session) -> None:
    session.rollback()
    session.execute(text(
        'TRUNCATE marketplace.reviews, marketplace.transactions, public."Invoice", '
        'marketplace.service_listings, marketplace.providers, public."User", '
        "marketplace_worker.touched_providers, marketplace_worker.transaction_refunds, "
        "marketplace_worker.provider_stats_recomputed, marketplace_worker.watermarks "
        "RESTART IDENTITY CASCADE"))
    session.commit()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dataset=st.lists(a_provider, min_size=1, max_size=5), data=st.data())
def test_passes_agree_with_a_straightforward_reference(db, dataset, data):
    _empty(db)
    yesterday = f.at(1)
    everything = []
    for spec in dataset:
        stale = dict(zip(stats.COLUMNS, spec["stale"], strict=True))
        provider = f.provider(db, createdAt=yesterday, updatedAt=yesterday, **stale)
        invoice = f.invoice(db, provider)
        listings = [f.listing(db, provider, createdAt=yesterday, updatedAt=yesterday,
                              deletedAt=yesterday if deleted else None) for deleted in spec["listings"]]
        reviews, transactions = [], []
        for status, cents, refunded, review in spec["transactions"]:
            tx = f.transaction(db, invoice, status=status, totalCents=cents)
            transactions.append(tx)
            if status == "refunded":
                refund(db, tx, cents)
            elif refunded is not None and status in ("paid", "completed"):
                refund(db, tx, int(cents * refunded))
            if review:
                reviews.append(f.review(db, tx, review[0], createdAt=yesterday,
                                        deletedAt=yesterday if review[1] else None))
        everything.append((provider, listings, transactions, reviews))
    db.commit()
    before = all_updated_at(db)
    expected = reference(db)
    was = all_stored(db)

    full(batch_size=data.draw(st.integers(1, 3), label="batch size"))

    assert all_stored(db) == expected
    after = all_updated_at(db)
    assert {p for p in after if after[p] != before[p]} == {p for p in expected if expected[p] != was[p]}

    # Random app and webhook changes, then one incremental pass.
    incremental(overlap=timedelta(seconds=60))
    now = utcnow()
    for provider, listings, transactions, reviews in everything:
        for listing in listings:
            if data.draw(st.booleans(), label="toggle listing"):
                db.execute(update(ServiceListing).where(ServiceListing.id == listing.id).values(
                    deletedAt=None if listing.deletedAt else now, updatedAt=now))
        for review in reviews:
            if data.draw(st.booleans(), label="toggle review"):
                db.execute(update(Review).where(Review.id == review.id).values(deletedAt=now))
        for tx in transactions:
            status = data.draw(st.sampled_from([None, *STATUSES]), label="new status")
            if status is not None:
                db.execute(update(Transaction).where(Transaction.id == tx.id).values(status=status))
                touch_providers(db, [provider.id])
        if data.draw(st.booleans(), label="new listing"):
            f.listing(db, provider)
    db.commit()
    expected = reference(db)
    was = all_stored(db)
    before = all_updated_at(db)

    incremental(overlap=timedelta(seconds=60))

    assert all_stored(db) == expected
    after = all_updated_at(db)
    assert {p for p in after if after[p] != before[p]} == {p for p in expected if expected[p] != was[p]}


# --------------------------------------------------------------------- entry points ---


def test_the_command_prints_what_changed(db, capsys):
    provider = f.provider(db)
    f.listing(db, provider)
    db.commit()

    assert cli(["stats", "--provider", str(provider.id)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"provider {provider.id}: totalListings 0 → 1",
        "1 of 1 provider(s) changed",
    ]
    assert cli(["stats"]) == 0
    assert capsys.readouterr().out.splitlines() == ["0 of 1 provider(s) changed"]

    db.execute(update(Provider).where(Provider.id == provider.id).values(averageRating=Decimal("2.50")))
    db.commit()
    assert cli(["stats", "--full"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"provider {provider.id}: averageRating 2.50 → 0.00",
        "1 of 1 provider(s) changed",
    ]


def test_the_command_refuses_what_it_cannot_do(db, capsys):
    assert cli(["stats", "--provider", "424242"]) == 1
    assert capsys.readouterr().err.strip() == "marketplace-worker stats: no provider 424242"
    assert cli(["stats", "--full", "--provider", "1"]) == 2


@pytest.mark.flow
def test_the_beat_tasks_run_on_the_worker(celery_worker, db):
    from tasks.stats import full_stats, incremental_stats

    provider = f.provider(db)
    f.transaction(db, f.invoice(db, provider), status="paid", totalCents=4_200)
    db.commit()
    full_stats.delay()
    wait_for(lambda: stored(db, provider.id)[1:3] == (1, 4_200), message="the full pass")
    db.rollback()

    f.listing(db, provider)
    db.commit()
    incremental_stats.delay()
    wait_for(lambda: stored(db, provider.id)[0] == 1, message="the incremental pass")
    db.rollback()
    wait_for(lambda: db.execute(text(
        "SELECT array_agg(job ORDER BY job) FROM marketplace_worker.job_runs WHERE outcome = 'ok'"
    )).scalar() == ["full_stats", "incremental_stats"], message="both runs recorded")


# ----------------------------------------------------------------- fan-out to the workers ---

FULL_STATS_RANGE = "tasks.stats.full_stats_range"


def range_pieces(session: Session) -> list[tuple[str, str | None]]:
    """(key, outcome) of each range the full_stats job fanned out, in the order recorded."""
    session.rollback()
    return [tuple(row) for row in session.execute(text(
        "SELECT key, outcome FROM marketplace_worker.fanout_items WHERE task = :task ORDER BY id"
    ), {"task": FULL_STATS_RANGE})]


@pytest.fixture
def ranges_of(monkeypatch):
    """The full_stats job, run here, fans out ranges of this many providers."""
    import tasks.stats
    from config import get_settings

    def set_size(size: int) -> None:
        settings = get_settings().model_copy(update={"stats_full_range_size": size})
        monkeypatch.setattr(tasks.stats, "get_settings", lambda: settings)

    return set_size


@pytest.mark.flow
def test_the_full_pass_through_the_workers_writes_what_the_pass_in_process_does(celery_worker, db, ranges_of):
    from tasks.stats import full_stats

    stale_providers(db, 11)
    ranges_of(3)

    assert full_stats() == {"providers": 11, "staged": 11, "ranges": 4, "enqueued": 4}
    wait_for(lambda: [outcome for _, outcome in range_pieces(db)] == ["ok"] * 4, message="every range done")
    through_workers = all_stored(db)

    make_stale(db)
    assert full(range_size=3).changed == 11
    assert all_stored(db) == through_workers == reference(db)


@pytest.mark.flow
def test_ranges_whose_messages_the_broker_lost_are_swept_and_the_pass_completes(
        celery_worker, db, ranges_of, monkeypatch):
    import tasks.fanout
    import tasks.stats

    providers = stale_providers(db, 12)
    expected = reference(db)
    ranges_of(3)
    sent, publish = [], tasks.fanout.publish

    def publish_every_other(pieces):  # the broker loses the others
        sent.extend(pieces[::2])
        publish(pieces[::2])

    with monkeypatch.context() as lossy:
        lossy.setattr(tasks.fanout, "publish", publish_every_other)
        assert tasks.stats.full_stats() == {"providers": 12, "staged": 12, "ranges": 4, "enqueued": 4}
    sent_keys = {piece.key for piece in sent}
    wait_for(lambda: {key for key, outcome in range_pieces(db) if outcome == "ok"} == sent_keys,
             message="the ranges sent")
    lost = [key for key, outcome in range_pieces(db) if outcome is None]
    assert len(lost) == 2
    assert sum(all_stored(db)[p.id] != expected[p.id] for p in providers) == 6  # the lost ranges' providers

    # Past FANOUT_SWEEP_AFTER_SECONDS with an empty queue: the sweeper sends them again.
    db.execute(text("UPDATE marketplace_worker.fanout_items SET due_at = now() - interval '10 minutes'"
                    " WHERE finished_at IS NULL"))
    db.commit()
    tasks.fanout.sweep_fanout()
    assert db.execute(text("SELECT key FROM marketplace_worker.fanout_items WHERE enqueues = 2 ORDER BY id"
                           )).scalars().all() == lost  # sent a second time, by the sweeper
    wait_for(lambda: [outcome for _, outcome in range_pieces(db)] == ["ok"] * 4, message="the swept ranges")
    assert all_stored(db) == expected
