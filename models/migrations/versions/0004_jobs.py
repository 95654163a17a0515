"""job runs

Revision ID: 0004_jobs
Revises: 0003_stats
Create Date: 2026-11-24
"""

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0004_jobs'
down_revision = '0003_stats'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('job_runs',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('job', sa.Text(), nullable=False),
    sa.Column('slot', sa.DateTime(timezone=True), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('outcome', sa.Text(), nullable=False),
    sa.Column('counts', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.CheckConstraint("outcome IN ('running', 'ok', 'failed', 'skipped')", name=op.f('ck_job_runs_outcome')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_job_runs')),
    schema='marketplace_worker'
    )
    op.create_index('ix_job_runs_job_started_at', 'job_runs', ['job', 'started_at'], unique=False, schema='marketplace_worker')
    op.create_index('ix_job_runs_started_at', 'job_runs', ['started_at'], unique=False, schema='marketplace_worker')
    op.create_index('uq_job_runs_job_slot', 'job_runs', ['job', 'slot'], unique=True, schema='marketplace_worker', postgresql_where=sa.text("outcome IN ('running', 'ok')"))


def downgrade() -> None:
    op.drop_index('uq_job_runs_job_slot', table_name='job_runs', schema='marketplace_worker', postgresql_where=sa.text("outcome IN ('running', 'ok')"))
    op.drop_index('ix_job_runs_started_at', table_name='job_runs', schema='marketplace_worker')
    op.drop_index('ix_job_runs_job_started_at', table_name='job_runs', schema='marketplace_worker')
    op.drop_table('job_runs', schema='marketplace_worker')
