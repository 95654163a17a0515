"""touched providers: one row per touching transaction instead of one row per provider

A row per provider was updated by every webhook of that provider, so concurrent webhooks of
one provider waited for each other's commit.

Revision ID: 0007_touches_append_only
Revises: 0006_version_rank
Create Date: 2026-11-25
"""

from alembic import op
import sqlalchemy as sa

revision = '0007_touches_append_only'
down_revision = '0006_version_rank'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_constraint('pk_touched_providers', 'touched_providers', schema='marketplace_worker')
    op.add_column('touched_providers',
                  sa.Column('id', sa.BigInteger(), sa.Identity(always=True), nullable=False),
                  schema='marketplace_worker')
    op.create_primary_key('pk_touched_providers', 'touched_providers', ['id'], schema='marketplace_worker')


def downgrade() -> None:
    op.drop_constraint('pk_touched_providers', 'touched_providers', schema='marketplace_worker')
    op.drop_column('touched_providers', 'id', schema='marketplace_worker')
    op.execute("""
        DELETE FROM marketplace_worker.touched_providers t
        USING marketplace_worker.touched_providers newer
        WHERE newer.provider_id = t.provider_id AND newer.ctid > t.ctid
    """)
    op.create_primary_key('pk_touched_providers', 'touched_providers', ['provider_id'],
                          schema='marketplace_worker')
