"""events catch-up windows per scope; connected accounts' state (deauthorized, tie to resolve)

Revision ID: 0009_catchup_windows
Revises: 0008_payment_links
Create Date: 2026-12-01
"""

from alembic import op
import sqlalchemy as sa

revision = '0009_catchup_windows'
down_revision = '0008_payment_links'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('catchup_windows',
    sa.Column('scope', sa.Text(), nullable=False),
    sa.Column('listed_until', sa.BigInteger(), nullable=True),
    sa.Column('pending_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('pending_reason', sa.Text(), nullable=True),
    sa.Column('list_from', sa.BigInteger(), nullable=True),
    sa.Column('failures', sa.Integer(), server_default='0', nullable=False),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('retry_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('scope', name=op.f('pk_catchup_windows')),
    schema='marketplace_worker'
    )
    op.create_table('connect_account_states',
    sa.Column('account', sa.Text(), nullable=False),
    sa.Column('deauthorized', sa.Boolean(), server_default='false', nullable=False),
    sa.Column('read_after', sa.BigInteger(), nullable=True),
    sa.Column('read_attempts', sa.Integer(), server_default='0', nullable=False),
    sa.Column('read_error', sa.Text(), nullable=True),
    sa.Column('read_retry_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('account', name=op.f('pk_connect_account_states')),
    schema='marketplace_worker'
    )
    # Accounts deauthorized before this migration: their newest applied snapshot is the
    # deauthorization event.
    op.execute("""
        INSERT INTO marketplace_worker.connect_account_states (account, deauthorized)
        SELECT v.object_id, true
        FROM marketplace_worker.stripe_object_versions v
        JOIN marketplace_worker.stripe_events e ON e.id = v.event_id
        WHERE v.object_type = 'account' AND e.type = 'account.application.deauthorized'
    """)


def downgrade() -> None:
    op.drop_table('connect_account_states', schema='marketplace_worker')
    op.drop_table('catchup_windows', schema='marketplace_worker')
