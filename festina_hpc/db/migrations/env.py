"""Alembic's environment for festina: runs on the connection ``festina_hpc.db.migrate`` hands it."""

from __future__ import annotations

from alembic import context

from festina_hpc.db.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run festina's migrations through festina_hpc.db.migrate (festina db upgrade)")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite cannot ALTER most things; batch mode recreates the table instead.
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
