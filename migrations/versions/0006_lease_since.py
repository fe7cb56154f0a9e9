"""When a lease was taken: `status` shows how long each worker has held its image

Leases now belong to one worker (host:pid:worker:token); a lease written before this (host:pid:token) is still read.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("lease_since", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.drop_column("lease_since")
