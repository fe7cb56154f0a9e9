"""location-swap: the id of an image's second copy, and the run's spool directory

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("copy_image_id", sa.String(length=36), nullable=True))
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("spool_dir", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("spool_dir")
    with op.batch_alter_table("images") as batch:
        batch.drop_column("copy_image_id")
