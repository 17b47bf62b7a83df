"""Alembic's environment for the store, configured in code by `doppel.store.schema`.

Only online migrations on the connection that `schema.upgrade` locked are supported; it
arrives in `config.attributes["connection"]`.
"""

from __future__ import annotations

from alembic import context

from doppel.store.models import Base
from doppel.store.schema import VERSION_TABLE, include_object

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the store's migrations with `doppel db upgrade`, not alembic")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    version_table=VERSION_TABLE,
    include_object=include_object,
    compare_server_default=True,
    # SQLite alters a table by copying it: batch mode writes migrations that way.
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
