"""Scrape a workspace through the Slack Web API, one mapped Prefect task per channel.

Each workspace is read with its own token (`doppel.slack.tokens`): its installation's
bot token, or the configured one when it is that workspace's; tokens are looked up here,
never passed as parameters, so Prefect never records one. Channels run concurrently on a
thread pool; one shared rate limiter keeps all of them together under Slack's per-method
tiers. A failed channel task is retried by Prefect and resumes from its stored cursor.
After the scrape, the workspace's sample counts are brought up to date for `doppel users`.
"""

from __future__ import annotations

from dataclasses import asdict

from prefect import flow, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner
from rich.progress import Progress

from doppel.config import get_settings
from doppel.dataset.counts import refresh_sample_counts
from doppel.errors import DoppelError
from doppel.progress import channel_progress, channel_reporter
from doppel.slack.scrape import (
    ChannelResult,
    SlackScraper,
    make_client,
    make_rate_limiter,
)
from doppel.slack.tokens import require_token
from doppel.store.database import database, workspace_counts
from flows.common import transient


@task(
    retries=3,
    retry_delay_seconds=[2, 10, 30],
    retry_condition_fn=transient,
    cache_policy=NO_CACHE,
    task_run_name="scrape #{channel[name]}",
)
def scrape_channel(scraper: SlackScraper, channel: dict, progress: Progress) -> ChannelResult:
    advance, finish = channel_reporter(progress, channel.get("name") or channel["id"])
    result = scraper.scrape_channel(channel, advance)
    finish()
    return result


# Prefect types `task_runner` as the invariant TaskRunner[PrefectFuture[Any]], which its own
# ThreadPoolTaskRunner (a TaskRunner[PrefectConcurrentFuture[R]]) does not match.
@flow(
    name="ingest-slack",
    task_runner=ThreadPoolTaskRunner(max_workers=4),  # type: ignore[arg-type]
)
def ingest_flow(
    workspace: str | None = None,
    channels: list[str] | None = None,
    include_archived: bool | None = None,
    include_private: bool | None = None,
    join: bool | None = None,
) -> dict:
    """Incremental ingest of one workspace (by id) with its own token; without one, of
    the configured token's workspace, or of the only workspace the app is installed in."""
    settings = get_settings()
    overrides = {
        "include_archived": include_archived,
        "include_private": include_private,
        "join_channels": join,
    }
    slack = settings.slack.model_copy(
        update={key: value for key, value in overrides.items() if value is not None}
    )
    db = database(settings.db_url)
    token = require_token(settings, db.engine, workspace)
    client = make_client(settings, token.value)
    scraper = SlackScraper(client, db, slack, make_rate_limiter(slack))
    workspace_id = scraper.connect(expected=workspace)
    scraper.sync_users()
    targets = scraper.sync_channels(channels)
    with channel_progress() as progress:
        futures = scrape_channel.map(
            scraper=unmapped(scraper), channel=targets, progress=unmapped(progress)
        )
        outcomes = [future.result(raise_on_failure=False) for future in futures]
    for outcome in outcomes:
        if isinstance(outcome, DoppelError):
            raise outcome
    refresh_sample_counts(settings, workspace_id)
    with db.session() as session:
        totals = workspace_counts(session, workspace_id)
    results = [outcome for outcome in outcomes if isinstance(outcome, ChannelResult)]
    failed = {
        channel.get("name") or channel["id"]: repr(outcome)
        for channel, outcome in zip(targets, outcomes, strict=True)
        if isinstance(outcome, BaseException)
    }
    return {
        "workspace": workspace_id,
        **totals,
        "fetched": sum(result.messages for result in results),
        "skipped": {r.name: r.skipped for r in results if r.skipped},
        "failed": failed,
        "channel_results": [asdict(result) for result in results],
    }
