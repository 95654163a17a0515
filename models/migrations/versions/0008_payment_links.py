"""payment links on current API versions: recorded invoice payments, and the poller's
to-do list of Stripe invoices to read (unlinked paid ones, stale open ones)

Revision ID: 0008_payment_links
Revises: 0007_touches_append_only
Create Date: 2026-11-30
"""

from alembic import op
import sqlalchemy as sa

revision = '0008_payment_links'
down_revision = '0007_touches_append_only'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('stripe_invoice_payments',
    sa.Column('invoice_payment_id', sa.Text(), nullable=False),
    sa.Column('stripe_invoice_id', sa.Text(), nullable=False),
    sa.Column('charge_id', sa.Text(), nullable=True),
    sa.Column('payment_intent_id', sa.Text(), nullable=True),
    sa.Column('status', sa.Text(), nullable=False),
    sa.Column('event_created', sa.BigInteger(), nullable=False),
    sa.Column('event_id', sa.Text(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('invoice_payment_id', name=op.f('pk_stripe_invoice_payments')),
    schema='marketplace_worker'
    )
    op.create_index('ix_stripe_invoice_payments_stripe_invoice_id', 'stripe_invoice_payments',
                    ['stripe_invoice_id'], unique=False, schema='marketplace_worker')
    op.create_table('stripe_invoice_reads',
    sa.Column('invoice_id', sa.Integer(), nullable=False),
    sa.Column('stripe_invoice_id', sa.Text(), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('due_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('invoice_id', name=op.f('pk_stripe_invoice_reads')),
    schema='marketplace_worker'
    )
    op.create_index('ix_stripe_invoice_reads_reason_due_at', 'stripe_invoice_reads', ['reason', 'due_at'],
                    unique=False, schema='marketplace_worker')
    # Every Stripe invoice the poller used to find by scanning goes on the list, due now:
    # paid ones without their charge, and draft or open ones.
    op.execute(
        """
        INSERT INTO marketplace_worker.stripe_invoice_reads (invoice_id, stripe_invoice_id, reason, due_at)
        SELECT id, "stripeInvoiceId",
               CASE WHEN status = 'paid' THEN 'unlinked' ELSE 'stale' END, now()
        FROM public."Invoice"
        WHERE "isMarketplaceInvoice" AND "stripeInvoiceId" IS NOT NULL AND "deletedAt" IS NULL
          AND (status IN ('draft', 'open') OR (status = 'paid' AND "stripeChargeId" IS NULL))
        """
    )


def downgrade() -> None:
    op.drop_index('ix_stripe_invoice_reads_reason_due_at', table_name='stripe_invoice_reads',
                  schema='marketplace_worker')
    op.drop_table('stripe_invoice_reads', schema='marketplace_worker')
    op.drop_index('ix_stripe_invoice_payments_stripe_invoice_id', table_name='stripe_invoice_payments',
                  schema='marketplace_worker')
    op.drop_table('stripe_invoice_payments', schema='marketplace_worker')
