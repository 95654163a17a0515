"""event inbox, object versions, watermarks

Revision ID: 0001
Revises: 
Create Date: 2026-11-24
"""

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('stripe_events',
    sa.Column('id', sa.Text(), nullable=False),
    sa.Column('type', sa.Text(), nullable=False),
    sa.Column('account', sa.Text(), nullable=True),
    sa.Column('livemode', sa.Boolean(), nullable=False),
    sa.Column('api_version', sa.Text(), nullable=True),
    sa.Column('created', sa.BigInteger(), nullable=False),
    sa.Column('payload', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('endpoint', sa.Text(), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('status', sa.Text(), server_default='received', nullable=False),
    sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('processed_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("endpoint IN ('platform', 'connect', 'catchup')", name=op.f('ck_stripe_events_endpoint')),
    sa.CheckConstraint("status IN ('received', 'retrying', 'processed', 'ignored', 'parked')", name=op.f('ck_stripe_events_status')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_stripe_events')),
    schema='marketplace_worker'
    )
    op.create_index('ix_stripe_events_created', 'stripe_events', ['created'], unique=False, schema='marketplace_worker')
    op.create_index('ix_stripe_events_status_received_at', 'stripe_events', ['status', 'received_at'], unique=False, schema='marketplace_worker')
    op.create_table('stripe_object_versions',
    sa.Column('object_id', sa.Text(), nullable=False),
    sa.Column('object_type', sa.Text(), nullable=False),
    sa.Column('event_created', sa.BigInteger(), nullable=False),
    sa.Column('event_id', sa.Text(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('object_id', name=op.f('pk_stripe_object_versions')),
    schema='marketplace_worker'
    )
    op.create_table('watermarks',
    sa.Column('name', sa.Text(), nullable=False),
    sa.Column('position_at', sa.DateTime(), nullable=True),
    sa.Column('position_id', sa.BigInteger(), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_watermarks')),
    schema='marketplace_worker'
    )


def downgrade() -> None:
    op.drop_table('watermarks', schema='marketplace_worker')
    op.drop_table('stripe_object_versions', schema='marketplace_worker')
    op.drop_index('ix_stripe_events_status_received_at', table_name='stripe_events', schema='marketplace_worker')
    op.drop_index('ix_stripe_events_created', table_name='stripe_events', schema='marketplace_worker')
    op.drop_table('stripe_events', schema='marketplace_worker')
