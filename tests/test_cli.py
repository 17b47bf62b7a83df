"""The `doppel` commands as a user runs them, in subprocesses, with real Prefect flows."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from datasets import load_from_disk
from slack_sdk import WebClient

from tests.helpers import REPO, doppel, last_json, require_shared_export
from tests.servers import free_port


def test_synth_ingest_users_and_dataset_build(tmp_path: Path) -> None:
    export = tmp_path / "ws.zip"
    doppel("synth", "--out", str(export), "--users", "5", "--days", "10", "--seed", "3")
    counts = last_json(doppel("ingest", "export", str(export), "--json"))
    assert set(counts) >= {"workspace", "channels", "users", "messages", "threads"}
    assert counts["messages"] > 300 and counts["threads"] > 10

    users = last_json(doppel("users", "--json"))
    top = users[0]
    assert top["samples"] > 20 and top["messages"] >= top["samples"]

    out = tmp_path / "dataset"
    built = last_json(
        doppel("dataset", "build", "--user", top["name"], "--out", str(out), "--json")
    )
    assert built["train"] + built["validation"] == top["samples"]
    dataset = load_from_disk(str(out))
    assert set(dataset) == {"train", "validation"}
    first = dataset["train"][0]["messages"]
    assert first[0]["role"] == "system" and first[-1]["role"] == "assistant"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["user_id"] == top["id"] and stats["train"] == built["train"]


def test_user_errors_are_one_clear_line(tmp_path: Path) -> None:
    export = tmp_path / "ws.zip"
    doppel("synth", "--out", str(export), "--users", "4", "--days", "5")
    missing = doppel("users", ok=False)
    assert missing.returncode == 1 and "no workspace has been ingested" in missing.stderr
    doppel("ingest", "export", str(export))
    users = last_json(doppel("users", "--json"))
    name = users[0]["name"]
    typo = doppel("dataset", "build", "--user", name[:-1] + "x", ok=False)
    assert typo.returncode == 1 and f"did you mean: {name}" in typo.stderr.replace("\n", " ")
    assert "Traceback" not in typo.stderr
    quiet = doppel("dataset", "build", "--user", "deploybot", ok=False)
    assert "has no eligible samples" in quiet.stderr
    bad = doppel("ingest", "export", str(tmp_path), ok=False)
    assert "not a Slack export" in bad.stderr


def test_unknown_config_keys_list_the_valid_ones(tmp_path: Path) -> None:
    config = tmp_path / "doppel.yaml"
    config.write_text("dataset:\n  min_char: 10\n")
    result = doppel("users", env={"DOPPEL_CONFIG": str(config)}, ok=False)
    assert "unknown config key 'dataset.min_char'" in result.stderr
    assert "min_chars" in result.stderr


@pytest.mark.slow
def test_emulator_command_and_ingest_slack_flow(tmp_path: Path) -> None:
    export = tmp_path / "ws.zip"
    doppel("synth", "--out", str(export), "--users", "4", "--days", "6")
    port = free_port()
    emulator = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "doppel.cli",
            "slack-emulator",
            "--export",
            str(export),
            "--port",
            str(port),
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/api/"
    try:
        client = WebClient(token="xoxb-emulator", base_url=url)
        deadline = time.monotonic() + 60
        while True:
            try:
                team = client.auth_test()["team_id"]
                break
            except Exception:
                if time.monotonic() > deadline or emulator.poll() is not None:
                    raise
                time.sleep(0.3)
        env = {
            "SLACK_API_URL": url,
            "SLACK_BOT_TOKEN": "xoxb-emulator",
            "DOPPEL_SLACK__RATES__HISTORY_PER_MINUTE": "6000",  # a local emulator, not Slack
        }
        scraped = last_json(doppel("ingest", "slack", "--json", env=env))
        again = last_json(doppel("ingest", "slack", "--json", env=env))
        only = last_json(doppel("ingest", "slack", "--channel", "general", "--json", env=env))
    finally:
        emulator.terminate()
        emulator.wait(timeout=30)
    assert scraped["workspace"] == team and scraped["messages"] > 100
    assert again == scraped == only  # incremental reruns change nothing
    file_counts = last_json(doppel("ingest", "export", str(export), "--json"))
    assert file_counts["workspace"] == team  # the export and its emulator are one workspace


def test_build_dataset_flow_runs_in_prefect(tmp_path: Path, synth_zip: Path) -> None:
    from prefect.testing.utilities import prefect_test_harness

    from doppel.config import get_settings
    from doppel.ingest import ingest_export
    from doppel.store.database import Database
    from flows.dataset import build_dataset_flow

    db = Database(get_settings().db_url)
    ingest_export(db, synth_zip, max_bytes=2**26)
    with prefect_test_harness():
        result = build_dataset_flow(user="U0000001", out=str(tmp_path / "ds"))
    assert result["user_id"] == "U0000001" and result["train"] > 0
    assert load_from_disk(str(tmp_path / "ds"))["train"].num_rows == result["train"]


def test_real_export_end_to_end(tmp_path: Path) -> None:
    doppel("ingest", "export", str(require_shared_export()))
    users = last_json(doppel("users", "--json"))
    assert users[0]["samples"] > 10
    built = last_json(doppel("dataset", "build", "--user", users[0]["id"], "--json"))
    assert built["train"] > 0 and built["validation"] > 0
