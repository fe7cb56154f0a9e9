"""Loaded into the lab's uWSGI processes (Glance, Keystone) with --import: SQLite transactions begin
with BEGIN IMMEDIATE instead of oslo.db's deferred BEGIN.

Why: a deferred transaction that reads first and writes later cannot upgrade its lock when another
connection has written meanwhile; SQLite then answers SQLITE_BUSY at once, without the busy wait. In
Glance that hits concurrent copy-image tasks: "(sqlite3.OperationalError) database is locked" and the
copy fails (os_glance_failed_import), or the task dies silently and stays 'pending' with the image
locked (os_glance_import_task) for good. Seen with 3 parallel copies of freshly uploaded images, 1-2
failures per run. BEGIN IMMEDIATE takes the write lock up front, so concurrent transactions queue on
SQLite's busy timeout instead -- roughly what the row locks of MySQL/PostgreSQL give a production Glance.

This runs inside the services' venvs (not the test process); it needs only SQLAlchemy.
"""

import sqlalchemy
from sqlalchemy.engine import Engine


# A listener on the Engine class runs before oslo.db's per-engine "begin" listener, which then sees the
# transaction marker it uses itself ("in_transaction") and emits no second BEGIN.
@sqlalchemy.event.listens_for(Engine, "begin")
def _begin_immediate(conn: sqlalchemy.engine.Connection) -> None:
    if conn.dialect.name == "sqlite" and "in_transaction" not in conn.info:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        conn.info["in_transaction"] = True
