"""Shared fixtures: every test gets its own DOPPEL_HOME and SQLite store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from doppel.config import get_settings
from doppel.store.database import Database, make_engine
from tests.helpers import skip_or_fail
from tests.postgres import PostgresCluster

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


@pytest.fixture
def unmigrated(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An engine on a database nothing has migrated yet: a SQLite file (the default) or,
    with the indirect parameter "postgresql", a new database in the throwaway cluster."""
    if getattr(request, "param", "sqlite") == "postgresql":
        url = request.getfixturevalue("postgres").new_database()
    else:
        url = f"sqlite:///{tmp_path / 'store.db'}"
    engine = make_engine(url, migrate=False)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster on 127.0.0.1 for this test session, or a skip that says why."""
    cluster = PostgresCluster()
    reason = cluster.start()
    if reason:
        skip_or_fail(f"PostgreSQL tests skipped: {reason}")
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
    from devtools.synth import generate_workspace, write_export

    path = tmp_path_factory.mktemp("synth") / "synthco.zip"
    return write_export(generate_workspace(users=6, days=12, seed=7), path)
