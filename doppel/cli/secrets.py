"""`doppel secrets`: the keys that encrypt stored Slack tokens.

`DOPPEL_SECRET_KEY` lists Fernet keys, the one that encrypts first. After a new key is put
first, `doppel secrets rotate` re-encrypts every stored token with it; the old keys can
then be dropped from `DOPPEL_SECRET_KEY`.
"""

from __future__ import annotations

import typer

from doppel.cli.common import JsonFlag, app, emit
from doppel.config import get_settings
from doppel.progress import console

secrets_app = typer.Typer(no_args_is_help=True, help="The keys that encrypt stored tokens.")
app.add_typer(secrets_app, name="secrets")


@secrets_app.command("rotate")
def rotate(as_json: JsonFlag = False) -> None:
    """Re-encrypt every stored Slack token with the first key in DOPPEL_SECRET_KEY."""
    from doppel.slack.installations import rotate_tokens
    from doppel.store.database import database

    settings = get_settings()
    rotation = rotate_tokens(database(settings.db_url).engine, settings.secret_key)
    console.print(
        f"re-encrypted {rotation.rotated} of {rotation.rows} stored installs with the first "
        f"key; the other {rotation.rows - rotation.rotated} already used it"
    )
    emit({"rows": rotation.rows, "rotated": rotation.rotated}, as_json)
