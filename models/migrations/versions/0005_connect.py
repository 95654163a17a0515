"""connect payouts reconciliation: transfers, payouts and their items, discrepancies

Revision ID: 0005_connect
Revises: 0004_jobs
Create Date: 2026-11-24
"""

from alembic import op
import sqlalchemy as sa

revision = '0005_connect'
down_revision = '0004_jobs'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('connect_accounts',
    sa.Column('account', sa.Text(), nullable=False),
    sa.Column('dirty_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('listed_until', sa.BigInteger(), nullable=True),
    sa.Column('last_reconciled_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('account', name=op.f('pk_connect_accounts')),
    schema='marketplace_worker'
    )
    op.create_table('connect_payout_items',
    sa.Column('balance_transaction_id', sa.Text(), nullable=False),
    sa.Column('account', sa.Text(), nullable=False),
    sa.Column('payout_id', sa.Text(), nullable=False),
    sa.Column('source', sa.Text(), nullable=True),
    sa.Column('type', sa.Text(), nullable=False),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('balance_transaction_id', name=op.f('pk_connect_payout_items')),
    schema='marketplace_worker'
    )
    op.create_index('ix_connect_payout_items_account_source', 'connect_payout_items', ['account', 'source'], unique=False, schema='marketplace_worker')
    op.create_index('ix_connect_payout_items_payout_id', 'connect_payout_items', ['payout_id'], unique=False, schema='marketplace_worker')
    op.create_table('connect_payouts',
    sa.Column('id', sa.Text(), nullable=False),
    sa.Column('account', sa.Text(), nullable=False),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.Column('currency', sa.Text(), nullable=False),
    sa.Column('status', sa.Text(), nullable=False),
    sa.Column('automatic', sa.Boolean(), nullable=False),
    sa.Column('reconciliation_status', sa.Text(), nullable=True),
    sa.Column('arrival_date', sa.BigInteger(), nullable=True),
    sa.Column('failure_code', sa.Text(), nullable=True),
    sa.Column('created', sa.BigInteger(), nullable=False),
    sa.Column('items_listed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('as_of', sa.BigInteger(), nullable=False),
    sa.Column('as_of_id', sa.Text(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_connect_payouts')),
    schema='marketplace_worker'
    )
    op.create_index('ix_connect_payouts_account_created', 'connect_payouts', ['account', 'created'], unique=False, schema='marketplace_worker')
    op.create_table('connect_transfers',
    sa.Column('id', sa.Text(), nullable=False),
    sa.Column('destination', sa.Text(), nullable=False),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.Column('amount_reversed', sa.BigInteger(), nullable=False),
    sa.Column('currency', sa.Text(), nullable=False),
    sa.Column('destination_payment', sa.Text(), nullable=True),
    sa.Column('source_transaction', sa.Text(), nullable=True),
    sa.Column('transfer_group', sa.Text(), nullable=True),
    sa.Column('marketplace_transaction_id', sa.Text(), nullable=True),
    sa.Column('created', sa.BigInteger(), nullable=False),
    sa.Column('as_of', sa.BigInteger(), nullable=False),
    sa.Column('as_of_id', sa.Text(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_connect_transfers')),
    schema='marketplace_worker'
    )
    op.create_index('ix_connect_transfers_destination_created', 'connect_transfers', ['destination', 'created'], unique=False, schema='marketplace_worker')
    op.create_index('ix_connect_transfers_destination_payment', 'connect_transfers', ['destination_payment'], unique=False, schema='marketplace_worker')
    op.create_table('reconcile_discrepancies',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('kind', sa.Text(), nullable=False),
    sa.Column('subject', sa.Text(), nullable=False),
    sa.Column('account', sa.Text(), nullable=False),
    sa.Column('transaction_id', sa.BigInteger(), nullable=True),
    sa.Column('expected_cents', sa.BigInteger(), nullable=True),
    sa.Column('seen_cents', sa.BigInteger(), nullable=True),
    sa.Column('currency', sa.Text(), nullable=True),
    sa.Column('transfer_ids', sa.ARRAY(sa.Text()), nullable=True),
    sa.Column('payout_id', sa.Text(), nullable=True),
    sa.Column('detail', sa.Text(), nullable=False),
    sa.Column('first_seen_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('last_seen_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('resolved_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_reconcile_discrepancies')),
    sa.UniqueConstraint('kind', 'subject', name=op.f('uq_reconcile_discrepancies_kind_subject')),
    schema='marketplace_worker'
    )
    op.create_index('ix_reconcile_discrepancies_account', 'reconcile_discrepancies', ['account'], unique=False, schema='marketplace_worker')
    op.create_index('ix_reconcile_discrepancies_resolved_at', 'reconcile_discrepancies', ['resolved_at'], unique=False, schema='marketplace_worker')


def downgrade() -> None:
    op.drop_index('ix_reconcile_discrepancies_resolved_at', table_name='reconcile_discrepancies', schema='marketplace_worker')
    op.drop_index('ix_reconcile_discrepancies_account', table_name='reconcile_discrepancies', schema='marketplace_worker')
    op.drop_table('reconcile_discrepancies', schema='marketplace_worker')
    op.drop_index('ix_connect_transfers_destination_payment', table_name='connect_transfers', schema='marketplace_worker')
    op.drop_index('ix_connect_transfers_destination_created', table_name='connect_transfers', schema='marketplace_worker')
    op.drop_table('connect_transfers', schema='marketplace_worker')
    op.drop_index('ix_connect_payouts_account_created', table_name='connect_payouts', schema='marketplace_worker')
    op.drop_table('connect_payouts', schema='marketplace_worker')
    op.drop_index('ix_connect_payout_items_payout_id', table_name='connect_payout_items', schema='marketplace_worker')
    op.drop_index('ix_connect_payout_items_account_source', table_name='connect_payout_items', schema='marketplace_worker')
    op.drop_table('connect_payout_items', schema='marketplace_worker')
    op.drop_table('connect_accounts', schema='marketplace_worker')
