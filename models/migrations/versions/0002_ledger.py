"""ledger: charges, refunds, disputes, invoice -> transaction key, refunded cents, touched providers

Revision ID: 0002_ledger
Revises: 0001
Create Date: 2026-11-24
"""

from alembic import op
import sqlalchemy as sa


revision = '0002_ledger'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('invoice_transactions',
    sa.Column('invoice_id', sa.Integer(), nullable=False),
    sa.Column('transaction_id', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('invoice_id', name=op.f('pk_invoice_transactions')),
    sa.UniqueConstraint('transaction_id', name=op.f('uq_invoice_transactions_transaction_id')),
    schema='marketplace_worker'
    )
    op.create_table('stripe_charges',
    sa.Column('charge_id', sa.Text(), nullable=False),
    sa.Column('payment_intent_id', sa.Text(), nullable=True),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.Column('amount_refunded', sa.BigInteger(), nullable=False),
    sa.Column('refunded', sa.Boolean(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('charge_id', name=op.f('pk_stripe_charges')),
    schema='marketplace_worker'
    )
    op.create_index('ix_stripe_charges_payment_intent_id', 'stripe_charges', ['payment_intent_id'], unique=False, schema='marketplace_worker')
    op.create_table('stripe_disputes',
    sa.Column('dispute_id', sa.Text(), nullable=False),
    sa.Column('charge_id', sa.Text(), nullable=True),
    sa.Column('payment_intent_id', sa.Text(), nullable=True),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.Column('status', sa.Text(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('dispute_id', name=op.f('pk_stripe_disputes')),
    schema='marketplace_worker'
    )
    op.create_index('ix_stripe_disputes_charge_id', 'stripe_disputes', ['charge_id'], unique=False, schema='marketplace_worker')
    op.create_index('ix_stripe_disputes_payment_intent_id', 'stripe_disputes', ['payment_intent_id'], unique=False, schema='marketplace_worker')
    op.create_table('stripe_refunds',
    sa.Column('refund_id', sa.Text(), nullable=False),
    sa.Column('charge_id', sa.Text(), nullable=True),
    sa.Column('payment_intent_id', sa.Text(), nullable=True),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.Column('status', sa.Text(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('refund_id', name=op.f('pk_stripe_refunds')),
    schema='marketplace_worker'
    )
    op.create_index('ix_stripe_refunds_charge_id', 'stripe_refunds', ['charge_id'], unique=False, schema='marketplace_worker')
    op.create_index('ix_stripe_refunds_payment_intent_id', 'stripe_refunds', ['payment_intent_id'], unique=False, schema='marketplace_worker')
    op.create_table('touched_providers',
    sa.Column('provider_id', sa.Integer(), nullable=False),
    sa.Column('touched_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('provider_id', name=op.f('pk_touched_providers')),
    schema='marketplace_worker'
    )
    op.create_table('transaction_refunds',
    sa.Column('transaction_id', sa.BigInteger(), nullable=False),
    sa.Column('refunded_cents', sa.BigInteger(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('transaction_id', name=op.f('pk_transaction_refunds')),
    schema='marketplace_worker'
    )


def downgrade() -> None:
    op.drop_table('transaction_refunds', schema='marketplace_worker')
    op.drop_table('touched_providers', schema='marketplace_worker')
    op.drop_index('ix_stripe_refunds_payment_intent_id', table_name='stripe_refunds', schema='marketplace_worker')
    op.drop_index('ix_stripe_refunds_charge_id', table_name='stripe_refunds', schema='marketplace_worker')
    op.drop_table('stripe_refunds', schema='marketplace_worker')
    op.drop_index('ix_stripe_disputes_payment_intent_id', table_name='stripe_disputes', schema='marketplace_worker')
    op.drop_index('ix_stripe_disputes_charge_id', table_name='stripe_disputes', schema='marketplace_worker')
    op.drop_table('stripe_disputes', schema='marketplace_worker')
    op.drop_index('ix_stripe_charges_payment_intent_id', table_name='stripe_charges', schema='marketplace_worker')
    op.drop_table('stripe_charges', schema='marketplace_worker')
    op.drop_table('invoice_transactions', schema='marketplace_worker')
