"""backfill cursors: where a backfill from Stripe's list endpoints got to, per stream and account

Revision ID: 0012_backfill
Revises: 0011_fanout
Create Date: 2026-12-01
"""

from alembic import op
import sqlalchemy as sa

revision = '0012_backfill'
down_revision = '0011_fanout'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('backfill_cursors',
    sa.Column('stream', sa.Text(), nullable=False),
    sa.Column('scope', sa.Text(), nullable=False),
    sa.Column('since', sa.BigInteger(), nullable=False),
    sa.Column('starting_after', sa.Text(), nullable=True),
    sa.Column('last_created', sa.BigInteger(), nullable=True),
    sa.Column('pages', sa.Integer(), server_default='0', nullable=False),
    sa.Column('objects', sa.Integer(), server_default='0', nullable=False),
    sa.Column('done_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('stream', 'scope', name=op.f('pk_backfill_cursors')),
    schema='marketplace_worker'
    )


def downgrade() -> None:
    op.drop_table('backfill_cursors', schema='marketplace_worker')
