"""Consent from the operator's CLI: `doppel consent` for one person or several,
`doppel limits`, and the pipeline's refusal to train anyone who has not opted in."""

from __future__ import annotations

from pathlib import Path

import pytest

from doppel.config import get_settings
from doppel.errors import DoppelError
from doppel.ingest import ingest_export
from doppel.registry import Registry
from doppel.store.database import Database
from tests.helpers import doppel, last_json

TEAM, ALICE, BRUNO = "T0SYNTH01", "U0000001", "U0000002"


def test_consent_commands_and_the_pipeline_refusing_without_consent(synth_zip: Path) -> None:
    ingest_export(Database(get_settings().db_url), synth_zip, max_bytes=2**26)
    for command in (["pipeline", "--user", "alice"], ["train", "--user", "alice"]):
        refused = doppel(*command, ok=False)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        stderr = " ".join(refused.stderr.split())
        assert f"user {ALICE} of workspace {TEAM} has not consented to be trained" in stderr
        assert f"doppel consent grant {ALICE} --workspace {TEAM}" in stderr

    assert (
        "alice (U0000001) of T0SYNTH01 now consents" in doppel("consent", "grant", "alice").stderr
    )
    assert "had already consented" in doppel("consent", "grant", ALICE).stderr
    (row,) = last_json(doppel("consent", "list", "--json"))
    assert row == {"user_id": ALICE, "name": "alice", "granted": True}

    (deletion,) = last_json(doppel("consent", "revoke", "alice", "--json"))
    assert deletion["user_id"] == ALICE and deletion["messages_excluded"] > 0
    assert deletion["model"] == {"name": f"doppel.{TEAM}.{ALICE}", "versions": [], "runs": []}
    (row,) = last_json(doppel("consent", "list", "--json"))
    assert row["granted"] is False
    assert "has not consented" in doppel("pipeline", "--user", "alice", ok=False).stderr


def test_limits_and_the_slack_app_without_credentials() -> None:
    shown = last_json(doppel("limits", "--workspace", TEAM, "--json"))
    assert shown == {"max_enrolled": 50, "trainings_per_day": 10}
    changed = last_json(doppel("limits", "--workspace", TEAM, "--max-enrolled", "3", "--json"))
    assert changed == {"max_enrolled": 3, "trainings_per_day": 10}
    assert last_json(doppel("limits", "--workspace", "T0OTHER", "--json"))["max_enrolled"] == 50

    refused = doppel("slack-app", ok=False)
    assert "error: SLACK_SIGNING_SECRET is not set" in refused.stderr
    no_token = doppel("slack-app", ok=False, env={"SLACK_SIGNING_SECRET": "s"})
    assert "the Slack app has no credentials" in no_token.stderr
    assert "Traceback" not in no_token.stderr


def test_consent_for_several_people_at_once(synth_zip: Path) -> None:
    ingest_export(Database(get_settings().db_url), synth_zip, max_bytes=2**26)
    granted = doppel("consent", "grant", "alice", BRUNO, "--json")
    assert "alice (U0000001) of T0SYNTH01 now consents" in granted.stderr
    assert "bruno (U0000002) of T0SYNTH01 now consents" in granted.stderr
    assert last_json(granted) == [
        {"workspace_id": TEAM, "user_id": ALICE, "name": "alice", "new": True},
        {"workspace_id": TEAM, "user_id": BRUNO, "name": "bruno", "new": True},
    ]

    # One unknown name, and nothing changes for anyone.
    refused = doppel("consent", "revoke", "alice", "nobody", "--json", ok=False)
    assert refused.returncode == 1 and "unknown user 'nobody'" in refused.stderr
    assert "no longer consents" not in refused.stderr and refused.stdout == ""
    listed = last_json(doppel("consent", "list", "--json"))
    assert [(row["user_id"], row["granted"]) for row in listed] == [(ALICE, True), (BRUNO, True)]

    revoked = doppel("consent", "revoke", "alice", "bruno", "alice", "--json")
    assert "alice (U0000001) of T0SYNTH01 no longer consents. Deleted:" in revoked.stderr
    assert "bruno (U0000002) of T0SYNTH01 no longer consents. Deleted:" in revoked.stderr
    deletions = last_json(revoked)
    assert [(d["user_id"], d["failed"]) for d in deletions] == [(ALICE, []), (BRUNO, [])]
    listed = last_json(doppel("consent", "list", "--json"))
    assert [(row["user_id"], row["granted"]) for row in listed] == [(ALICE, False), (BRUNO, False)]


def test_deleting_a_model_that_does_not_exist_deletes_nothing() -> None:
    failed: list[str] = []
    deleted = Registry(get_settings()).delete_person("T0NONE", "U0NONE", failed)
    assert deleted == {"name": "doppel.T0NONE.U0NONE", "versions": [], "runs": []}
    assert failed == []


def test_the_pipeline_flow_refuses_too(synth_zip: Path) -> None:
    """Deployments (`train-user`) run the flow without the CLI: it checks consent itself."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import user_pipeline_flow

    ingest_export(Database(get_settings().db_url), synth_zip, max_bytes=2**26)
    with prefect_test_harness(), pytest.raises(DoppelError, match="has not consented"):
        user_pipeline_flow("alice")


def test_the_pipeline_of_a_workspace_not_yet_ingested_is_refused_for_consent_alone(
    settings,
) -> None:
    """The Slack app runs `doppel pipeline` with ids before a new install's first ingest:
    the refusal is about consent, never an unknown workspace (the flow ingests first)."""
    refused = doppel("pipeline", "--user", "U0NEW01", "--workspace", "T0NEW01", ok=False)
    assert "has not consented" in refused.stderr and "unknown" not in refused.stderr.lower()
