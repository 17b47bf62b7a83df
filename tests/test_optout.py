"""Opting out, on every path at once: serving stops within seconds, the person's trainings
are cancelled or stop by themselves, and nothing made of them is left anywhere, with a
real store, a real MLflow registry, real Prefect and real training."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import mlflow
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.entities import ViewType
from peft import LoraConfig, get_peft_model
from sqlalchemy import select
from transformers import LlamaConfig, LlamaForCausalLM

from doppel.config import Settings, load_settings
from doppel.consent import grant, revoke, stop_if_withdrawn
from doppel.dataset.build import build_dataset
from doppel.errors import DoppelError
from doppel.evaluate.run import evaluate_version
from doppel.ingest import ingest_export
from doppel.persona import PersonaCard
from doppel.registry import PAGE_SIZE, Registry, model_name, tracking_uri
from doppel.store.database import Database
from doppel.store.models import Enrollment, TrainingRequest
from doppel.train.config import BUNDLED_MODEL, load_train_config
from doppel.train.run import train_user
from serving.catalog import AdapterCatalog, ConsentUnavailable, UnknownModel
from serving.slack.state import add_training_request, update_training_request
from serving.slack.training import Trainer
from tests.helpers import TEAM, TINY, doppel, last_json
from tests.servers import free_port

ALICE, BRUNO = "U0000001", "U0000002"  # alice and bruno of the synthetic workspace
NOBODY = "U9999999"  # never in the workspace


@pytest.fixture
def db(settings: Settings, synth_zip: Path) -> Iterator[Database]:
    """The synthetic workspace, where alice and bruno consented."""
    database = Database(settings.db_url)
    ingest_export(database, synth_zip, max_bytes=2**26)
    with database.transaction() as session:
        grant(session, TEAM, ALICE, "test")
        grant(session, TEAM, BRUNO, "test")
    yield database
    database.dispose()


def register_adapter(settings: Settings, user_id: str, folder: Path) -> str:
    """A real PEFT LoRA adapter, logged to a real MLflow run, registered and promoted;
    returns the run id. The catalog reads an adapter's config and persona card, never its
    weights, so a tiny Llama keeps this fast (`benchmarks/serve.py` does the same on the
    real base)."""
    base = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
        )
    )
    adapter = folder / f"adapter-{user_id}"
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(
        adapter
    )
    PersonaCard(TEAM, user_id, f"You are {user_id}.", BUNDLED_MODEL).write(adapter)
    registry = Registry(settings)
    person = {"workspace_id": TEAM, "user_id": user_id}
    with mlflow.start_run(experiment_id=registry.experiment_id(TEAM), tags=person) as run:
        mlflow.log_artifacts(str(adapter), "adapter")
    version = registry.register(TEAM, user_id, run.info.run_id, tags={})
    registry.promote(model_name(TEAM, user_id), version, "by the test")
    return run.info.run_id


def live_runs(settings: Settings, user_id: str) -> list[Any]:
    """The person's runs that are not deleted, in every experiment."""
    client = MlflowClient(tracking_uri(settings))
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    query = f"tags.user_id = '{user_id}'"
    return list(client.search_runs(experiments, query, ViewType.ACTIVE_ONLY))


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.2)
    return found


def withdraw_only(db: Database, user_id: str) -> None:
    """What a revoke does first, alone: as if its deletion had not run yet (it runs after,
    or crashed), which is when a job outliving the revoke must clean up by itself."""
    with db.transaction() as session:
        row = session.get(Enrollment, (TEAM, user_id))
        assert row is not None
        row.granted = False


def statuses(db: Database) -> dict[int, str]:
    with db.session() as session:
        return {row.id: row.status for row in session.scalars(select(TrainingRequest))}


# -- serving --------------------------------------------------------------------------------


def test_the_catalog_stops_serving_within_2_seconds_of_a_revoke(
    settings: Settings, db: Database, tmp_path: Path
) -> None:
    register_adapter(settings, ALICE, tmp_path)
    register_adapter(settings, BRUNO, tmp_path)
    catalog = AdapterCatalog(settings)
    catalog.refresh()
    assert [a.model_id for a in catalog.served()] == [f"{TEAM}/{ALICE}", f"{TEAM}/{BRUNO}"]
    assert catalog.resolve(f"{TEAM}/{ALICE}").version == "1"
    assert catalog.resolve(f"{TEAM}/{ALICE}@1").version == "1"

    revoke(settings, db, TEAM, ALICE, "test")
    revoked = time.monotonic()
    while True:  # no refresh in between: the adapter stays cached in this catalog
        try:
            catalog.resolve(f"{TEAM}/{ALICE}")
        except UnknownModel as error:
            refused = error
            break
        assert time.monotonic() - revoked < 2, "alice is still served 2 s after her revoke"
        time.sleep(0.05)
    with pytest.raises(UnknownModel) as pinned:
        catalog.resolve(f"{TEAM}/{ALICE}@1")
    with pytest.raises(UnknownModel) as never_known:
        catalog.resolve(f"{TEAM}/{NOBODY}")
    # The same 404 as for someone who never was here: it does not tell who exists.
    assert str(refused) == str(pinned.value) == str(never_known.value).replace(NOBODY, ALICE)
    assert f"{TEAM}/{ALICE}" not in str(refused).split("(hint")[1]
    assert [a.model_id for a in catalog.served()] == [f"{TEAM}/{BRUNO}"]
    assert catalog.resolve(f"{TEAM}/{BRUNO}").version == "1"


def test_the_consent_cache_is_at_most_2_seconds_old(settings: Settings) -> None:
    assert settings.serve.consent_cache_seconds == 1.0
    with pytest.raises(DoppelError, match=r"serve\.consent_cache_seconds"):
        load_settings(serve={"consent_cache_seconds": 5})


def test_a_catalog_that_cannot_read_consent_serves_nobody(
    settings: Settings, db: Database, tmp_path: Path
) -> None:
    register_adapter(settings, ALICE, tmp_path)
    down = f"postgresql+psycopg://doppel:s3cret@127.0.0.1:{free_port()}/doppel"  # nobody there
    catalog = AdapterCatalog(settings.model_copy(update={"database_url": down}))
    catalog.refresh()
    assert catalog.served() == []
    with pytest.raises(ConsentUnavailable, match="consent cannot be checked") as refused:
        catalog.resolve(f"{TEAM}/{ALICE}")
    assert "s3cret" not in str(refused.value)


# -- deletion -------------------------------------------------------------------------------


def test_revoke_deletes_every_run_of_the_person_found_by_its_tags(
    settings: Settings, db: Database, tmp_path: Path
) -> None:
    """Runs that never got a version, failed or killed ones, runs tagged the old way, runs
    on a second page of experiments and of runs, and a deleted run whose artifacts stayed."""
    registry = Registry(settings)
    client = registry.client
    for index in range(PAGE_SIZE + 1):  # alice's runs end up on the second page
        client.create_experiment(f"filler/{index:03d}")
    experiment = registry.experiment_id(TEAM)
    alice = {"workspace_id": TEAM, "user_id": ALICE}
    many = [client.create_run(experiment, tags=alice).info.run_id for _ in range(PAGE_SIZE + 1)]
    for run_id in many[:2]:
        client.set_terminated(run_id, "FAILED")
    client.set_terminated(many[2], "KILLED")
    older = client.create_run(experiment, tags={"team_id": TEAM, "user_id": ALICE}).info
    deleted = client.create_run(experiment, tags=alice).info
    artifacts = []
    for info in (older, deleted):
        client.log_text(info.run_id, "a copy of her dataset", "dataset/train.json")
        artifacts.append(Path(mlflow.artifacts.download_artifacts(info.artifact_uri)))
    client.delete_run(deleted.run_id)  # deleted in the MLflow UI: its artifacts stay
    versioned = register_adapter(settings, ALICE, tmp_path)
    bruno = register_adapter(settings, BRUNO, tmp_path)

    deletion = revoke(settings, db, TEAM, ALICE, "test")
    assert deletion.complete, deletion.failed
    assert deletion.model["versions"] == ["1"]
    expected = {versioned, older.run_id, deleted.run_id, *many}
    assert set(deletion.model["runs"]) == expected and len(deletion.model["runs"]) == len(expected)
    assert live_runs(settings, ALICE) == []
    assert not any(folder.exists() for folder in artifacts)
    assert [run.info.run_id for run in live_runs(settings, BRUNO)] == [bruno]

    again = revoke(settings, db, TEAM, ALICE, "test")
    assert again.complete
    assert again.model == {"name": model_name(TEAM, ALICE), "versions": [], "runs": []}


@contextmanager
def undeletable(folder: Path) -> Iterator[None]:
    """Nothing in `folder` can be deleted: read-only, or immutable for root (whom
    permissions do not stop). Skips where neither works."""
    root = os.geteuid() == 0
    lock, unlock = (
        (["chattr", "+i"], ["chattr", "-i"]) if root else (["chmod", "555"], ["chmod", "755"])
    )
    with contextlib.suppress(OSError):  # no chattr here: the probe below says so
        subprocess.run([*lock, str(folder)], capture_output=True)
    try:
        (folder / "probe").touch()
    except PermissionError:
        pass
    else:
        (folder / "probe").unlink()
        pytest.skip(f"cannot make a folder undeletable here ({' '.join(lock)} had no effect)")
    try:
        yield
    finally:
        subprocess.run([*unlock, str(folder)], check=True)


def test_a_deletion_that_fails_is_reported_and_a_second_revoke_finishes_it(
    settings: Settings, db: Database
) -> None:
    dataset = build_dataset(settings, ALICE).path
    stuck = settings.run_dir(TEAM, ALICE, "0123abcd")
    (stuck / "checkpoint-2").mkdir(parents=True)
    (stuck / "checkpoint-2" / "adapter_model.safetensors").write_bytes(b"weights")
    with undeletable(stuck):
        failed = doppel("consent", "revoke", "alice", "--json", ok=False)
        assert stuck.exists()
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    stderr = " ".join(failed.stderr.split())
    assert f"NOT deleted: {settings.run_dir(TEAM, ALICE)}: " in stderr
    assert "fix that, then run the same command again: it finishes the deletion" in stderr
    (first,) = last_json(failed)
    assert first["failed"] and first["run_folders"] == []
    assert first["datasets"] == [str(dataset)] and not dataset.exists()  # the rest went

    (second,) = last_json(doppel("consent", "revoke", "alice", "--json"))
    assert second["failed"] == [] and second["run_folders"] == [str(stuck)]
    assert not settings.run_dir(TEAM, ALICE).exists()


# -- cancelling trainings ---------------------------------------------------------------------


def test_revoke_cancels_the_queued_trainings_and_prefect_flow_runs_of_the_person(
    settings: Settings, db: Database
) -> None:
    from prefect import get_client
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import user_pipeline_flow

    with prefect_test_harness():
        api_url = PREFECT_API_URL.value()
        user_pipeline_flow.to_deployment(name="train-user").apply()
        run = run_deployment(
            "user-pipeline/train-user", parameters={"user": ALICE, "workspace": TEAM}, timeout=0
        )
        assert isinstance(run, FlowRun)
        local = add_training_request(db, TEAM, ALICE, ALICE)
        on_prefect = add_training_request(db, TEAM, ALICE, ALICE)
        update_training_request(db, on_prefect, "running", "Prefect flow run", str(run.id))
        others = add_training_request(db, TEAM, BRUNO, BRUNO)

        env = {"PREFECT_API_URL": api_url}
        (deletion,) = last_json(doppel("consent", "revoke", "alice", "--json", env=env))
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(run.id).state
    assert state is not None and state.is_cancelled(), state
    assert deletion["trainings_cancelled"] == [
        f"request {local}",
        f"request {on_prefect} (Prefect flow run {run.id})",
    ]
    assert statuses(db) == {local: "cancelled", on_prefect: "cancelled", others: "queued"}
    # A training that reports back afterwards does not undo the cancellation.
    assert update_training_request(db, on_prefect, "done", "version 3 promoted") == "cancelled"


# -- trainings that outlive the revoke (real training, real Prefect) -------------------------


@pytest.mark.slow
def test_opting_out_while_a_training_runs_leaves_nothing(
    settings: Settings, db: Database, tmp_path: Path
) -> None:
    """As `/doppel optout` does it: the Slack app's queue runs `doppel pipeline` in a child
    process; the revoke cancels it and the one queued behind it, then deletes."""
    register_adapter(settings, ALICE, tmp_path)  # an earlier version, in production
    catalog = AdapterCatalog(settings)
    catalog.refresh()
    assert catalog.resolve(f"{TEAM}/{ALICE}").version == "1"
    recipe = tmp_path / "long.yaml"  # long enough to be revoked mid-run
    recipe.write_text(yaml.safe_dump(TINY | {"max_steps": 400, "eval_steps": 2}))
    app = settings.slack_app.model_copy(update={"train_config": recipe})
    trainer = Trainer(settings.model_copy(update={"slack_app": app}), db)
    told: list[str] = []
    runs = settings.run_dir(TEAM, ALICE)
    try:
        running = trainer.submit(TEAM, ALICE, "alice", ALICE, told.append)
        queued = trainer.submit(TEAM, ALICE, "alice", ALICE, told.append)
        wait_for(lambda: list(runs.glob("*/checkpoint-2")), 600, "the training's checkpoint")
        assert live_runs(settings, ALICE), "the training has its MLflow run"
        deletion = revoke(settings, db, TEAM, ALICE, ALICE, partial(trainer.cancel, TEAM, ALICE))
        cancelled = "Training of alice was cancelled: consent was withdrawn."
        wait_for(lambda: told.count(cancelled) == 2, 120, "both trainings to be cancelled")
    finally:
        trainer.close()
    assert deletion.complete, deletion.failed
    assert deletion.trainings_cancelled == [f"request {running}", f"request {queued}"]
    assert statuses(db) == {running: "cancelled", queued: "cancelled"}
    assert sum(message.startswith("Training of alice started") for message in told) == 1

    assert Registry(settings).models(TEAM) == []
    assert live_runs(settings, ALICE) == []
    assert not runs.exists() and not settings.dataset_dir(TEAM, ALICE).exists()
    with pytest.raises(UnknownModel):
        catalog.resolve(f"{TEAM}/{ALICE}")  # at once, no refresh needed
    catalog.refresh()
    with pytest.raises(UnknownModel):
        catalog.resolve(f"{TEAM}/{ALICE}")
    assert catalog.served() == []


@pytest.mark.slow
def test_a_training_that_outlives_an_opt_out_registers_nothing_and_keeps_nothing(
    settings: Settings, db: Database
) -> None:
    dataset = build_dataset(settings, ALICE).path
    runs = settings.run_dir(TEAM, ALICE)

    def opt_out_mid_run() -> None:
        wait_for(lambda: list(runs.glob("*/checkpoint-2")), 600, "the first checkpoint")
        withdraw_only(db, ALICE)

    opting_out = threading.Thread(target=opt_out_mid_run)
    opting_out.start()
    config = load_train_config(None, **TINY | {"max_steps": 6, "eval_steps": 2})
    recheck = partial(stop_if_withdrawn, settings, TEAM, ALICE)
    with pytest.raises(DoppelError, match="withdrew consent; the job stopped and kept nothing"):
        train_user(settings, TEAM, ALICE, dataset, config, recheck)
    opting_out.join(timeout=60)
    assert Registry(settings).models(TEAM) == []
    assert live_runs(settings, ALICE) == []
    assert not runs.exists() and not dataset.exists()


@pytest.mark.slow
def test_an_evaluation_that_outlives_an_opt_out_promotes_nothing_and_keeps_nothing(
    settings: Settings, db: Database
) -> None:
    dataset = build_dataset(settings, ALICE).path
    fast_eval = {"max_generations": 2, "max_new_tokens": 8}
    config = load_train_config(None, **TINY | {"max_steps": 2, "eval": fast_eval})
    trained = train_user(settings, TEAM, ALICE, dataset, config)
    withdraw_only(db, ALICE)
    recheck = partial(stop_if_withdrawn, settings, TEAM, ALICE)
    with pytest.raises(DoppelError, match="withdrew consent; the job stopped and kept nothing"):
        evaluate_version(settings, TEAM, ALICE, trained.version, True, recheck)
    assert Registry(settings).models(TEAM) == []
    assert live_runs(settings, ALICE) == []
    assert not settings.run_dir(TEAM, ALICE).exists() and not dataset.exists()
