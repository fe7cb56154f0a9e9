"""The state DB's tables (SQLAlchemy 2 typed ORM). Alembic's scripts in migrations/ create them.

runs    one row per migration run: where from, where to, how.
images  one row per (run, image): what the image was at discovery, where it is now, who holds it.
events  append-only log of every state change, the audit trail behind `status` and `report`.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import BigInteger, Boolean, DateTime, ForeignKey, Index, Integer, MetaData, String, Text, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from glance_migrator.state import TERMINAL

# The rows a runner may still take: what the claim index holds (a partial index, SQLite and PostgreSQL alike)
UNFINISHED = text("state NOT IN (" + ", ".join(f"'{s}'" for s in sorted(TERMINAL)) + ")")

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Naive UTC: SQLite keeps no time zone, so every timestamp in the DB is UTC by convention."""
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    from_store: Mapped[str] = mapped_column(String(255))
    to_store: Mapped[str] = mapped_column(String(255))
    strategy: Mapped[str] = mapped_column(String(32))
    cloud: Mapped[str | None] = mapped_column(String(255))
    spool_dir: Mapped[str | None] = mapped_column(Text)  # location-swap: where downloads are kept


class ImageRow(Base):
    __tablename__ = "images"
    __table_args__ = (
        # Taking the next image reads the first free row of this index: the same cost at 50 rows and 500,000.
        Index(
            "ix_images_claim", "run_id", "position", "image_id", sqlite_where=UNFINISHED, postgresql_where=UNFINISHED
        ),
        # Leases held: a few rows (one per worker), found without reading the others.
        Index("ix_images_lease_owner", "run_id", "lease_owner"),
        # `status`: the counts per state read this index alone, and the failed, blocked and skipped images are
        # found in it without reading the others.
        Index("ix_images_run_state", "run_id", "state"),
    )

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    image_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    # What the image was at discovery: the reference every later check compares against.
    name: Mapped[str | None] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(32))
    size: Mapped[int | None] = mapped_column(BigInteger)  # bytes: 64-bit (a 2.2 GiB image overflows 32 bits)
    checksum: Mapped[str | None] = mapped_column(String(32))
    os_hash_algo: Mapped[str | None] = mapped_column(String(64))
    os_hash_value: Mapped[str | None] = mapped_column(String(128))
    stores: Mapped[str | None] = mapped_column(String(255))
    owner: Mapped[str | None] = mapped_column(String(64))
    visibility: Mapped[str | None] = mapped_column(String(32))
    os_hidden: Mapped[bool] = mapped_column(Boolean, default=False)
    # Where the migration stands.
    strategy: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(32))
    position: Mapped[int | None] = mapped_column(Integer)  # runs take their images in this order
    failed_at: Mapped[str | None] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(Text)
    error_kind: Mapped[str | None] = mapped_column(String(32))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # What Glance reported once the copy was verified, and at the end.
    after_stores: Mapped[str | None] = mapped_column(String(255))
    after_checksum: Mapped[str | None] = mapped_column(String(32))
    after_hash_algo: Mapped[str | None] = mapped_column(String(64))  # Glance may compute a new multihash
    after_hash_value: Mapped[str | None] = mapped_column(String(128))
    after_size: Mapped[int | None] = mapped_column(BigInteger)
    # location-swap: the second image B that now shares its data object with this one.
    copy_image_id: Mapped[str | None] = mapped_column(String(36))
    # The worker on this image (host:pid:worker:token), since when, and until when its claim holds without a
    # heartbeat (statedb.py: the leases).
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_since: Mapped[datetime | None] = mapped_column(DateTime)
    lease_expires: Mapped[datetime | None] = mapped_column(DateTime)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)


class Event(Base):
    __tablename__ = "events"
    __table_args__ = (Index("ix_events_image", "run_id", "image_id"),)  # an image's events, for `report`

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    image_id: Mapped[str] = mapped_column(String(36))
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    from_state: Mapped[str | None] = mapped_column(String(32))
    to_state: Mapped[str] = mapped_column(String(32))
    message: Mapped[str | None] = mapped_column(Text)
