"""images.after_hash_algo: the algorithm of the multihash Glance shows after the move

Glance computes the multihash with its current `hashing_algorithm` whenever it writes an image's data, so
after a copy-image an md5-only (pre-Rocky) image has one, and others may have one of another algorithm.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("after_hash_algo", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.drop_column("after_hash_algo")
