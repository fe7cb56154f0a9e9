"""Indexes that make taking the next image cost the same at any catalogue size; image sizes 64-bit

ix_images_claim: (run_id, position, image_id) over the unfinished rows only, so a claim reads the first free row
instead of loading every unfinished one. ix_images_lease_owner: the few rows a lease is held on. ix_events_image:
an image's events, which `report` reads a batch of images at a time.
images.size and images.after_size become BIGINT: SQLite never cared, PostgreSQL refuses an image of 2 GiB or more
in a 32-bit INTEGER ("integer out of range").

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

UNFINISHED = sa.text("state NOT IN ('blocked', 'done', 'failed', 'skipped')")  # as models.UNFINISHED, frozen here


def upgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.alter_column("size", type_=sa.BigInteger(), existing_type=sa.Integer(), existing_nullable=True)
        batch.alter_column("after_size", type_=sa.BigInteger(), existing_type=sa.Integer(), existing_nullable=True)
    op.create_index(
        "ix_images_claim",
        "images",
        ["run_id", "position", "image_id"],
        sqlite_where=UNFINISHED,
        postgresql_where=UNFINISHED,
    )
    op.create_index("ix_images_lease_owner", "images", ["run_id", "lease_owner"])
    op.create_index("ix_events_image", "events", ["run_id", "image_id"])


def downgrade() -> None:
    op.drop_index("ix_events_image", table_name="events")
    op.drop_index("ix_images_lease_owner", table_name="images")
    op.drop_index("ix_images_claim", table_name="images")
    with op.batch_alter_table("images") as batch:
        batch.alter_column("after_size", type_=sa.Integer(), existing_type=sa.BigInteger(), existing_nullable=True)
        batch.alter_column("size", type_=sa.Integer(), existing_type=sa.BigInteger(), existing_nullable=True)
