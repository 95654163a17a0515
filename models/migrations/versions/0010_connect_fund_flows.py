"""connect reconciliation: destination charges, refunds after transfer, manual payouts, stored matches

Transfers keep what their source charge says of the fund flow (destination charge, application
fee and its refunds) and the transaction they were matched to, so a run matches only new or
changed transfers. Payouts keep their method (an instant payout says nothing of the schedule);
accounts keep their payout schedule when it had to be read; `connect_payments` holds the
`payment` balance transactions of accounts on manual payouts (when their money is available).

Revision ID: 0010_connect_fund_flows
Revises: 0009_catchup_windows
Create Date: 2026-12-01
"""

from alembic import op
import sqlalchemy as sa

revision = '0010_connect_fund_flows'
down_revision = '0009_catchup_windows'
branch_labels = None
depends_on = None

SCHEMA = 'marketplace_worker'


def upgrade() -> None:
    for column in (
        sa.Column('source_payment_intent', sa.Text(), nullable=True),
        sa.Column('destination_charge', sa.Boolean(), nullable=True),
        sa.Column('application_fee_id', sa.Text(), nullable=True),
        sa.Column('application_fee_amount', sa.BigInteger(), nullable=True),
        sa.Column('application_fee_refunded', sa.BigInteger(), nullable=True),
        sa.Column('fee_checked_reversed', sa.BigInteger(), nullable=True),
        sa.Column('transaction_id', sa.BigInteger(), nullable=True),
    ):
        op.add_column('connect_transfers', column, schema=SCHEMA)
    op.create_index('ix_connect_transfers_transaction_id', 'connect_transfers', ['transaction_id'], unique=False,
                    schema=SCHEMA)
    op.create_index('ix_connect_transfers_unmatched', 'connect_transfers', ['destination'], unique=False,
                    schema=SCHEMA, postgresql_where=sa.text('transaction_id IS NULL'))
    op.create_index('ix_connect_transfers_destination_updated_at', 'connect_transfers',
                    ['destination', 'updated_at'], unique=False, schema=SCHEMA)
    op.add_column('connect_payouts', sa.Column('method', sa.Text(), nullable=True), schema=SCHEMA)
    op.add_column('connect_accounts', sa.Column('payout_interval', sa.Text(), nullable=True), schema=SCHEMA)
    op.add_column('connect_accounts', sa.Column('payout_interval_read_at', sa.DateTime(timezone=True),
                                                nullable=True), schema=SCHEMA)
    op.create_table('connect_payments',
    sa.Column('id', sa.Text(), nullable=False),
    sa.Column('account', sa.Text(), nullable=False),
    sa.Column('balance_transaction_id', sa.Text(), nullable=False),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.Column('available_on', sa.BigInteger(), nullable=False),
    sa.Column('created', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_connect_payments')),
    schema=SCHEMA
    )
    op.create_index('ix_connect_payments_account', 'connect_payments', ['account'], unique=False, schema=SCHEMA)
    # Transfers stored before this revision are matched again by the next run of their account.


def downgrade() -> None:
    op.drop_index('ix_connect_payments_account', table_name='connect_payments', schema=SCHEMA)
    op.drop_table('connect_payments', schema=SCHEMA)
    op.drop_column('connect_accounts', 'payout_interval_read_at', schema=SCHEMA)
    op.drop_column('connect_accounts', 'payout_interval', schema=SCHEMA)
    op.drop_column('connect_payouts', 'method', schema=SCHEMA)
    op.drop_index('ix_connect_transfers_destination_updated_at', table_name='connect_transfers', schema=SCHEMA)
    op.drop_index('ix_connect_transfers_unmatched', table_name='connect_transfers', schema=SCHEMA)
    op.drop_index('ix_connect_transfers_transaction_id', table_name='connect_transfers', schema=SCHEMA)
    for name in ('transaction_id', 'fee_checked_reversed', 'application_fee_refunded', 'application_fee_amount',
                 'application_fee_id', 'destination_charge', 'source_payment_intent'):
        op.drop_column('connect_transfers', name, schema=SCHEMA)
