"""Alembic environment: always run on the connection glance-migrator passes in (see statedb.py)."""

from __future__ import annotations

from alembic import context

from glance_migrator.models import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=True,  # SQLite cannot ALTER most things; batch mode rebuilds tables instead
)
with context.begin_transaction():
    context.run_migrations()
