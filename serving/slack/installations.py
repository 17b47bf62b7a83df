"""Where OAuth installs live: slack-sdk's SQLAlchemy stores on our database, with every
token encrypted at rest (Fernet, keyed by `DOPPEL_SECRET_KEY`).

`DOPPEL_SECRET_KEY` holds one Fernet key, or several separated by commas to rotate keys:
the first encrypts, and any of them decrypts.
"""

from __future__ import annotations

from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from slack_sdk.oauth.installation_store.sqlalchemy import SQLAlchemyInstallationStore
from slack_sdk.oauth.state_store.sqlalchemy import SQLAlchemyOAuthStateStore
from sqlalchemy import Engine, Text
from sqlalchemy.types import TypeDecorator

from doppel.errors import DoppelError

TOKEN_COLUMNS = ("bot_token", "bot_refresh_token", "user_token", "user_refresh_token")
KEY_HINT = (
    "set DOPPEL_SECRET_KEY to a Fernet key: python -c "
    '"from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"'
)


def cipher(secret_key: str | None) -> MultiFernet:
    """The Fernet keys in `DOPPEL_SECRET_KEY`, checked."""
    if not secret_key:
        raise DoppelError("DOPPEL_SECRET_KEY is not set; OAuth tokens must be encrypted", KEY_HINT)
    try:
        return MultiFernet([Fernet(key.strip()) for key in secret_key.split(",")])
    except ValueError:
        raise DoppelError("DOPPEL_SECRET_KEY is not a valid Fernet key", KEY_HINT) from None


class EncryptedToken(TypeDecorator[str]):
    """A text column that holds Fernet ciphertext and reads back the plain token."""

    impl = Text
    cache_ok = False  # holds a key; never share compiled statements across instances

    def __init__(self, fernet: MultiFernet) -> None:
        super().__init__()
        self.fernet = fernet

    def process_bind_param(self, value: str | None, dialect: Any) -> str | None:
        return None if value is None else self.fernet.encrypt(value.encode()).decode()

    def process_result_value(self, value: str | None, dialect: Any) -> str | None:
        if value is None:
            return None
        try:
            return self.fernet.decrypt(value.encode()).decode()
        except InvalidToken:
            raise DoppelError(
                "a stored Slack token cannot be decrypted with DOPPEL_SECRET_KEY",
                "restore the key it was encrypted with (keep old keys after a comma), "
                "or reinstall the app in that workspace",
            ) from None


class EncryptedInstallationStore(SQLAlchemyInstallationStore):
    """slack-sdk's installation store whose token columns are encrypted."""

    def __init__(self, client_id: str, engine: Engine, fernet: MultiFernet) -> None:
        super().__init__(client_id=client_id, engine=engine)
        for table in (self.bots, self.installations):
            for name in TOKEN_COLUMNS:
                if name in table.c:
                    table.c[name].type = EncryptedToken(fernet)


def oauth_stores(
    engine: Engine, client_id: str, secret_key: str | None, state_expiration_seconds: int = 600
) -> tuple[EncryptedInstallationStore, SQLAlchemyOAuthStateStore]:
    """The installation store and the OAuth state store, with their tables created."""
    installations = EncryptedInstallationStore(client_id, engine, cipher(secret_key))
    states = SQLAlchemyOAuthStateStore(state_expiration_seconds, engine)
    installations.create_tables()
    states.create_tables()
    return installations, states
