"""Prefect flows: thin orchestration over the `doppel` library."""
