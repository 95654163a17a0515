"""provider stats: the full pass's values, staged once per pass for its range tasks

Revision ID: 0017_provider_stats_staged
Revises: 0016_discrepancy_workflow
Create Date: 2026-12-01
"""

from alembic import op
import sqlalchemy as sa

revision = '0017_provider_stats_staged'
down_revision = '0016_discrepancy_workflow'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('provider_stats_staged',
    sa.Column('provider_id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('total_listings', sa.Integer(), nullable=False),
    sa.Column('total_transactions', sa.Integer(), nullable=False),
    sa.Column('total_revenue_cents', sa.BigInteger(), nullable=False),
    sa.Column('average_rating', sa.Numeric(precision=3, scale=2), nullable=False),
    sa.Column('staged_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('provider_id', name=op.f('pk_provider_stats_staged')),
    schema='marketplace_worker',
    prefixes=['UNLOGGED']
    )


def downgrade() -> None:
    op.drop_table('provider_stats_staged', schema='marketplace_worker')
