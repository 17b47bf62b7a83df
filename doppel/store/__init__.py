"""The message store: SQLAlchemy models and the writes both ingestion paths share."""
