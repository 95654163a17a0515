"""inbox payloads compressed with lz4

Revision ID: 0019_inbox_payload_lz4
Revises: 0018_partitioned_inbox
Create Date: 2026-12-02

An event's payload (8-9 KB for an invoice) is TOAST-compressed as it is stored: with lz4 the
database spends about half the CPU per stored event that pglz costs it, for about a tenth more
bytes per payload (README, "Scale"). A catalog change under a short lock (`lock_timeout` 10 s):
payloads already stored keep pglz (Postgres reads either), new ones are written with lz4. A
partitioned table's compression is given to the partitions made after it, not to those that
exist, so each of those is set too. On a server built without lz4 the inbox keeps pglz.
"""

from alembic import op

revision = '0019_inbox_payload_lz4'
down_revision = '0018_partitioned_inbox'
branch_labels = None
depends_on = None


def _set_compression(method: str) -> None:
    op.execute("SET LOCAL lock_timeout = '10s'")
    op.execute(f"""
        DO $$
        DECLARE
            inbox regclass;
        BEGIN
            FOR inbox IN
                SELECT 'marketplace_worker.stripe_events'::regclass
                UNION ALL
                SELECT inhrelid::regclass FROM pg_inherits
                WHERE inhparent = 'marketplace_worker.stripe_events'::regclass
            LOOP
                EXECUTE format('ALTER TABLE %s ALTER COLUMN payload SET COMPRESSION {method}', inbox);
            END LOOP;
        EXCEPTION WHEN feature_not_supported THEN
            RAISE NOTICE 'this server has no lz4: inbox payloads stay compressed with pglz';
        END $$
    """)


def upgrade() -> None:
    _set_compression("lz4")


def downgrade() -> None:
    _set_compression("default")
