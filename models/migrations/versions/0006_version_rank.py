"""object versions: order snapshots of one second by their lifecycle rank

Revision ID: 0006_version_rank
Revises: 0005_connect
Create Date: 2026-11-24
"""

from alembic import op
import sqlalchemy as sa

revision = '0006_version_rank'
down_revision = '0005_connect'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('stripe_object_versions', sa.Column('rank', sa.SmallInteger(), server_default='0', nullable=False),
                  schema='marketplace_worker')


def downgrade() -> None:
    op.drop_column('stripe_object_versions', 'rank', schema='marketplace_worker')
