"""Alembic scripts for the state DB; shipped in the wheel as `glance_migrator_migrations`."""
