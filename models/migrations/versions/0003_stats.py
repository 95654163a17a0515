"""provider stats: recompute stamps

Revision ID: 0003_stats
Revises: 0002_ledger
Create Date: 2026-11-24
"""

from alembic import op
import sqlalchemy as sa

revision = '0003_stats'
down_revision = '0002_ledger'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('provider_stats_recomputed',
    sa.Column('provider_id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('recomputed_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('provider_id', name=op.f('pk_provider_stats_recomputed')),
    schema='marketplace_worker'
    )


def downgrade() -> None:
    op.drop_table('provider_stats_recomputed', schema='marketplace_worker')
