"""Alembic migrations of the store; `doppel.store.schema` configures and runs them."""
