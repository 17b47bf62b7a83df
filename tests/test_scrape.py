"""The Web API scraper against the emulator: real HTTP, real slack-sdk, real SQLite."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import pytest
from slack_sdk import WebClient
from sqlalchemy import func, select

from devtools.emulator import EmulatorConfig, create_app, serve_in_thread
from doppel.config import SlackSettings, load_settings
from doppel.errors import DoppelError
from doppel.ingest import ingest_export
from doppel.slack.export import read_export
from doppel.slack.ratelimit import MethodRateLimiter
from doppel.slack.scrape import SlackScraper, make_client, make_rate_limiter
from doppel.store.database import Database
from doppel.store.models import Message, ScrapeCursor
from tests.helpers import REPO, store_snapshot

FAST = {"lists_per_minute": 60_000, "history_per_minute": 60_000, "join_per_minute": 60_000}
LIMIT = 64 * 2**20


@contextmanager
def emulator(export: Path, **config: object) -> Iterator[tuple[str, object]]:
    app = create_app(read_export(export, max_bytes=LIMIT), EmulatorConfig(**config))
    with serve_in_thread(app) as url:
        yield url, app.state.emulator


def scraper(db: Database, url: str, token: str = "xoxp-emulator", **slack: object) -> SlackScraper:
    options = {"rates": FAST, "max_retries": 8, "history_page_size": 50} | slack
    settings = load_settings(slack_api_url=url, slack=options)
    return SlackScraper(
        make_client(settings, token), db, settings.slack, make_rate_limiter(settings.slack)
    )


def scrape_all(s: SlackScraper, only: list[str] | None = None) -> list:
    s.connect()
    s.sync_users()
    return [s.scrape_channel(channel) for channel in s.sync_channels(only)]


def other_db(tmp_path: Path, name: str) -> Database:
    return Database(f"sqlite:///{tmp_path / name}.db")


def test_scrape_equals_export_ingest(db: Database, tmp_path: Path, synth_zip: Path) -> None:
    from_file = other_db(tmp_path, "file")
    ingest_export(from_file, synth_zip, max_bytes=LIMIT)
    with emulator(synth_zip) as (url, _):
        results = scrape_all(scraper(db, url, include_archived=True))
    assert all(result.skipped is None for result in results)
    assert store_snapshot(db, scrape_state=False) == store_snapshot(from_file, scrape_state=False)
    with db.session() as session:
        assert session.scalar(select(func.count()).select_from(Message)) > 500


def test_incremental_run_fetches_only_what_is_new(db: Database, synth_zip: Path) -> None:
    with emulator(synth_zip) as (url, state):
        scrape_all(scraper(db, url, thread_lookback_days=0))
        general = next(c for c in state.conversations.values() if c.info["name"] == "general")
        poster = WebClient(token="xoxb-emulator", base_url=url)
        new = poster.chat_postMessage(channel=general.info["id"], text="fresh news")["ts"]
        seen = len(state.request_log)

        scrape_all(scraper(db, url, thread_lookback_days=0))
        second = state.request_log[seen:]
    history = [r for r in second if r.method == "conversations.history"]
    # One short page per channel, starting after the cursor: nothing old is fetched again.
    assert len(history) == len({r.params["channel"] for r in history})
    assert all(float(r.params["oldest"]) > 0 for r in history)
    assert not [r for r in second if r.method == "conversations.replies"]
    with db.session() as session:
        fresh = session.get(Message, (state.workspace_id, general.info["id"], new))
        assert fresh.text == "fresh news"


def test_a_reply_to_an_old_thread_is_picked_up(db: Database, synth_zip: Path) -> None:
    with emulator(synth_zip) as (url, state):
        scrape_all(scraper(db, url, thread_lookback_days=60))
        with db.session() as session:
            channel_id, parent_ts = session.execute(
                select(Message.channel_id, Message.ts)
                .where(Message.reply_count > 0, Message.thread_ts == Message.ts)
                .order_by(Message.ts)
                .limit(1)
            ).one()
        poster = WebClient(token="xoxb-emulator", base_url=url)
        reply = poster.chat_postMessage(channel=channel_id, thread_ts=parent_ts, text="late reply")
        seen = len(state.request_log)

        scrape_all(scraper(db, url, thread_lookback_days=60))
        replies = [r for r in state.request_log[seen:] if r.method == "conversations.replies"]
    assert [r.params["ts"] for r in replies] == [parent_ts]  # only the thread that moved
    with db.session() as session:
        late = session.get(Message, (state.workspace_id, channel_id, reply["ts"]))
        assert late.text == "late reply"
        parent = session.get(Message, (state.workspace_id, channel_id, parent_ts))
        assert parent.latest_reply == parent.replies_synced_ts == reply["ts"]


def test_faults_429_and_5xx_end_in_the_same_store(
    db: Database, tmp_path: Path, synth_zip: Path
) -> None:
    clean = other_db(tmp_path, "clean")
    with emulator(synth_zip) as (url, _):
        scrape_all(scraper(clean, url, history_page_size=20))
    faults = {"fail_rate": 0.2, "rate_limit_per_minute": 8, "rate_window_seconds": 1.0}
    with emulator(synth_zip, **faults) as (url, state):
        scrape_all(scraper(db, url, history_page_size=20))
        statuses = {r.status for r in state.request_log}
    assert {429, 200} <= statuses and statuses & {500, 503}
    assert store_snapshot(db, scrape_state=False) == store_snapshot(clean, scrape_state=False)


@contextmanager
def dropping_proxy(url: str, every: int) -> Iterator[str]:
    """A TCP proxy to `url` that hangs up on every `every`-th connection without answering."""
    target = urlparse(url)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()
    opened: list[socket.socket] = []

    def pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def serve() -> None:
        for number in itertools.count(1):
            if stop.is_set():
                return
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            if number % every == 0:
                client.recv(65536)  # take the request, then drop the connection
                client.close()
                continue
            upstream = socket.create_connection((target.hostname, target.port))
            opened.extend((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=pipe, args=(a, b), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}{target.path}"
    finally:
        stop.set()
        thread.join(timeout=5)
        for end in (*opened, listener):
            end.close()


def test_dropped_connections_are_retried(db: Database, tmp_path: Path, synth_zip: Path) -> None:
    clean = other_db(tmp_path, "clean")
    with emulator(synth_zip) as (url, state):
        scrape_all(scraper(clean, url), only=["general"])
        served = len(state.request_log)
        with dropping_proxy(url, every=4) as flaky:
            scrape_all(scraper(db, flaky), only=["general"])
        assert len(state.request_log) - served > 10  # the run really went through the proxy
    assert store_snapshot(db, scrape_state=False) == store_snapshot(clean, scrape_state=False)


def test_a_killed_scrape_resumes_without_gaps_or_refetch(
    db: Database, tmp_path: Path, synth_zip: Path
) -> None:
    clean = other_db(tmp_path, "clean")
    with emulator(synth_zip) as (url, _):
        scrape_all(scraper(clean, url, history_page_size=5))

    env = os.environ | {
        "SLACK_USER_TOKEN": "xoxp-emulator",
        "DOPPEL_SLACK__HISTORY_PAGE_SIZE": "5",
        "DOPPEL_SLACK__RATES__HISTORY_PER_MINUTE": "60000",
        "DOPPEL_SLACK__RATES__LISTS_PER_MINUTE": "60000",
    }
    with emulator(synth_zip, latency_seconds=0.05) as (url, state):
        env["SLACK_API_URL"] = url
        command = [sys.executable, "-m", "doppel.cli", "ingest", "slack"]
        process = subprocess.Popen(
            command, env=env, cwd=REPO, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + 120
        while _stored(db) < 150 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGKILL)  # the CLI and its Prefect server, like a crash
        process.wait(timeout=30)
        with db.session() as session:
            interrupted = {
                c.channel_id: c.run_before
                for c in session.scalars(
                    select(ScrapeCursor).where(ScrapeCursor.run_before.is_not(None))
                )
            }
        assert interrupted, "the scrape was killed before or after every channel was mid-run"
        # A token of its own tells the resumed scrape's calls apart from those the killed
        # process had in flight, which the emulator may log after the kill.
        token = state.issue_token("xoxp")
        scrape_all(scraper(db, url, token, history_page_size=5))
        resumed = [
            r for r in state.request_log if r.method == "conversations.history" and r.token == token
        ]
    for channel_id, run_before in interrupted.items():
        first = next(r for r in resumed if r.params["channel"] == channel_id)
        assert first.params["latest"] == run_before  # continues below the last stored page
    assert store_snapshot(db, scrape_state=False) == store_snapshot(clean, scrape_state=False)


def _stored(db: Database) -> int:
    with db.session() as session:
        return int(session.scalar(select(func.count()).select_from(Message)) or 0)


def test_pacing_keeps_under_slacks_limits(db: Database, synth_zip: Path) -> None:
    limits = {"rate_limit_per_minute": 5, "rate_window_seconds": 1.0}
    with emulator(synth_zip, **limits) as (url, state):
        paced = scraper(db, url, rates={"lists_per_minute": 180, "history_per_minute": 180})
        scrape_all(paced, only=["general"])
        assert {r.status for r in state.request_log} == {200}


def test_non_marketplace_apps_page_by_15_at_one_request_a_minute(
    db: Database, synth_zip: Path
) -> None:
    settings = SlackSettings(non_marketplace_app=True)
    assert settings.page_size() == 15
    assert make_rate_limiter(settings).intervals["conversations.history"] == 60.0
    clock = [0.0]
    limiter = MethodRateLimiter(
        {"conversations.history": 1.0, "conversations.replies": 1.0},
        clock=lambda: clock[0],
        sleep=lambda seconds: clock.__setitem__(0, clock[0] + seconds),
    )
    with emulator(synth_zip, max_page_size=15) as (url, state):
        s = scraper(db, url, non_marketplace_app=True)
        s.limiter = limiter
        scrape_all(s, only=["general"])
        calls = [r for r in state.request_log if r.method.startswith("conversations.")]
    paged = [r for r in calls if r.method in ("conversations.history", "conversations.replies")]
    assert {r.params["limit"] for r in paged} == {"15"}
    per_method = [[r for r in paged if r.method == m] for m in limiter.intervals]
    assert all(len(calls) > 1 for calls in per_method)
    # Each method waits a full minute between calls; the wall clock is their sum here
    # because this scraper calls one method at a time.
    assert clock[0] == pytest.approx(sum(60.0 * (len(calls) - 1) for calls in per_method))
    assert _stored(db) > 15


def test_bad_token_and_unknown_channel_are_clear_errors(db: Database, synth_zip: Path) -> None:
    with emulator(synth_zip) as (url, _):
        with pytest.raises(DoppelError, match="invalid_auth"):
            scraper(db, url, token="xoxp-revoked").connect()
        s = scraper(db, url)
        s.connect()
        with pytest.raises(DoppelError, match=r"unknown or unreadable channel.*nope"):
            s.sync_channels(["nope"])


def test_channels_the_bot_is_not_in_are_skipped_or_joined(db: Database, synth_zip: Path) -> None:
    with emulator(synth_zip, bot_channels=set()) as (url, state):
        results = scrape_all(scraper(db, url, token="xoxb-emulator"))
        assert results and all("not_in_channel" in (r.skipped or "") for r in results)
        results = scrape_all(scraper(db, url, token="xoxb-emulator", join_channels=True))
        assert all(r.skipped is None and r.messages > 0 for r in results)
        assert any(r.method == "conversations.join" for r in state.request_log)
