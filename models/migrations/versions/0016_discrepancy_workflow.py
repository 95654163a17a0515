"""discrepancy workflow: acknowledgements on reconcile_discrepancies, and the history of every
change in reconcile_discrepancy_events (written from what the rows say for existing ones)

Revision ID: 0016_discrepancy_workflow
Revises: 0012_backfill
Create Date: 2026-12-01
"""

from alembic import op
import sqlalchemy as sa

revision = '0016_discrepancy_workflow'
down_revision = '0012_backfill'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('reconcile_discrepancies', sa.Column('acknowledged_at', sa.DateTime(timezone=True), nullable=True), schema='marketplace_worker')
    op.add_column('reconcile_discrepancies', sa.Column('acknowledged_by', sa.Text(), nullable=True), schema='marketplace_worker')
    op.add_column('reconcile_discrepancies', sa.Column('acknowledged_note', sa.Text(), nullable=True), schema='marketplace_worker')
    op.create_check_constraint(
        op.f('ck_reconcile_discrepancies_acknowledged_whole'), 'reconcile_discrepancies',
        "(acknowledged_at IS NULL) = (acknowledged_by IS NULL) AND (acknowledged_at IS NULL) = (acknowledged_note IS NULL)",
        schema='marketplace_worker',
    )
    op.create_table('reconcile_discrepancy_events',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('discrepancy_id', sa.BigInteger(), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('change', sa.Text(), nullable=False),
    sa.Column('by', sa.Text(), nullable=False),
    sa.Column('note', sa.Text(), nullable=True),
    sa.Column('expected_cents', sa.BigInteger(), nullable=True),
    sa.Column('seen_cents', sa.BigInteger(), nullable=True),
    sa.Column('currency', sa.Text(), nullable=True),
    sa.CheckConstraint("change IN ('opened', 'amount_changed', 'acknowledged', 'reopened', 'resolved')", name=op.f('ck_reconcile_discrepancy_events_change')),
    sa.ForeignKeyConstraint(['discrepancy_id'], ['marketplace_worker.reconcile_discrepancies.id'], name='fk_reconcile_discrepancy_events_discrepancy_id', ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_reconcile_discrepancy_events')),
    schema='marketplace_worker'
    )
    op.create_index('ix_reconcile_discrepancy_events_discrepancy_id', 'reconcile_discrepancy_events', ['discrepancy_id', 'id'], unique=False, schema='marketplace_worker')
    # What the existing rows tell: when each was (last) opened and, if it was, resolved, with
    # its last amounts (earlier amounts were not kept).
    op.execute(
        """
        INSERT INTO marketplace_worker.reconcile_discrepancy_events
            (discrepancy_id, at, change, by, note, expected_cents, seen_cents, currency)
        SELECT d.id, e.at, e.change, 'reconcile', 'written from the discrepancy when its history began',
               d.expected_cents, d.seen_cents, d.currency
        FROM marketplace_worker.reconcile_discrepancies d,
             LATERAL (VALUES (1, d.first_seen_at, 'opened'), (2, d.resolved_at, 'resolved')) AS e(n, at, change)
        WHERE e.at IS NOT NULL
        ORDER BY d.id, e.n
        """
    )


def downgrade() -> None:
    op.drop_index('ix_reconcile_discrepancy_events_discrepancy_id', table_name='reconcile_discrepancy_events', schema='marketplace_worker')
    op.drop_table('reconcile_discrepancy_events', schema='marketplace_worker')
    op.drop_constraint(op.f('ck_reconcile_discrepancies_acknowledged_whole'), 'reconcile_discrepancies', type_='check', schema='marketplace_worker')
    op.drop_column('reconcile_discrepancies', 'acknowledged_note', schema='marketplace_worker')
    op.drop_column('reconcile_discrepancies', 'acknowledged_by', schema='marketplace_worker')
    op.drop_column('reconcile_discrepancies', 'acknowledged_at', schema='marketplace_worker')
