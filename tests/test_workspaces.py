"""Many workspaces: each is read with its own installation's token, and nothing of one
reaches another's rows, cursors, sample counts or datasets, even where the two hold the
same user and channel ids (as workspaces of one Enterprise Grid do).

Real slack-sdk over HTTP to the emulator serving two workspaces, real SQLite, the Slack
app's own encrypted installation store, and real Prefect for the flows.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from datasets import load_from_disk
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.oauth.installation_store import Installation
from sqlalchemy import select

from devtools.emulator import Emulator, EmulatorConfig, create_app, serve_in_thread
from devtools.synth import generate_workspace, write_export
from doppel.config import Settings, get_settings
from doppel.consent import grant
from doppel.dataset.build import build_dataset, load_conversations, user_summaries
from doppel.dataset.counts import refresh_sample_counts, user_counts
from doppel.errors import DoppelError
from doppel.ingest import ingest_export
from doppel.slack.export import read_export
from doppel.slack.scrape import SlackScraper, make_client, make_rate_limiter
from doppel.slack.tokens import find_token, ingestible_workspaces, require_token
from doppel.store.database import Database
from doppel.store.models import Channel, Message, SampleCounts, ScrapeCursor, User, Workspace
from serving.slack.installations import oauth_stores
from tests.helpers import doppel

ALPHA, BETA = "T0ALPHA01", "T0BETA002"
TOKENS = {ALPHA: "xoxb-alpha-installed", BETA: "xoxb-beta-installed"}
CLIENT_ID = "emulator-client-id"
KEY = Fernet.generate_key().decode()
LIMIT = 64 * 2**20
SHARED_USER = "U0000001"  # in both workspaces, as one person of an Enterprise Grid would be


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two synthetic workspaces with the same user and channel ids but other messages."""
    root = tmp_path_factory.mktemp("grid")
    return {
        workspace_id: write_export(
            generate_workspace(
                users=5, days=8, seed=seed, workspace_id=workspace_id, team_name=name
            ),
            root / f"{name}.zip",
        )
        for workspace_id, seed, name in ((ALPHA, 1, "alpha"), (BETA, 2, "beta"))
    }


@pytest.fixture
def slack(
    exports: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, Emulator]]:
    """One emulated Slack serving both workspaces, each answering only its own token; the
    settings point at it with OAuth configured and no SLACK_BOT_TOKEN."""
    alpha, beta = (read_export(exports[w], max_bytes=LIMIT) for w in (ALPHA, BETA))
    app = create_app(
        alpha,
        EmulatorConfig(team_name="alpha", tokens={TOKENS[ALPHA]}),
        more=[(beta, EmulatorConfig(team_name="beta", tokens={TOKENS[BETA]}))],
    )
    with serve_in_thread(app) as url:
        env = {
            "SLACK_API_URL": url,
            "SLACK_CLIENT_ID": CLIENT_ID,
            "SLACK_CLIENT_SECRET": "emulator-client-secret",
            "DOPPEL_SECRET_KEY": KEY,
            "DOPPEL_SLACK__RATES__HISTORY_PER_MINUTE": "60000",
            "DOPPEL_SLACK__RATES__LISTS_PER_MINUTE": "60000",
            "DOPPEL_SLACK__INCLUDE_ARCHIVED": "true",  # all an export holds
        }
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()
        yield {emulator.workspace_id: emulator for emulator in app.state.emulators}
    get_settings.cache_clear()


def install(db: Database, workspace_id: str) -> None:
    """What the Slack app stores when OAuth completes in a workspace (encrypted)."""
    installations, _ = oauth_stores(db.engine, CLIENT_ID, KEY)
    installations.save(
        Installation(
            app_id="AEMULATOR",
            team_id=workspace_id,
            bot_token=TOKENS[workspace_id],
            bot_id="BDOPPELBOT",
            bot_user_id="UDOPPELBOT",
            bot_scopes="channels:history,channels:read,users:read",
            user_id="U0000002",
        )
    )


def scrape(settings: Settings, db: Database, workspace_id: str) -> None:
    """What the ingest flow does for one workspace, without Prefect."""
    token = require_token(settings, db.engine, workspace_id)
    client = make_client(settings, token.value)
    scraper = SlackScraper(client, db, settings.slack, make_rate_limiter(settings.slack))
    assert scraper.connect(expected=workspace_id) == workspace_id
    scraper.sync_users()
    for channel in scraper.sync_channels():
        scraper.scrape_channel(channel)
    refresh_sample_counts(settings, workspace_id)


def rows_of(db: Database, workspace_id: str) -> dict[str, list[tuple]]:
    """A workspace's messages, users and channels as stored, minus scrape bookkeeping."""
    tables: dict[str, Any] = {"messages": Message, "users": User, "channels": Channel}
    skip = {"replies_synced_ts"}
    with db.session() as session:
        return {
            name: sorted(
                tuple(row)
                for row in session.execute(
                    select(*[c for c in model.__table__.c if c.name not in skip]).where(
                        model.workspace_id == workspace_id
                    )
                )
            )
            for name, model in tables.items()
        }


def reference_counts(settings: Settings, db: Database, workspace_id: str) -> dict[str, int]:
    """Every person's samples, counted from scratch as a dataset build counts them."""
    with db.session() as session:
        workspace = session.get_one(Workspace, workspace_id)
        loaded = load_conversations(session, workspace, settings.dataset.gap_minutes)
    return {row["id"]: row["samples"] for row in user_summaries(loaded, {}, settings.dataset)}


def test_the_emulator_serves_each_workspace_to_its_own_tokens_only(
    slack: dict[str, Emulator],
) -> None:
    url = get_settings().slack_api_url
    for workspace_id, token in TOKENS.items():
        assert WebClient(token=token, base_url=url).auth_test()["team_id"] == workspace_id
    with pytest.raises(SlackApiError, match="invalid_auth"):
        WebClient(token="xoxb-emulator", base_url=url).auth_test()
    alpha, beta = slack[ALPHA], slack[BETA]
    assert {u["id"] for u in alpha.users} == {u["id"] for u in beta.users}  # Grid-like
    assert set(alpha.conversations) == set(beta.conversations)
    with pytest.raises(ValueError, match="tokens of their own"):
        create_app(alpha.workspace, more=[(beta.workspace, EmulatorConfig())])


@pytest.mark.parametrize(
    "db", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
def test_each_workspace_is_ingested_with_its_installation_token_and_nothing_leaks(
    slack: dict[str, Emulator],
    db: Database,
    tmp_path: Path,
    exports: dict[str, Path],
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    install(db, ALPHA)
    install(db, BETA)
    settings = get_settings()
    assert ingestible_workspaces(settings, db.engine) == [ALPHA, BETA]
    for workspace_id in (ALPHA, BETA):
        scrape(settings, db, workspace_id)

    for workspace_id, emulator in slack.items():
        # The emulator saw only this workspace's own token, and was read in full with it.
        assert {request.token for request in emulator.request_log} == {TOKENS[workspace_id]}
        assert any(r.method == "conversations.history" for r in emulator.request_log)
        # Exactly what a single-workspace store holds after importing that export alone.
        alone = Database(f"sqlite:///{tmp_path / workspace_id}.db")
        ingest_export(alone, exports[workspace_id], max_bytes=LIMIT)
        assert rows_of(db, workspace_id) == rows_of(alone, workspace_id)
        with db.session() as session:
            cursors = {
                cursor.channel_id: cursor.synced_through
                for cursor in session.scalars(
                    select(ScrapeCursor).where(
                        ScrapeCursor.workspace_id == workspace_id,
                        ScrapeCursor.synced_through.is_not(None),
                    )
                )
            }
            counts = session.get_one(SampleCounts, workspace_id).counts
        newest = {
            conversation.id: conversation.timeline[-1]["ts"]
            for conversation in emulator.conversations.values()
            if conversation.timeline
        }
        assert cursors == newest
        assert counts == reference_counts(settings, alone, workspace_id)
        # The same user id in both workspaces: two datasets, each of its own workspace.
        built = build_dataset(settings, SHARED_USER, workspace=workspace_id)
        assert built.path == settings.dataset_dir(workspace_id, SHARED_USER)
        assert built.train + built.validation == counts[SHARED_USER] > 0
        expected = build_dataset(
            settings.model_copy(update={"database_url": alone.url}),
            SHARED_USER,
            workspace=workspace_id,
            out=tmp_path / f"alone-{workspace_id}",
        )
        mine, theirs = load_from_disk(str(built.path)), load_from_disk(str(expected.path))
        assert set(mine["train"]["workspace_id"]) == {workspace_id}
        assert mine["train"]["messages"] == theirs["train"]["messages"]
    assert counts != reference_counts(settings, db, ALPHA)  # the two really differ
    out, err = capfd.readouterr()
    for token in TOKENS.values():
        assert token not in out + err + caplog.text


def test_the_configured_token_reads_only_its_own_workspace(
    slack: dict[str, Emulator], db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLACK_BOT_TOKEN", TOKENS[ALPHA])  # a single-workspace install of ALPHA
    get_settings.cache_clear()
    settings = get_settings()
    install(db, BETA)
    alpha, beta = (find_token(settings, db.engine, w) for w in (ALPHA, BETA))
    assert alpha is not None and alpha.source == "SLACK_BOT_TOKEN"
    assert beta is not None and beta.source == f"the app's installation in {BETA}"
    assert TOKENS[BETA] not in repr(beta)
    assert ingestible_workspaces(settings, db.engine) == [ALPHA, BETA]
    assert find_token(settings, db.engine, "T0NOWHERE") is None
    assert find_token(settings, db.engine, None) == alpha  # without --workspace, as before
    only_oauth = settings.model_copy(update={"slack_bot_token": None})
    assert find_token(only_oauth, db.engine, None) == beta  # the one installation
    # A token of another workspace is never used, even when handed to the scraper.
    client = make_client(settings, TOKENS[ALPHA])
    scraper = SlackScraper(client, db, settings.slack, make_rate_limiter(settings.slack))
    with pytest.raises(DoppelError, match=f"given for workspace {BETA} belongs to .*{ALPHA}"):
        scraper.connect(expected=BETA)


def test_a_workspace_without_a_token_is_one_clear_line(
    slack: dict[str, Emulator], db: Database
) -> None:
    missing = doppel("ingest", "slack", "--workspace", BETA, ok=False)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert (
        f"no Slack token for workspace {BETA}: the app is not installed there, and "
        "SLACK_BOT_TOKEN is not set" in " ".join(missing.stderr.split())
    )
    assert "install the app in that workspace" in " ".join(missing.stderr.split())
    other = doppel(
        "ingest", "slack", "--workspace", BETA, env={"SLACK_BOT_TOKEN": TOKENS[ALPHA]}, ok=False
    )
    assert f"SLACK_BOT_TOKEN belongs to workspace {ALPHA}" in " ".join(other.stderr.split())
    assert TOKENS[ALPHA] not in other.stdout + other.stderr
    install(db, ALPHA)
    install(db, BETA)
    several = doppel("ingest", "slack", ok=False)
    assert "installed in 2 workspaces (T0ALPHA01, T0BETA002)" in " ".join(several.stderr.split())


@pytest.mark.slow
def test_train_and_the_nightly_retrain_ingest_each_workspace_with_its_own_token(
    slack: dict[str, Emulator], db: Database, settings: Settings
) -> None:
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import retrain_flow, user_pipeline_flow

    install(db, BETA)
    for workspace_id in (ALPHA, BETA):
        with db.transaction() as session:
            grant(session, workspace_id, SHARED_USER, "test")
    never = 10**6  # new samples needed to train: these runs ingest and build, then skip
    with prefect_test_harness():
        # `/doppel train` in BETA, installed by OAuth, nothing ingested yet.
        first = user_pipeline_flow(SHARED_USER, BETA, min_new_samples=never)
        assert {r.token for r in slack[BETA].request_log} == {TOKENS[BETA]}
        assert not slack[ALPHA].request_log
        install(db, ALPHA)
        outcomes = retrain_flow(min_new_samples=never)
    assert (first["workspace_id"], first["user_id"], first["outcome"]) == (
        BETA,
        SHARED_USER,
        "skipped",
    )
    assert sorted((o["workspace_id"], o["user_id"], o["outcome"]) for o in outcomes) == [
        (ALPHA, SHARED_USER, "skipped"),
        (BETA, SHARED_USER, "skipped"),
    ]
    for workspace_id, emulator in slack.items():
        assert {request.token for request in emulator.request_log} == {TOKENS[workspace_id]}
        assert user_counts(settings, workspace_id)[0]["samples"] > 0
        assert settings.dataset_dir(workspace_id, SHARED_USER).exists()
