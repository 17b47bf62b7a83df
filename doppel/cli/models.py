"""Training, evaluation and the registry: `train`, `evaluate`, `promote`, `rollback`,
`models` and `pipeline`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from doppel.cli.common import JsonFlag, UserOption, WorkspaceOption, app, emit, prefect_env
from doppel.config import get_settings
from doppel.errors import DoppelError
from doppel.progress import console

SLACK_USER_ID = re.compile(r"[UW][A-Z0-9]{2,}")  # U0123ABC; W... on Enterprise Grid


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
    prefect_env(settings)
    from doppel.consent import require_consent
    from doppel.dataset.build import build_dataset
    from flows.train import train_flow

    workspace_id, user_id = _person(user, workspace)
    require_consent(settings, workspace_id, user_id)
    if not settings.dataset_dir(workspace_id, user_id).exists():
        console.print("no dataset yet: building it first")
        build_dataset(settings, user_id, workspace=workspace_id)
    trained = train_flow(user_id, workspace_id, str(config) if config else None, max_steps)
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
    prefect_env(get_settings())
    from flows.evaluate import evaluate_flow

    workspace_id, user_id = _person(user, workspace)
    result = evaluate_flow(user_id, workspace_id, version, gate)
    table = Table("metric", "value")
    for key, value in sorted(result["metrics"].items()):
        table.add_row(key, f"{value:.4f}")
    console.print(table)
    verdict = "promote" if result["decision"]["promote"] else "keep production"
    console.print(
        f"{result['name']} v{result['version']}: {verdict} ({result['decision']['reason']})"
    )
    emit(result, as_json)


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
    for model in rows:
        if model["not_served"]:
            console.print(f"not served: {model['name']} {model['not_served']}")
    emit(rows, as_json)


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

        # Ids as given (the Slack app's way) need no store lookup, so a workspace installed
        # by OAuth trains before its first ingest: the flow ingests it first.
        given = (workspace, user) if workspace and SLACK_USER_ID.fullmatch(user) else None
        require_consent(settings, *(given or _person(user, workspace)))
    prefect_env(settings)
    from flows.pipeline import retrain_flow, user_pipeline_flow

    recipe = str(config) if config else None
    if user:
        outcomes = [user_pipeline_flow(user, workspace, recipe, max_steps)]
    else:
        outcomes = retrain_flow(workspace, recipe, max_steps)
    for outcome in outcomes:
        console.print(f"{outcome['user_id']}: {outcome['outcome']} ({outcome.get('reason', '')})")
    emit(outcomes, as_json)
