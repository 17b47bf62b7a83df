"""Where OAuth installs live: slack-sdk's SQLAlchemy stores on our database, with every
token encrypted at rest (Fernet, keyed by `DOPPEL_SECRET_KEY`).

`DOPPEL_SECRET_KEY` holds one Fernet key, or several separated by commas to rotate keys:
the first encrypts, and any of them decrypts. `doppel secrets rotate` then re-encrypts every
stored token with the first, after which the old keys can be dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from slack_sdk.oauth.installation_store.sqlalchemy import SQLAlchemyInstallationStore
from slack_sdk.oauth.state_store.sqlalchemy import SQLAlchemyOAuthStateStore
from sqlalchemy import Connection, Engine, MetaData, Table, Text, inspect, select, update
from sqlalchemy.types import TypeDecorator

from doppel.errors import DoppelError

TOKEN_COLUMNS = ("bot_token", "bot_refresh_token", "user_token", "user_refresh_token")
TOKEN_TABLES = ("slack_installations", "slack_bots")  # slack-sdk's table names
KEY_HINT = (
    "set DOPPEL_SECRET_KEY to a Fernet key: python -c "
    '"from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"'
)


def fernet_keys(secret_key: str | None) -> list[Fernet]:
    """The Fernet keys in `DOPPEL_SECRET_KEY`, checked, the one that encrypts first."""
    if not secret_key:
        raise DoppelError("DOPPEL_SECRET_KEY is not set; OAuth tokens must be encrypted", KEY_HINT)
    try:
        return [Fernet(key.strip()) for key in secret_key.split(",")]
    except ValueError:
        raise DoppelError("DOPPEL_SECRET_KEY is not a valid Fernet key", KEY_HINT) from None


def cipher(secret_key: str | None) -> MultiFernet:
    """Encrypts with the first key of `DOPPEL_SECRET_KEY`, decrypts with any."""
    return MultiFernet(fernet_keys(secret_key))


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


@dataclass(frozen=True)
class Rotation:
    """What `rotate_tokens` did."""

    rows: int  # rows holding at least one token
    rotated: int  # of those, rows re-encrypted with the first key now


def rotate_tokens(engine: Engine, secret_key: str | None) -> Rotation:
    """Re-encrypt every stored token with the first key of `secret_key` (MultiFernet.rotate).

    One transaction: a token no key can decrypt stops it with nothing written. Tokens the
    first key already encrypts are left alone, so a second run rotates nothing.
    """
    keys = fernet_keys(secret_key)
    with engine.begin() as connection:
        tables = [name for name in TOKEN_TABLES if inspect(connection).has_table(name)]
        done = [_rotate_table(connection, name, keys) for name in tables]
    return Rotation(sum(d.rows for d in done), sum(d.rotated for d in done))


def _rotate_table(connection: Connection, name: str, keys: list[Fernet]) -> Rotation:
    table = Table(name, MetaData(), autoload_with=connection)  # plain columns: the ciphertext
    columns = [column for column in TOKEN_COLUMNS if column in table.c]
    fernet = MultiFernet(keys)
    rows = rotated = 0
    query = select(table.c.id, *(table.c[column] for column in columns))
    for row in connection.execute(query).mappings().all():  # read all before any update
        tokens = {column: row[column] for column in columns if row[column]}
        stale = {column: token for column, token in tokens.items() if not _encrypts(keys[0], token)}
        if stale:
            fresh = {
                column: _rotated(fernet, token, f"{name} row {row['id']}")
                for column, token in stale.items()
            }
            connection.execute(update(table).where(table.c.id == row["id"]).values(**fresh))
        rows += bool(tokens)
        rotated += bool(stale)
    return Rotation(rows, rotated)


def _encrypts(key: Fernet, token: str) -> bool:
    try:
        key.decrypt(token.encode())
    except InvalidToken:
        return False
    return True


def _rotated(fernet: MultiFernet, token: str, where: str) -> str:
    try:
        return fernet.rotate(token.encode()).decode()
    except InvalidToken:
        raise DoppelError(
            f"the token in {where} cannot be decrypted with any key in DOPPEL_SECRET_KEY",
            "add the key it was encrypted with after a comma, then rotate again",
        ) from None
