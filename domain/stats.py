"""Provider stats (SPEC §4), recomputed in set-based SQL and written only where a value changed.

For each provider:
  totalListings      its listings with "deletedAt" null, any status
  totalTransactions  its transactions in `paid` or `completed`
  totalRevenueCents  the sum over those of "totalCents" minus their recorded partial refunds
                     (`marketplace_worker.transaction_refunds`, no row = nothing refunded)
  averageRating      mean rating of its reviews with "deletedAt" null, rounded half up to two
                     places by Postgres on numeric (round() rounds half away from zero, which is
                     half up for ratings); 0.00 when it has none. A rating outside 1..5 (the
                     app's rule; the column does not enforce it) is left out: one such row
                     could not be averaged into DECIMAL(3,2) and would fail every provider's
                     stats in its statement

Three ways in, one SQL aggregate:
- `recompute_providers`: the providers named (the `stats --provider` command, and the core of
  the incremental pass). Index lookups by provider id, so its cost follows the providers named.
- `incremental_pass` (beat, every minute): the providers touched since the last pass.
  The worker's own changes (transaction status, refunds) arrive as rows of
  `marketplace_worker.touched_providers` (one row per touching transaction, inserted in the
  same transaction as the change); the pass claims them by deleting them in the transaction
  that writes the stats, so a crash puts them back. The claim is a statement of its own,
  before the aggregate: it deletes only the touches committed before it began, whose changes
  the aggregate's snapshot, taken afterwards, sees; a touch not yet committed is left for the
  next pass, and no webhook ever waits for a pass. The app's changes are found by time: listings by
  "updatedAt", reviews by "createdAt"/"deletedAt" (reviews have no "updatedAt"; a soft delete
  sets "deletedAt" only), after a watermark kept in `marketplace_worker.watermarks` and moved
  in the same transaction, minus an overlap (STATS_CHANGE_OVERLAP_SECONDS) so that an app
  transaction committing after the pass read the tables, or an app clock a little behind the
  database's, is still seen.
- the full pass (nightly): every provider. A provider's transactions are spread over the
  whole heap, so any subset of providers costs about one read of the transactions table (the
  app's index on transactions("providerId", status, "createdAt") holds no "totalCents": a
  range read through it visits as many heap pages as the table has). So `stage_full_pass`
  aggregates every provider once, in one statement that reads each table once, without
  locking anything, and keeps only the providers whose stored stats differ: it writes their
  values into `marketplace_worker.provider_stats_staged` (unlogged: nightly and recomputable),
  in place of what an earlier pass staged. Then `full_pass_range`, one task per range of
  `provider_ranges` (tasks/stats.py fans them out after staging), applies the staged rows of
  its range in keyset batches of provider ids, each a short transaction, so neither Python
  memory (no row comes to Python unless the caller asks for the changes) nor the time rows of
  `marketplace.providers` stay locked grows with the tables; a range's cost follows its
  changed providers, not the tables. `full_pass` does both in the caller's process (the
  `stats --full` command). benchmarks/stats_bench.py prints it against a plain aggregate.

Concurrency. Every write of stats takes one transaction-scoped advisory lock, so writers run
one at a time and each computes from a snapshot taken after the previous one committed (ranges
of the full pass running on several workers apply one batch at a time). A range applies
values staged at time T0 (each staged row carries its T0), minutes or, for a range task
retried or swept, hours before a batch is applied, and a provider recomputed by an
incremental pass in between holds newer values. So every incremental and single-provider
recompute stamps the provider in `marketplace_worker.provider_stats_recomputed` (database
clock, after its aggregate ran), and a batch leaves alone the providers stamped at or after
T0. Any change after T0 that no such recompute has seen is still pending when the batch
applies (its touched row is there, or it is inside the watermark's window), so the next
incremental pass corrects what the batch wrote; and a provider left out of the staged rows
because its stats were right at T0 is in the same case. A pass staging again while ranges of
the previous one still apply replaces their rows with newer ones, which the same argument
covers. The full pass does not claim touched rows, for the same reason. Nothing holds a lock on
`marketplace.providers` beyond one batch's transaction; a webhook never waits for a pass.

Not seen by the incremental pass (the nightly full pass corrects them): a review whose rating
is edited in place and rows hard-deleted by the app, since neither leaves a timestamp; a
listing moved to another provider is seen for its new provider only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from sqlalchemy import Connection, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from domain.clock import utcnow
from models import Provider, Watermark

# Arbitrary, unique among the worker's advisory locks: held by every writer of provider stats.
STATS_LOCK_KEY = 5_202_604
APP_CHANGES_WATERMARK = "provider_stats.app_changes"


@dataclass(frozen=True, slots=True)
class ProviderStats:
    total_listings: int
    total_transactions: int
    total_revenue_cents: int
    average_rating: Decimal


# Column on marketplace.providers for each ProviderStats field, in order.
COLUMNS = ("totalListings", "totalTransactions", "totalRevenueCents", "averageRating")


@dataclass(frozen=True, slots=True)
class StatsChange:
    provider_id: int
    old: ProviderStats
    new: ProviderStats

    def describe(self) -> str:
        """`provider 7: totalListings 2 → 3, averageRating 4.50 → 4.33`: the changed fields only."""
        fields = [
            f"{column} {before} → {after}"
            for column, before, after in zip(COLUMNS, _values(self.old), _values(self.new), strict=True)
            if before != after
        ]
        return f"provider {self.provider_id}: " + ", ".join(fields)


@dataclass(frozen=True, slots=True)
class PassResult:
    recomputed: int
    changes: list[StatsChange]

    def counts(self) -> dict[str, int]:
        return {"recomputed": self.recomputed, "changed": len(self.changes)}


@dataclass(frozen=True, slots=True)
class FullPassResult:
    providers: int
    changed: int
    batches: int

    def counts(self) -> dict[str, int]:
        return {"providers": self.providers, "batches": self.batches, "changed": self.changed}


def _fresh_sql(providers: str | None) -> str:
    """Fresh stats per provider as (provider_id, total_listings, total_transactions,
    total_revenue_cents, average_rating), then the stored ones as (stored_listings,
    stored_transactions, stored_revenue_cents, stored_rating): every provider, or those whose
    id satisfies `providers`, a condition written after the id (`= ANY(CAST(:ids AS integer[]))`)."""
    only = f'AND x."providerId" {providers}' if providers else ""
    where = f"WHERE p.id {providers}" if providers else ""
    return f"""
SELECT p.id AS provider_id,
       COALESCE(l.n, 0)::integer AS total_listings,
       COALESCE(t.n, 0)::integer AS total_transactions,
       COALESCE(t.cents, 0)::bigint AS total_revenue_cents,
       COALESCE(rv.rating, 0)::numeric(3, 2) AS average_rating,
       p."totalListings" AS stored_listings, p."totalTransactions" AS stored_transactions,
       p."totalRevenueCents" AS stored_revenue_cents, p."averageRating" AS stored_rating
FROM marketplace.providers p
LEFT JOIN (
    SELECT x."providerId", count(*) AS n
    FROM marketplace.service_listings x
    WHERE x."deletedAt" IS NULL {only}
    GROUP BY x."providerId"
) l ON l."providerId" = p.id
LEFT JOIN (
    SELECT x."providerId", count(*) AS n,
           sum(x."totalCents" - COALESCE(r.refunded_cents, 0)) AS cents
    FROM marketplace.transactions x
    LEFT JOIN marketplace_worker.transaction_refunds r ON r.transaction_id = x.id
    WHERE x.status IN ('paid', 'completed') {only}
    GROUP BY x."providerId"
) t ON t."providerId" = p.id
LEFT JOIN (
    SELECT x."providerId", round(avg(x.rating), 2) AS rating
    FROM marketplace.reviews x
    WHERE x."deletedAt" IS NULL AND x.rating BETWEEN 1 AND 5 {only}
    GROUP BY x."providerId"
) rv ON rv."providerId" = p.id
{where}
"""


def _apply_sql(source: str, *, extra_condition: str = "", returning: bool = True) -> str:
    """UPDATE the providers whose stats differ from `source` (a relation with _fresh_sql's
    first five columns), returning the old and new values unless `returning` is false. `o` is
    the row as the statement's snapshot saw it; stats have one writer at a time (the advisory
    lock), so that is the old value."""
    old = "JOIN marketplace.providers o ON o.id = f.provider_id" if returning else ""
    returned = """RETURNING p.id,
          o."totalListings", o."totalTransactions", o."totalRevenueCents", o."averageRating",
          f.total_listings, f.total_transactions, f.total_revenue_cents, f.average_rating""" if returning else ""
    return f"""
UPDATE marketplace.providers p
SET "totalListings" = f.total_listings,
    "totalTransactions" = f.total_transactions,
    "totalRevenueCents" = f.total_revenue_cents,
    "averageRating" = f.average_rating,
    "updatedAt" = :now
FROM {source} {old}
WHERE p.id = f.provider_id
  AND (p."totalListings", p."totalTransactions", p."totalRevenueCents", p."averageRating")
      IS DISTINCT FROM
      (f.total_listings, f.total_transactions, f.total_revenue_cents, f.average_rating)
  {extra_condition}
{returned}
"""


_RECOMPUTE_SQL = text(
    f"WITH fresh AS ({_fresh_sql('= ANY(CAST(:ids AS integer[]))')})\n" + _apply_sql("fresh f")
)

_MARK_SQL = text("""
INSERT INTO marketplace_worker.provider_stats_recomputed (provider_id, recomputed_at)
SELECT unnest(CAST(:ids AS integer[])), clock_timestamp()
ON CONFLICT (provider_id) DO UPDATE SET recomputed_at = EXCLUDED.recomputed_at
""")

# Takes the committed touches only: a touch still uncommitted is invisible to this snapshot,
# waits for nobody and is claimed by the next pass, once its change can be seen.
_CLAIM_TOUCHED_SQL = text("""
WITH claimed AS (DELETE FROM marketplace_worker.touched_providers RETURNING provider_id)
SELECT DISTINCT provider_id FROM claimed
""")

# The app's schema has no index on these columns, so this reads listings and reviews
# sequentially (tens of ms at 400,000 reviews). Written as plain comparisons, so that indexes
# on service_listings("updatedAt"), reviews("createdAt") and reviews("deletedAt"), if the app
# adds them, serve it.
_APP_CHANGES_SQL = text("""
SELECT ARRAY(
           SELECT x."providerId" FROM marketplace.service_listings x
           WHERE x."updatedAt" > :since
           UNION
           SELECT x."providerId" FROM marketplace.reviews x
           WHERE x."createdAt" > :since OR x."deletedAt" > :since
       ) AS provider_ids,
       now() AT TIME ZONE 'UTC' AS pass_started_at
""")

_STAGED = "marketplace_worker.provider_stats_staged"

# Every provider aggregated in one statement: each table is read once (the planner hashes the
# refunds and the per-provider aggregates), and only the providers whose stored stats differ
# are kept, compared on the providers row the aggregate reads anyway. Postgres plans no
# parallel query for INSERT ... SELECT but does for CREATE TABLE AS, so the aggregate fills a
# temporary table (parallel workers scan the transactions) and the changed rows, few on most
# nights, are copied from it.
_FRESH = "pg_temp.provider_stats_fresh"
_AGGREGATE_CHANGED_SQL = text(f"""
CREATE TEMPORARY TABLE provider_stats_fresh ON COMMIT DROP AS
SELECT f.provider_id, f.total_listings, f.total_transactions, f.total_revenue_cents, f.average_rating
FROM ({_fresh_sql(None)}) f
WHERE (f.stored_listings, f.stored_transactions, f.stored_revenue_cents, f.stored_rating)
      IS DISTINCT FROM
      (f.total_listings, f.total_transactions, f.total_revenue_cents, f.average_rating)
""")
_STAGE_SQL = text(f"""
INSERT INTO {_STAGED}
    (provider_id, total_listings, total_transactions, total_revenue_cents, average_rating, staged_at)
SELECT provider_id, total_listings, total_transactions, total_revenue_cents, average_rating, :staged_at
FROM {_FRESH}
""")

# Memory for the stage's hash aggregates (a few hundred bytes per provider): at the default
# 4 MB they spill to disk from about 20,000 providers on. For this statement only.
STAGE_WORK_MEM = "256MB"

# The staged values of one keyset batch, except for providers recomputed from data at least
# as new as the staged values (stamped at or after the row's staged_at).
_APPLY_STAGED_CONDITION = """AND f.provider_id > :after AND f.provider_id <= :upto
  AND NOT EXISTS (
      SELECT 1 FROM marketplace_worker.provider_stats_recomputed m
      WHERE m.provider_id = f.provider_id AND m.recomputed_at >= f.staged_at
  )"""
_APPLY_STAGED_SQL = text(_apply_sql(f"{_STAGED} f", extra_condition=_APPLY_STAGED_CONDITION))
# The same, for a caller that does not want the changes: no row comes back to Python.
_APPLY_STAGED_QUIET_SQL = text(
    _apply_sql(f"{_STAGED} f", extra_condition=_APPLY_STAGED_CONDITION, returning=False))

_BATCH_END_SQL = text(f"""
SELECT max(provider_id), count(*) FROM (
    SELECT provider_id FROM {_STAGED} WHERE provider_id > :after AND provider_id <= :last
    ORDER BY provider_id LIMIT :n
) batch
""")


def _values(stats: ProviderStats) -> tuple:
    return (stats.total_listings, stats.total_transactions, stats.total_revenue_cents, stats.average_rating)


def _changes(rows: Iterable[Sequence]) -> list[StatsChange]:
    return sorted(
        (StatsChange(row[0], ProviderStats(*row[1:5]), ProviderStats(*row[5:9])) for row in rows),
        key=lambda change: change.provider_id,
    )


def _serialize_stats_writers(conn: Session | Connection) -> None:
    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": STATS_LOCK_KEY})


def provider_exists(session: Session, provider_id: int) -> bool:
    return session.get(Provider, provider_id) is not None


def recompute_providers(session: Session, provider_ids: Iterable[int]) -> PassResult:
    """Recompute the providers named (unknown ids are ignored) and write those that changed."""
    ids = sorted(set(provider_ids))
    _serialize_stats_writers(session)
    return _recompute(session, ids)


def _recompute(session: Session, ids: list[int]) -> PassResult:
    if not ids:
        return PassResult(recomputed=0, changes=[])
    rows = session.execute(_RECOMPUTE_SQL, {"ids": ids, "now": utcnow()}).all()
    session.execute(_MARK_SQL, {"ids": ids})
    return PassResult(recomputed=len(ids), changes=_changes(rows))


def incremental_pass(session: Session, *, overlap: timedelta) -> PassResult:
    """Recompute the providers touched since the last pass, in the caller's transaction."""
    _serialize_stats_writers(session)
    touched = session.execute(_CLAIM_TOUCHED_SQL).scalars().all()
    watermark = session.execute(
        select(Watermark.position_at).where(Watermark.name == APP_CHANGES_WATERMARK)
    ).scalar_one_or_none()
    # The first pass has no watermark and looks at every listing and review once.
    since = watermark - overlap if watermark is not None else datetime.min
    app_ids, pass_started_at = session.execute(_APP_CHANGES_SQL, {"since": since}).one()
    result = _recompute(session, sorted(set(touched) | set(app_ids)))
    session.execute(
        insert(Watermark)
        .values(name=APP_CHANGES_WATERMARK, position_at=pass_started_at)
        .on_conflict_do_update(
            index_elements=[Watermark.name],
            set_={"position_at": pass_started_at, "updated_at": text("now()")},
        )
    )
    return result


# Provider ids are INTEGER: a range from FIRST_ID to LAST_ID holds every provider.
FIRST_ID, LAST_ID = -(2**31), 2**31 - 1

# Every `size`-th provider id but the greatest: the last id of each range but the last one.
_RANGE_ENDS_SQL = text("""
SELECT id FROM (
    SELECT id, row_number() OVER (ORDER BY id) AS n, count(*) OVER () AS providers
    FROM marketplace.providers
) p
WHERE n % :size = 0 AND n < providers
ORDER BY id
""")


def provider_ranges(conn: Session | Connection, size: int) -> list[tuple[int, int]]:
    """Consecutive id ranges (first, last), inclusive, of `size` providers each, covering every
    id: the first starts at FIRST_ID and the last ends at LAST_ID, so a provider created after
    this read still falls in one."""
    ends = conn.execute(_RANGE_ENDS_SQL, {"size": size}).scalars().all()
    return list(zip([FIRST_ID, *(end + 1 for end in ends)], [*ends, LAST_ID], strict=True))


def full_pass(
    connection: Connection,
    *,
    batch_size: int,
    range_size: int | None = None,
    on_changes: Callable[[list[StatsChange]], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> FullPassResult:
    """Recompute every provider here: stage, then apply range after range (`range_size`
    providers each; one range when None), what the nightly job and its tasks do on the
    workers. `progress(done, total)` after each range."""
    staged = stage_full_pass(connection)
    ranges = [(FIRST_ID, LAST_ID)]
    if range_size is not None:
        with connection.begin():
            ranges = provider_ranges(connection, range_size)
    changed = batches = 0
    for done, (first, last) in enumerate(ranges, 1):
        result = full_pass_range(connection, first=first, last=last, batch_size=batch_size,
                                 on_changes=on_changes)
        changed += result.changed
        batches += result.batches
        if progress is not None:
            progress(done, len(ranges))
    return FullPassResult(providers=staged.providers, changed=changed, batches=batches)


@dataclass(frozen=True, slots=True)
class StagedPass:
    providers: int  # aggregated
    staged: int  # whose stored stats differed, to be applied by the ranges

    def counts(self) -> dict[str, int]:
        return {"providers": self.providers, "staged": self.staged}


def stage_full_pass(connection: Connection) -> StagedPass:
    """Aggregate every provider and stage the values of those whose stored stats differ,
    replacing what an earlier pass staged. Writes no provider.

    Runs its own transaction on `connection` (which must not be in one). The staged table is
    emptied after the aggregate ran, so it stays locked only while the changed rows are copied
    in: a range of an earlier pass still applying waits that long, then applies the newer
    values.
    """
    with connection.begin():
        connection.execute(text(f"SET LOCAL work_mem = '{STAGE_WORK_MEM}'"))
        # Taken before the aggregate's snapshot: a recompute stamped at or after it may have
        # seen newer data than the staged values.
        staged_at = connection.execute(text("SELECT clock_timestamp()")).scalar_one()
        connection.execute(_AGGREGATE_CHANGED_SQL)
        connection.execute(text(f"TRUNCATE {_STAGED}"))
        staged = connection.execute(_STAGE_SQL, {"staged_at": staged_at}).rowcount
        providers = connection.execute(text("SELECT count(*) FROM marketplace.providers")).scalar_one()
    return StagedPass(providers=providers, staged=staged)


def full_pass_range(
    connection: Connection,
    *,
    first: int,
    last: int,
    batch_size: int,
    on_changes: Callable[[list[StatsChange]], None] | None = None,
) -> FullPassResult:
    """Apply the staged values (stage_full_pass) of the providers with ids from `first` to
    `last`, in keyset batches of `batch_size`; `providers` counts the staged rows of the range.
    The old and new values come back to Python only for `on_changes`.

    Runs its own transactions on `connection` (which must not be in one), each batch one.
    Applying twice writes nothing the second time, so a range retried or swept is harmless.
    """
    after, providers, changed, batches = first - 1, 0, 0, 0
    while True:
        with connection.begin():
            upto, n = connection.execute(
                _BATCH_END_SQL, {"after": after, "last": last, "n": batch_size}).one()
            if upto is None:
                break
            _serialize_stats_writers(connection)
            params = {"after": after, "upto": upto, "now": utcnow()}
            if on_changes is None:
                written = connection.execute(_APPLY_STAGED_QUIET_SQL, params).rowcount
                changes = []
            else:
                changes = _changes(connection.execute(_APPLY_STAGED_SQL, params).all())
                written = len(changes)
        providers += n
        batches += 1
        changed += written
        if changes:
            on_changes(changes)
        after = upto
    return FullPassResult(providers=providers, changed=changed, batches=batches)
