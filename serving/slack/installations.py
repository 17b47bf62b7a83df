"""Where the Slack app keeps OAuth installs: slack-sdk's SQLAlchemy stores on our database,
with every token encrypted at rest.

The encryption (Fernet keys from `DOPPEL_SECRET_KEY`, the encrypted token columns, key
rotation) lives in the library, `doppel.slack.installations`, because ingest reads the
same installs back to scrape each workspace with its own bot token. This module adds what
only the app needs: the OAuth state store, and creating both stores' tables.
"""

from __future__ import annotations

from slack_sdk.oauth.state_store.sqlalchemy import SQLAlchemyOAuthStateStore
from sqlalchemy import Engine

from doppel.slack.installations import EncryptedInstallationStore, cipher


def oauth_stores(
    engine: Engine, client_id: str, secret_key: str | None, state_expiration_seconds: int = 600
) -> tuple[EncryptedInstallationStore, SQLAlchemyOAuthStateStore]:
    """The installation store and the OAuth state store, with their tables created."""
    installations = EncryptedInstallationStore(client_id, engine, cipher(secret_key))
    states = SQLAlchemyOAuthStateStore(state_expiration_seconds, engine)
    installations.create_tables()
    states.create_tables()
    return installations, states
