"""fan-out items: the work a job's run published, until it is done

A broker that loses a job's task messages (a flushed or failed-over Redis, a purged queue)
no longer loses the work: the fan-out sweeper re-enqueues the pieces not done.

Revision ID: 0011_fanout
Revises: 0010_connect_fund_flows
Create Date: 2026-11-30
"""

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0011_fanout'
down_revision = '0010_connect_fund_flows'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'fanout_items',
        sa.Column('id', sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column('job', sa.Text(), nullable=False),
        sa.Column('run_id', sa.BigInteger(), nullable=True),
        sa.Column('task', sa.Text(), nullable=False),
        sa.Column('key', sa.Text(), nullable=False),
        sa.Column('args', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.Column('due_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.Column('enqueues', sa.Integer(), server_default=sa.text('1'), nullable=False),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('outcome', sa.Text(), nullable=True),
        sa.Column('error', sa.Text(), nullable=True),
        sa.CheckConstraint("outcome IN ('ok', 'failed')", name=op.f('ck_fanout_items_outcome')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_fanout_items')),
        schema='marketplace_worker',
    )
    op.create_index('uq_fanout_items_task_key_pending', 'fanout_items', ['task', 'key'], unique=True,
                    schema='marketplace_worker', postgresql_where=sa.text('finished_at IS NULL'))
    op.create_index('ix_fanout_items_due_at_pending', 'fanout_items', ['due_at'], unique=False,
                    schema='marketplace_worker', postgresql_where=sa.text('finished_at IS NULL'))
    op.create_index('ix_fanout_items_created_at', 'fanout_items', ['created_at'], unique=False,
                    schema='marketplace_worker')


def downgrade() -> None:
    op.drop_table('fanout_items', schema='marketplace_worker')
