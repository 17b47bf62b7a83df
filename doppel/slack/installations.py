"""Slack tokens at rest: the OAuth installs that slack-sdk's SQLAlchemy store keeps on our
database, every token encrypted (Fernet, keyed by `DOPPEL_SECRET_KEY`), and reading back
the bot token of one workspace, for ingest.

`DOPPEL_SECRET_KEY` holds one Fernet key, or several separated by commas to rotate keys:
the first encrypts, and any of them decrypts. `doppel secrets rotate` then re-encrypts every
stored token with the first, after which the old keys can be dropped.

The Slack app writes installs (`serving/slack/installations.py` builds its OAuth stores on
this module); ingest, the pipeline and the nightly retrain only read them, so that each
workspace is read with its own installation's token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from slack_sdk.oauth.installation_store.sqlalchemy import SQLAlchemyInstallationStore
from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    MetaData,
    Table,
    Text,
    desc,
    inspect,
    select,
    update,
)
from sqlalchemy.types import TypeDecorator

from doppel.errors import DoppelError

TOKEN_COLUMNS = ("bot_token", "bot_refresh_token", "user_token", "user_refresh_token")
TOKEN_TABLES = ("slack_installations", "slack_bots")  # slack-sdk's table names
BOTS_TABLE = SQLAlchemyInstallationStore.default_bots_table_name  # one row per bot install
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


def installed_workspaces(engine: Engine, client_id: str | None = None) -> list[str]:
    """Every workspace (team id) where the app is installed with a bot token, sorted.

    `client_id` narrows to one Slack app when several share the database. Org-wide
    Enterprise Grid installs (no team id) are not listed: ingest reads one workspace.
    """
    bots = _bots(engine)
    if bots is None:
        return []
    query = (
        select(bots.c.team_id)
        .distinct()
        .where(bots.c.team_id.is_not(None), bots.c.bot_token.is_not(None))
        .where(*_of_app(bots, client_id))
        .order_by(bots.c.team_id)
    )
    with engine.connect() as connection:
        return [str(team_id) for team_id in connection.scalars(query)]


def installation_token(
    engine: Engine, workspace_id: str, *, client_id: str | None, secret_key: str | None
) -> str | None:
    """The bot token of the newest install in `workspace_id`, decrypted with
    `DOPPEL_SECRET_KEY`; None when the app is not installed there."""
    bots = _bots(engine)
    if bots is None:
        return None
    query = (
        select(bots.c.bot_token)
        .where(bots.c.team_id == workspace_id, bots.c.bot_token.is_not(None))
        .where(*_of_app(bots, client_id))
        .order_by(desc(bots.c.installed_at), desc(bots.c.id))
        .limit(1)
    )
    with engine.connect() as connection:
        ciphertext = connection.scalar(query)
    if ciphertext is None:
        return None
    return EncryptedToken(cipher(secret_key)).process_result_value(ciphertext, None)


def _bots(engine: Engine) -> Table | None:
    """slack-sdk's bot table as it stores it (ciphertext), if the app ever created it."""
    if not inspect(engine).has_table(BOTS_TABLE):
        return None
    return SQLAlchemyInstallationStore.build_bots_table(MetaData(), BOTS_TABLE)


def _of_app(bots: Table, client_id: str | None) -> list[ColumnElement[bool]]:
    return [bots.c.client_id == client_id] if client_id else []


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
