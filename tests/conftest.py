"""Shared fixtures: every test gets its own DOPPEL_HOME and SQLite store."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from doppel.config import get_settings
from doppel.store.database import Database
from doppel.store.models import Base
from tests.postgres import PostgresCluster

REPO = Path(__file__).resolve().parent.parent
SHARED_EXPORT = REPO.parent / "shared" / "data" / "slack-exports" / "houstondatavis-2016.zip"
SLACK_APP_ENV = (
    "SLACK_SIGNING_SECRET",
    "SLACK_CLIENT_ID",
    "SLACK_CLIENT_SECRET",
    "DOPPEL_SECRET_KEY",
    "DOPPEL_SERVING_URL",
    "PREFECT_API_URL",
)


@pytest.fixture(autouse=True)
def doppel_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Isolate state and configuration from the developer's environment."""
    home = tmp_path / "home"
    monkeypatch.setenv("DOPPEL_HOME", str(home))
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # MLflow writes MLFLOW_TRACKING_URI into os.environ when used: start each test without it.
    names = ("DATABASE_URL", "SLACK_BOT_TOKEN", "SLACK_USER_TOKEN", "SLACK_API_URL")
    names += SLACK_APP_ENV
    for name in (*names, "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    yield home
    get_settings.cache_clear()


@pytest.fixture
def db(request: pytest.FixtureRequest, doppel_home: Path) -> Iterator[Database]:
    """A fresh store: SQLite by default; `parametrize("db", [...], indirect=True)` adds
    "postgresql", a new database in a throwaway cluster."""
    kind = getattr(request, "param", "sqlite")
    if kind == "postgresql":
        url = request.getfixturevalue("postgres").new_database()
        request.getfixturevalue("monkeypatch").setenv("DATABASE_URL", url)
        get_settings.cache_clear()
    database = Database(get_settings().db_url)
    yield database
    database.dispose()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster on 127.0.0.1 for this test session, or a skip that says why."""
    cluster = PostgresCluster()
    reason = cluster.start()
    if reason:
        pytest.skip(f"PostgreSQL tests skipped: {reason}")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled base model, converted once per test session."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture
def settings(doppel_home: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """Settings for tests that train: the shared model cache, a private DOPPEL_HOME."""
    monkeypatch.setenv("DOPPEL_MODEL_CACHE", str(models_dir))
    get_settings.cache_clear()
    return get_settings()


@pytest.fixture(scope="session")
def synth_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small deterministic synthetic workspace, written once per test session."""
    from doppel.synth import generate_workspace, write_export

    path = tmp_path_factory.mktemp("synth") / "synthco.zip"
    return write_export(generate_workspace(users=6, days=12, seed=7), path)


def store_snapshot(db: Database, *, scrape_state: bool = True) -> dict[str, list]:
    """Every stored row, sorted, minus timestamps of our own; optionally minus scrape state."""
    skip = {"updated_at"} if scrape_state else {"updated_at", "replies_synced_ts"}
    tables = [t for t in Base.metadata.sorted_tables if t.name != "workspaces"]
    if not scrape_state:
        tables = [t for t in tables if t.name != "scrape_cursors"]
    with db.session() as session:
        return {
            table.name: sorted(
                tuple(row)
                for row in session.execute(select(*[c for c in table.c if c.name not in skip]))
            )
            for table in tables
        }


def write_export(root: Path, days: dict[str, dict[str, list]], **index_files: object) -> Path:
    """Write an export folder: index files (channels.json, ...) and channel/day.json files."""
    root.mkdir(parents=True, exist_ok=True)
    for name, content in index_files.items():
        (root / f"{name}.json").write_text(json.dumps(content))
    for folder, files in days.items():
        (root / folder).mkdir(exist_ok=True)
        for day, messages in files.items():
            (root / folder / f"{day}.json").write_text(json.dumps(messages))
    return root


def zip_folder(folder: Path, out: Path) -> Path:
    with zipfile.ZipFile(out, "w") as archive:
        for path in sorted(folder.rglob("*")):
            archive.write(path, path.relative_to(folder).as_posix())
    return out
