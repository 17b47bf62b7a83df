"""MLflow's tracking store and model registry on PostgreSQL, as production runs them:
a real training run is tracked and registered there, promoted, rolled back, and the
serving catalog resolves and downloads the production adapter from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from doppel.config import get_settings
from doppel.consent import grant
from doppel.dataset.build import build_dataset
from doppel.ingest import ingest_export
from doppel.registry import PRODUCTION, Registry, model_name
from doppel.store.database import Database
from doppel.train.config import load_train_config
from doppel.train.run import train_user
from serving.catalog import AdapterCatalog
from tests.helpers import TEAM, USER

pytestmark = pytest.mark.slow

TINY = {"max_length": 128, "batch_size": 4, "eval_steps": 2, "max_steps": 2}


@pytest.mark.postgres
def test_the_registry_on_postgresql(
    postgres, settings, synth_zip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", postgres.new_database())
    monkeypatch.setenv("DATABASE_URL", postgres.new_database())  # the message store too
    get_settings.cache_clear()
    settings = get_settings()
    assert settings.mlflow_tracking_uri.startswith("postgresql")

    db = Database(settings.db_url)
    ingest_export(db, synth_zip, max_bytes=2**26)
    with db.transaction() as session:
        grant(session, TEAM, USER, "postgres test")
    dataset = build_dataset(settings, USER).path
    first = train_user(settings, TEAM, USER, dataset, load_train_config(None, **TINY))
    second = train_user(
        settings, TEAM, USER, dataset, load_train_config(None, learning_rate=3e-3, **TINY)
    )
    registry = Registry(settings)
    name = model_name(TEAM, USER)
    registry.promote(name, first.version, "first")
    registry.promote(name, second.version, "second")
    assert str(registry.production(name).version) == second.version
    assert registry.rollback(name) == (second.version, first.version)

    (model,) = registry.models(TEAM)
    assert model["production"] == int(first.version)
    assert [v["version"] for v in model["versions"]] == [1, 2]
    assert model["versions"][0]["aliases"] == [PRODUCTION]
    assert model["versions"][0]["metrics"]["train_loss"] > 0

    catalog = AdapterCatalog(settings)
    catalog.refresh()
    (served,) = catalog.served()
    assert (served.model_id, served.version) == (f"{TEAM}/{USER}", first.version)
    assert (catalog.resolve(served.model_id).path / "adapter_model.safetensors").is_file()
