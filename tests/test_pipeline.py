"""The Prefect flows for real: the CLI's pipeline, the nightly retrain and a killed run."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from doppel.consent import grant
from doppel.ingest import ingest_export
from doppel.registry import Registry, model_name
from doppel.store.database import Database
from tests.helpers import REPO, TEAM, TINY, USER, doppel, last_json


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY | {"max_steps": 4, "eval_steps": 2}))
    return path


@pytest.fixture
def workspace(settings, synth_zip: Path) -> None:
    """The synthetic workspace, where USER consented to be trained."""
    db = Database(settings.db_url)
    ingest_export(db, synth_zip, max_bytes=2**26)
    with db.transaction() as session:
        grant(session, TEAM, USER, "test")


pytestmark = [pytest.mark.usefixtures("workspace"), pytest.mark.slow]


def test_pipeline_command_trains_evaluates_and_promotes(tiny_config: Path) -> None:
    outcome = last_json(
        doppel("pipeline", "--user", "alice", "--config", str(tiny_config), "--json")
    )
    assert outcome[0]["outcome"] == "promoted", outcome
    assert outcome[0]["metrics"]["eval_loss"] < outcome[0]["metrics"]["base_eval_loss"]
    (model,) = last_json(doppel("models", "--json"))
    assert (model["name"], model["workspace_id"], model["user_id"]) == (
        model_name(TEAM, USER),
        TEAM,
        USER,
    )
    assert model["production"] == 1
    (version,) = model["versions"]
    assert version["aliases"] == ["challenger", "production"] and version["decision"] == "promoted"
    assert {"eval_loss", "base_eval_loss", "train_loss"} <= set(version["metrics"])
    nothing = doppel("rollback", "--user", USER, ok=False)
    assert "replaced no earlier version" in nothing.stderr
    refused = doppel("pipeline", ok=False)
    assert "pass either --user USER or --all" in refused.stderr


def test_nightly_retrain_isolates_failures(settings, tiny_config: Path) -> None:
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import retrain_flow

    # Someone enrolled who yields no samples: their run fails, the others go on.
    with Database(settings.db_url).transaction() as session:
        grant(session, TEAM, "U0BOT0001", "test")
    with prefect_test_harness():
        outcomes = retrain_flow(config=str(tiny_config), min_new_samples=0)
        skipped = retrain_flow(config=str(tiny_config), min_new_samples=10_000)
    by_user = {o["user_id"]: o for o in outcomes}
    assert by_user["U0BOT0001"]["outcome"] == "failed"
    assert by_user[USER]["outcome"] in {"promoted", "kept production"}
    assert {o["outcome"] for o in skipped if o["user_id"] == USER} == {"skipped"}


def test_a_killed_training_registers_nothing_and_resumes(settings, tiny_config: Path) -> None:
    config = yaml.safe_load(tiny_config.read_text()) | {"max_steps": 6, "eval_steps": 2}
    tiny_config.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "doppel.cli", "train", "--user", USER]
    command += ["--config", str(tiny_config)]
    process = subprocess.Popen(
        command, cwd=REPO, env=os.environ.copy(), stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    runs = settings.run_dir(TEAM, USER)
    deadline = time.monotonic() + 400
    while not list(runs.glob("*/checkpoint-2")) and time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()
        time.sleep(1)
    process.send_signal(signal.SIGTERM)  # as Prefect's cancellation or `kill` would
    try:
        _, stderr = process.communicate(timeout=180)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # its Prefect server, if anything is left
    assert process.returncode == 1 and "training was interrupted" in stderr
    assert Registry(settings).versions(model_name(TEAM, USER)) == []

    resumed = doppel("train", "--user", USER, "--config", str(tiny_config))
    assert "resumed from checkpoint-" in resumed.stderr
    assert [str(v.version) for v in Registry(settings).versions(model_name(TEAM, USER))] == ["1"]
