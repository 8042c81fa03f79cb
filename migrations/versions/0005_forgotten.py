"""who asked to be forgotten (hashes only), so a later import does not bring them back

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 07:00:00.000000
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('forgotten',
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('key', name=op.f('pk_forgotten')),
    )


def downgrade() -> None:
    op.drop_table('forgotten')
