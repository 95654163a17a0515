"""inbox: stripe_events range-partitioned by the month of received_at; stripe_event_ids keeps ids unique

The existing table becomes the first partition, `stripe_events_legacy`, for every time before
the first day of next month: no row is copied or rewritten. The steps and their locks:

1. (one transaction) `stripe_event_ids(id, received_at)` is created, and a trigger on the
   existing table copies every id inserted from now on into it (the receivers keep running
   the previous release until the swap). CREATE TRIGGER takes SHARE ROW EXCLUSIVE on the
   inbox: inserts wait for the instant of the catalog change.
2. (autocommit, batches of 10,000 ids) every existing id is copied into `stripe_event_ids`:
   reads only, nothing blocked.
3. (autocommit) `CHECK (received_at < <next month>) NOT VALID`, then `VALIDATE CONSTRAINT`:
   the scan holds SHARE UPDATE EXCLUSIVE, which blocks neither reads nor writes. The check
   is what lets ATTACH PARTITION skip its own scan under a stronger lock.
4. (autocommit) `CREATE UNIQUE INDEX CONCURRENTLY` on (id, received_at): the partition's half
   of the parent's primary key, built without blocking writes.
5. (one transaction, `lock_timeout` 10 s) the swap: the table is renamed to
   `stripe_events_legacy` and its primary key becomes (id, received_at) on the index of step 4,
   the partitioned `stripe_events` is created with the same columns, checks and indexes, the
   legacy table is attached for (MINVALUE) TO (<next month>), the next two months' partitions
   and the DEFAULT one are created, the trigger is dropped. ACCESS EXCLUSIVE on the inbox for
   catalog changes only (no scan, no rewrite): milliseconds once the transactions running on
   the inbox have finished; if they do not finish within 10 s the migration stops with the
   old table intact and can be run again.

The receivers of the previous release insert with `ON CONFLICT (id)`, which the partitioned
table cannot serve: from the swap until the new release runs they answer 503 and Stripe
retries those deliveries. Deploy the new release right after the migration.

Downgrade copies every row back into one plain table (a rewrite, under ACCESS EXCLUSIVE for
its length).

Revision ID: 0018_partitioned_inbox
Revises: 0017_provider_stats_staged
Create Date: 2026-12-01
"""

from datetime import UTC, datetime, timedelta

from alembic import op
import sqlalchemy as sa

revision = '0018_partitioned_inbox'
down_revision = '0017_provider_stats_staged'
branch_labels = None
depends_on = None

S = 'marketplace_worker'
BATCH = 10_000

STATUS_CHECK = "status IN ('received', 'retrying', 'processed', 'ignored', 'parked')"
ENDPOINT_CHECK = "endpoint IN ('platform', 'connect', 'catchup')"
COLUMNS = """
    id text NOT NULL,
    type text NOT NULL,
    account text,
    livemode boolean NOT NULL,
    api_version text,
    created bigint NOT NULL,
    payload jsonb NOT NULL,
    endpoint text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    status text NOT NULL DEFAULT 'received',
    attempts integer NOT NULL DEFAULT 0,
    last_error text,
    next_attempt_at timestamptz,
    processed_at timestamptz,
    CONSTRAINT ck_stripe_events_endpoint CHECK ({endpoint}),
    CONSTRAINT ck_stripe_events_status CHECK ({status})
""".format(endpoint=ENDPOINT_CHECK, status=STATUS_CHECK)


def _month(day: datetime, ahead: int) -> datetime:
    """The first instant (UTC) of the month `ahead` months after `day`'s."""
    index = day.year * 12 + day.month - 1 + ahead
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


def upgrade() -> None:
    now = datetime.now(UTC)
    # A swap within a day of the month's end gives the legacy table the next month as well, so
    # the previous release's inserts never meet the check before the swap.
    legacy_ahead = 2 if _month(now, 1) - now < timedelta(days=1) else 1
    bound = _month(now, legacy_ahead)

    # Steps 1 to 4 are committed before the swap, which may stop on its lock timeout: each is
    # written so that running the migration again redoes it (IF NOT EXISTS, OR REPLACE, drop
    # and add), and the copy trigger keeps filling the key table meanwhile.
    op.execute("SET LOCAL lock_timeout = '10s'")  # the trigger's lock on the inbox, as the swap's
    op.execute(f"""
        CREATE TABLE IF NOT EXISTS {S}.stripe_event_ids (
            id text NOT NULL,
            received_at timestamptz NOT NULL,
            CONSTRAINT pk_stripe_event_ids PRIMARY KEY (id)
        )
    """)
    op.execute(f"CREATE INDEX IF NOT EXISTS ix_stripe_event_ids_received_at ON {S}.stripe_event_ids (received_at)")
    op.execute(f"""
        CREATE OR REPLACE FUNCTION {S}.stripe_event_ids_copy() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO {S}.stripe_event_ids (id, received_at) VALUES (NEW.id, NEW.received_at)
            ON CONFLICT (id) DO NOTHING;
            RETURN NULL;
        END $$
    """)
    op.execute(f"DROP TRIGGER IF EXISTS stripe_event_ids_copy ON {S}.stripe_events")
    op.execute(f"""
        CREATE TRIGGER stripe_event_ids_copy AFTER INSERT ON {S}.stripe_events
        FOR EACH ROW EXECUTE FUNCTION {S}.stripe_event_ids_copy()
    """)

    with op.get_context().autocommit_block():
        bind = op.get_bind()
        after = ''
        while True:
            last = bind.execute(sa.text(f"""
                WITH batch AS (
                    SELECT id, received_at FROM {S}.stripe_events WHERE id > :after ORDER BY id LIMIT :batch
                ), copied AS (
                    INSERT INTO {S}.stripe_event_ids (id, received_at) SELECT id, received_at FROM batch
                    ON CONFLICT (id) DO NOTHING
                )
                SELECT max(id) FROM batch
            """), {"after": after, "batch": BATCH}).scalar()
            if last is None:
                break
            after = last
        op.execute(f"ALTER TABLE {S}.stripe_events DROP CONSTRAINT IF EXISTS stripe_events_legacy_range")
        op.execute(f"""
            ALTER TABLE {S}.stripe_events ADD CONSTRAINT stripe_events_legacy_range
            CHECK (received_at < '{bound.isoformat()}') NOT VALID
        """)
        op.execute(f"ALTER TABLE {S}.stripe_events VALIDATE CONSTRAINT stripe_events_legacy_range")
        # A concurrent build that failed leaves an invalid index behind: built again.
        op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {S}.stripe_events_legacy_pkey")
        op.execute(f"CREATE UNIQUE INDEX CONCURRENTLY stripe_events_legacy_pkey ON {S}.stripe_events (id, received_at)")

    op.execute("SET LOCAL lock_timeout = '10s'")
    op.execute(f"ALTER TABLE {S}.stripe_events RENAME TO stripe_events_legacy")
    op.execute(f"DROP TRIGGER stripe_event_ids_copy ON {S}.stripe_events_legacy")
    op.execute(f"DROP FUNCTION {S}.stripe_event_ids_copy()")
    op.execute(f"ALTER TABLE {S}.stripe_events_legacy DROP CONSTRAINT pk_stripe_events")
    op.execute(f"""
        ALTER TABLE {S}.stripe_events_legacy
        ADD CONSTRAINT stripe_events_legacy_pkey PRIMARY KEY USING INDEX stripe_events_legacy_pkey
    """)
    op.execute(f"ALTER INDEX {S}.ix_stripe_events_status_received_at RENAME TO stripe_events_legacy_status_received_at_idx")
    op.execute(f"ALTER INDEX {S}.ix_stripe_events_created RENAME TO stripe_events_legacy_created_idx")
    op.execute(f"""
        CREATE TABLE {S}.stripe_events ({COLUMNS},
            CONSTRAINT pk_stripe_events PRIMARY KEY (id, received_at)
        ) PARTITION BY RANGE (received_at)
    """)
    op.create_index('ix_stripe_events_created', 'stripe_events', ['created'], unique=False, schema=S)
    op.create_index('ix_stripe_events_status_received_at', 'stripe_events', ['status', 'received_at'],
                    unique=False, schema=S)
    op.execute(f"""
        ALTER TABLE {S}.stripe_events ATTACH PARTITION {S}.stripe_events_legacy
        FOR VALUES FROM (MINVALUE) TO ('{bound.isoformat()}')
    """)
    op.execute(f"ALTER TABLE {S}.stripe_events_legacy DROP CONSTRAINT stripe_events_legacy_range")
    for ahead in range(legacy_ahead, legacy_ahead + 2):
        start, end = _month(now, ahead), _month(now, ahead + 1)
        op.execute(f"""
            CREATE TABLE {S}.stripe_events_{start:%Y_%m} PARTITION OF {S}.stripe_events
            FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')
        """)
    op.execute(f"CREATE TABLE {S}.stripe_events_default PARTITION OF {S}.stripe_events DEFAULT")


def downgrade() -> None:
    op.execute(f"ALTER TABLE {S}.stripe_events RENAME TO stripe_events_partitioned")
    op.execute(f"ALTER INDEX {S}.pk_stripe_events RENAME TO stripe_events_partitioned_pkey")
    op.execute(f"ALTER INDEX {S}.ix_stripe_events_created RENAME TO stripe_events_partitioned_created_idx")
    op.execute(f"ALTER INDEX {S}.ix_stripe_events_status_received_at "
               "RENAME TO stripe_events_partitioned_status_received_at_idx")
    op.execute(f"CREATE TABLE {S}.stripe_events ({COLUMNS}, CONSTRAINT pk_stripe_events PRIMARY KEY (id))")
    op.execute(f"""
        INSERT INTO {S}.stripe_events
        SELECT DISTINCT ON (id) * FROM {S}.stripe_events_partitioned ORDER BY id, received_at
    """)
    op.execute(f"DROP TABLE {S}.stripe_events_partitioned")
    op.create_index('ix_stripe_events_created', 'stripe_events', ['created'], unique=False, schema=S)
    op.create_index('ix_stripe_events_status_received_at', 'stripe_events', ['status', 'received_at'],
                    unique=False, schema=S)
    op.drop_index('ix_stripe_event_ids_received_at', table_name='stripe_event_ids', schema=S)
    op.drop_table('stripe_event_ids', schema=S)
