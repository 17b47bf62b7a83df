"""The `doppel` command line.

Heavy imports (Prefect, FastAPI, datasets) happen inside the commands that need them,
so `doppel --help` stays instant.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from doppel.config import Settings, get_settings
from doppel.errors import DoppelError
from doppel.progress import console

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="DoppelBot: learn how a person writes on Slack and answer in their voice.",
)
ingest_app = typer.Typer(no_args_is_help=True, help="Bring Slack messages into the store.")
dataset_app = typer.Typer(no_args_is_help=True, help="Turn a user's conversations into samples.")
app.add_typer(ingest_app, name="ingest")
app.add_typer(dataset_app, name="dataset")

JsonFlag = Annotated[bool, typer.Option("--json", help="Print a JSON object as the last line.")]
WorkspaceOption = Annotated[
    str | None, typer.Option("--workspace", help="Workspace id or name (needed when several).")
]


def main() -> None:
    """Console entry point: user-facing errors print as one line, not a traceback."""
    try:
        app()
    except DoppelError as error:
        console.print(f"[bold red]error:[/] {error.message}")
        if error.hint:
            console.print(f"[yellow]hint:[/] {error.hint}")
        sys.exit(1)


def _emit(result: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, default=str))


def _database(settings: Settings):
    from doppel.store.database import Database

    return Database(settings.db_url)


def _prefect_env(settings: Settings) -> None:
    """Keep Prefect's state under DOPPEL_HOME and off the network, unless configured."""
    prefect_home = (settings.home / "prefect").resolve()
    prefect_home.mkdir(parents=True, exist_ok=True)  # its server cannot start without it
    os.environ.setdefault("PREFECT_HOME", str(prefect_home))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # A first run creates Prefect's database; on 2 cores that outlasts the 20 s default.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")


# -- ingest -------------------------------------------------------------------------


@ingest_app.command("export")
def ingest_export(
    path: Annotated[Path, typer.Argument(help="Slack export .zip or unzipped folder.")],
    workspace: Annotated[
        str | None, typer.Option(help="Workspace id (team_id) when the export lacks one.")
    ] = None,
    include_private: Annotated[
        bool, typer.Option(help="Also read groups.json, dms.json and mpims.json.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Import a Slack export in one transaction (re-importing changes nothing)."""
    from doppel.ingest import ingest_export as run

    settings = get_settings()
    db = _database(settings)
    with console.status(f"reading {path}"):
        result = run(
            db,
            path,
            workspace=workspace,
            include_private=include_private,
            max_bytes=settings.export.max_unzipped_mb * 2**20,
        )
    console.print(
        f"workspace {result['workspace']}: {result['channels']} channels, {result['users']} "
        f"users, {result['messages']} messages, {result['threads']} threads"
    )
    _emit(result, as_json)


@ingest_app.command("slack")
def ingest_slack(
    channel: Annotated[
        list[str] | None, typer.Option("--channel", help="Only these channels (name or id).")
    ] = None,
    include_archived: Annotated[bool | None, typer.Option(help="Also archived channels.")] = None,
    include_private: Annotated[
        bool | None, typer.Option(help="Also private channels, DMs and group DMs.")
    ] = None,
    join: Annotated[bool | None, typer.Option(help="Join public channels first.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Scrape through the Slack Web API: incremental, resumable and rate-limited."""
    _prefect_env(get_settings())
    from flows.ingest import ingest_flow

    result = ingest_flow(
        channels=channel or None,
        include_archived=include_archived,
        include_private=include_private,
        join=join,
    )
    console.print(
        f"workspace {result['workspace']}: {result['channels']} channels, {result['users']} "
        f"users, {result['messages']} messages, {result['threads']} threads "
        f"({result['fetched']} fetched this run)"
    )
    for name, reason in {**result["skipped"], **result["failed"]}.items():
        console.print(f"[yellow]skipped #{name}:[/] {reason}")
    summary = {key: result[key] for key in ("workspace", "channels", "users", "messages")}
    _emit({**summary, "threads": result["threads"], "skipped": result["skipped"]}, as_json)
    if result["failed"]:
        raise DoppelError(
            f"{len(result['failed'])} channel(s) failed after retries",
            "run the same command again: it resumes where it stopped",
        )


# -- users and datasets ---------------------------------------------------------------


@app.command()
def users(workspace: WorkspaceOption = None, as_json: JsonFlag = False) -> None:
    """List users with their message counts and how many samples each would yield."""
    from doppel.dataset.build import load_conversations, user_summaries
    from doppel.store.lookup import message_counts, resolve_workspace

    settings = get_settings()
    with _database(settings).session() as session:
        ws = resolve_workspace(session, workspace)
        loaded = load_conversations(session, ws, settings.dataset.gap_minutes)
        rows = user_summaries(loaded, message_counts(session, ws.id), settings.dataset)
    table = Table("id", "name", "display name", "real name", "messages", "samples")
    for row in rows:
        flags = " (bot)" if row["is_bot"] else " (deleted)" if row["deleted"] else ""
        table.add_row(
            row["id"],
            (row["name"] or "") + flags,
            row["display_name"] or "",
            row["real_name"] or "",
            str(row["messages"]),
            str(row["samples"]),
        )
    console.print(table)
    _emit(rows, as_json)


@dataset_app.command("build")
def dataset_build(
    user: Annotated[str, typer.Option("--user", help="User id, name, display or real name.")],
    workspace: WorkspaceOption = None,
    min_chars: Annotated[int | None, typer.Option(help="Shortest reply kept.")] = None,
    gap_minutes: Annotated[
        float | None, typer.Option(help="A quieter gap than this starts a new conversation.")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Build a user's chat dataset (train/validation `DatasetDict` plus stats.json)."""
    from doppel.dataset.build import build_dataset

    with console.status("building samples"):
        built = build_dataset(
            get_settings(),
            user,
            workspace=workspace,
            min_chars=min_chars,
            gap_minutes=gap_minutes,
            out=out,
        )
    console.print(
        f"dataset for {built.user_name} ({built.user_id}): {built.train} train, "
        f"{built.validation} validation samples -> {built.path}"
    )
    _emit(
        {
            "path": str(built.path),
            "user_id": built.user_id,
            "train": built.train,
            "validation": built.validation,
            "stats": built.stats,
        },
        as_json,
    )


# -- training, evaluation and the registry ---------------------------------------------

UserOption = Annotated[str, typer.Option("--user", help="User id, name, display or real name.")]


def _person(user: str, workspace: str | None) -> tuple[str, str]:
    from flows.common import person_ids

    return person_ids(get_settings(), user, workspace)


@app.command()
def train(
    user: UserOption,
    workspace: WorkspaceOption = None,
    config: Annotated[Path | None, typer.Option(help="Recipe YAML (configs/).")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Cap the optimizer steps.")] = None,
) -> None:
    """Train a LoRA adapter on the user's dataset and register it as `challenger`."""
    settings = get_settings()
    _prefect_env(settings)
    from doppel.consent import require_consent
    from doppel.dataset.build import build_dataset
    from flows.train import train_flow

    team_id, user_id = _person(user, workspace)
    require_consent(settings, team_id, user_id)
    if not settings.dataset_dir(team_id, user_id).exists():
        console.print("no dataset yet: building it first")
        build_dataset(settings, user_id, workspace=team_id)
    trained = train_flow(user_id, team_id, str(config) if config else None, max_steps)
    if trained["resumed_from"]:
        console.print(f"resumed from {Path(trained['resumed_from']).name}")
    console.print(
        f"registered {trained['name']} version {trained['version']} as challenger "
        f"({trained['steps']} steps, MLflow run {trained['run_id']})"
    )


@app.command()
def evaluate(
    user: UserOption,
    workspace: WorkspaceOption = None,
    version: Annotated[str | None, typer.Option(help="Version (default: challenger).")] = None,
    gate: Annotated[bool, typer.Option(help="Promote the version if it is better.")] = True,
    as_json: JsonFlag = False,
) -> None:
    """Compare a version with the base model and production on the same validation tokens."""
    _prefect_env(get_settings())
    from flows.evaluate import evaluate_flow

    team_id, user_id = _person(user, workspace)
    result = evaluate_flow(user_id, team_id, version, gate)
    table = Table("metric", "value")
    for key, value in sorted(result["metrics"].items()):
        table.add_row(key, f"{value:.4f}")
    console.print(table)
    verdict = "promote" if result["decision"]["promote"] else "keep production"
    console.print(
        f"{result['name']} v{result['version']}: {verdict} ({result['decision']['reason']})"
    )
    _emit(result, as_json)


@app.command()
def promote(
    user: UserOption,
    version: Annotated[str, typer.Option("--version", help="The version to serve.")],
    workspace: WorkspaceOption = None,
) -> None:
    """Move the `production` alias to a version by hand (an operator's override)."""
    from doppel.registry import Registry, model_name

    name = model_name(*_person(user, workspace))
    Registry(get_settings()).promote(name, version, "promoted by hand")
    console.print(f"{name}: production -> version {version}")


@app.command()
def rollback(user: UserOption, workspace: WorkspaceOption = None) -> None:
    """Move `production` back to the version it replaced."""
    from doppel.registry import Registry, model_name

    name = model_name(*_person(user, workspace))
    before, after = Registry(get_settings()).rollback(name)
    console.print(f"{name}: production {before} -> {after}")


@app.command()
def models(workspace: WorkspaceOption = None, as_json: JsonFlag = False) -> None:
    """Registered personas, their versions, metrics and gate decisions."""
    from doppel.registry import Registry

    rows = Registry(get_settings()).models(workspace)
    table = Table("model", "version", "aliases", "eval_loss", "base_eval_loss", "decision")
    for model in rows:
        for v in model["versions"]:
            metrics = v["metrics"]
            table.add_row(
                model["name"],
                str(v["version"]),
                ",".join(v["aliases"]),
                f"{metrics['eval_loss']:.4f}" if "eval_loss" in metrics else "",
                f"{metrics['base_eval_loss']:.4f}" if "base_eval_loss" in metrics else "",
                v["decision"] or "",
            )
    console.print(table)
    _emit(rows, as_json)


@app.command()
def pipeline(
    user: Annotated[str | None, typer.Option("--user", help="One person.")] = None,
    all_users: Annotated[bool, typer.Option("--all", help="Every enrolled person.")] = False,
    workspace: WorkspaceOption = None,
    config: Annotated[Path | None, typer.Option(help="Recipe YAML (configs/).")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Cap the optimizer steps.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Ingest (when Slack is configured), dataset, train, evaluate and gate, in Prefect."""
    if bool(user) == all_users:
        raise DoppelError("pass either --user USER or --all", "see doppel pipeline --help")
    settings = get_settings()
    if user:  # refuse before Prefect starts (the flow checks again, for deployments)
        from doppel.consent import require_consent

        require_consent(settings, *_person(user, workspace))
    _prefect_env(settings)
    from flows.pipeline import retrain_flow, user_pipeline_flow

    recipe = str(config) if config else None
    if user:
        outcomes = [user_pipeline_flow(user, workspace, recipe, max_steps)]
    else:
        outcomes = retrain_flow(workspace, recipe, max_steps)
    for outcome in outcomes:
        console.print(f"{outcome['user_id']}: {outcome['outcome']} ({outcome.get('reason', '')})")
    _emit(outcomes, as_json)


# -- consent, workspace limits and the Slack app ----------------------------------------

consent_app = typer.Typer(
    no_args_is_help=True,
    help="Record consent collected outside Slack (the CLI side of /doppel optin and optout).",
)
app.add_typer(consent_app, name="consent")


def _operator() -> str:
    import getpass

    return f"cli:{getpass.getuser()}"


@consent_app.command("grant")
def consent_grant(
    user: Annotated[str, typer.Argument(help="User id, name, display or real name.")],
    workspace: WorkspaceOption = None,
) -> None:
    """Record that USER agreed to be trained and impersonated."""
    from doppel.consent import grant
    from doppel.store.lookup import find_person

    with _database(get_settings()).transaction() as session:
        ws, person = find_person(session, user, workspace)
        new = grant(session, ws.id, person.id, _operator())
    state = "now consents" if new else "had already consented"
    console.print(f"{person.label} ({person.id}) of {ws.id} {state}")


@consent_app.command("revoke")
def consent_revoke(
    user: Annotated[str, typer.Argument(help="User id, name, display or real name.")],
    workspace: WorkspaceOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Withdraw USER's consent and delete their datasets, adapters and registry versions."""
    from dataclasses import asdict

    from doppel.consent import revoke
    from doppel.store.lookup import find_person

    settings = get_settings()
    db = _database(settings)
    with db.session() as session:
        ws, person = find_person(session, user, workspace)
    deletion = revoke(settings, db, ws.id, person.id, _operator())
    console.print(f"{person.label} ({person.id}) of {ws.id} no longer consents. Deleted:")
    for line in deletion.lines():
        console.print(f"  {line}")
    _emit(asdict(deletion), as_json)


@consent_app.command("list")
def consent_list(workspace: WorkspaceOption = None, as_json: JsonFlag = False) -> None:
    """Everyone whose consent is recorded, with who recorded it and when."""
    from sqlalchemy import select

    from doppel.store.lookup import people, resolve_workspace
    from doppel.store.models import Enrollment

    with _database(get_settings()).session() as session:
        ws = resolve_workspace(session, workspace)
        known = people(session, ws.id)
        rows = session.scalars(
            select(Enrollment).where(Enrollment.workspace_id == ws.id).order_by(Enrollment.user_id)
        ).all()
    table = Table("id", "name", "consent", "by", "at")
    result = []
    for row in rows:
        person = known.get(row.user_id)
        label = person.label if person else ""
        table.add_row(
            row.user_id,
            label,
            "granted" if row.granted else "revoked",
            row.changed_by,
            f"{row.changed_at:%Y-%m-%d %H:%M}",
        )
        result.append({"user_id": row.user_id, "name": label, "granted": row.granted})
    console.print(table)
    _emit(result, as_json)


@app.command()
def limits(
    workspace: Annotated[str, typer.Option("--workspace", help="Workspace id (team_id).")],
    max_enrolled: Annotated[int | None, typer.Option(min=0, help="People who may opt in.")] = None,
    trainings_per_day: Annotated[
        int | None, typer.Option(min=0, help="/doppel train requests per 24 hours.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Show, or set, a workspace's limits (defaults: the slack_app settings)."""
    from dataclasses import asdict

    from doppel.workspace_state import limits as current_limits
    from doppel.workspace_state import set_limits

    settings = get_settings()
    with _database(settings).transaction() as session:
        set_limits(session, workspace, max_enrolled, trainings_per_day)
        now = current_limits(session, workspace, settings.slack_app)
    console.print(
        f"{workspace}: at most {now.max_enrolled} people enrolled, "
        f"{now.trainings_per_day} trainings per 24 hours"
    )
    _emit(asdict(now), as_json)


@app.command("slack-app")
def slack_app(
    serving_url: Annotated[
        str | None, typer.Option(help="The model API (default: DOPPEL_SERVING_URL).")
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 3000,
) -> None:
    """Run the Slack app alone, calling the model API over HTTP (see README, Slack app)."""
    import uvicorn

    from serving.slack import standalone_app

    settings = get_settings()
    model_api = serving_url or settings.serving_url
    console.print(f"Slack app on http://{host}:{port}/slack/events, model API {model_api}")
    uvicorn.run(standalone_app(settings, model_api), host=host, port=port)


# -- synthetic data and the emulator ---------------------------------------------------


@app.command()
def synth(
    out: Annotated[Path, typer.Option(help="Where to write the export .zip.")],
    users: Annotated[int, typer.Option(min=2, help="People in the workspace.")] = 8,
    days: Annotated[int, typer.Option(min=1, help="Days of history.")] = 30,
    seed: Annotated[int, typer.Option(help="Same seed, same bytes.")] = 0,
) -> None:
    """Write a deterministic synthetic workspace as a valid Slack export."""
    from doppel.synth import generate_workspace, write_export

    workspace = generate_workspace(users=users, days=days, seed=seed)
    path = write_export(workspace, out)
    console.print(
        f"wrote {path}: {len(workspace.users)} users, {len(workspace.channels)} channels, "
        f"{sum(len(m) for m in workspace.messages.values())} messages (team {workspace.team_id})"
    )


@app.command()
def serve(
    engine: Annotated[
        str | None, typer.Option(help="vllm or transformers (default: serve.engine, auto).")
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
) -> None:
    """Serve every person's production adapter over an OpenAI-style API (and the Slack app)."""
    import uvicorn

    from serving.api import create_app

    if engine not in (None, "auto", "vllm", "transformers"):
        raise DoppelError(f"unknown engine '{engine}'", "use vllm or transformers")
    settings = get_settings()
    local = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    app = create_app(settings, engine, self_url=f"http://{local}:{port}")
    slack = "with the Slack app at /slack/events" if app.state.slack else "no Slack app"
    kind = engine or settings.serve.engine
    console.print(f"serving on http://{host}:{port} (engine: {kind}; {slack})")
    uvicorn.run(
        app,
        host=host,
        port=port,
        timeout_graceful_shutdown=30,  # in-flight completions get this long to finish
        log_level="warning",
    )


@app.command("slack-emulator")
def slack_emulator(
    export: Annotated[Path, typer.Option(help="Slack export (.zip or folder) to serve.")],
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 8765,
    rate_limit: Annotated[
        int | None, typer.Option(help="Requests per method per minute before 429s.")
    ] = None,
    fail_rate: Annotated[float, typer.Option(min=0, max=1, help="Share of 5xx answers.")] = 0.0,
    latency: Annotated[float, typer.Option(min=0, help="Seconds added to every answer.")] = 0.0,
    bot_user: Annotated[str, typer.Option(help="User id of the app's bot user.")] = "UDOPPELBOT",
) -> None:
    """Serve a Slack export as a Slack Web API on 127.0.0.1 (for demos and tests)."""
    from serving.slack_emulator import run_emulator

    run_emulator(
        export,
        port=port,
        rate_limit_per_minute=rate_limit,
        fail_rate=fail_rate,
        latency_seconds=latency,
        bot_user=bot_user,
    )


if __name__ == "__main__":
    main()
