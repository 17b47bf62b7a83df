"""Evaluate a registered version against the base model and production, then gate it.

Everything the evaluation needs (the adapter, the recipe and the validation split)
comes back from MLflow, so it runs on any worker, with no shared disk. The base model is
loaded in the precision serving uses (`evaluate.precision`), and production is only
compared when it was trained on the candidate's base: an adapter does not load on another.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from datasets import load_from_disk
from matplotlib.figure import Figure
from peft import PeftModel

from doppel.config import Settings
from doppel.errors import DoppelError
from doppel.evaluate.gate import Bases, Decision, decide
from doppel.evaluate.nll import mean_nll
from doppel.evaluate.precision import evaluation_precision, load_base
from doppel.evaluate.style import generate_replies, style_metrics
from doppel.persona import PersonaCard
from doppel.registry import CHALLENGER, Registry, model_name
from doppel.train.base_model import load_tokenizer, resolve_base_model
from doppel.train.config import TrainConfig
from doppel.train.encode import encode_dataset


@dataclass
class Evaluation:
    name: str
    version: str
    metrics: dict[str, float]
    decision: Decision
    precision: str  # what the base model was scored in, e.g. bfloat16
    examples: list[dict[str, str]] = field(default_factory=list)


def evaluate_version(
    settings: Settings,
    workspace_id: str,
    user_id: str,
    version: str | None = None,
    gate: bool = True,
    recheck: Callable[[], None] | None = None,
) -> Evaluation:
    """Score `version` (default: the challenger) and, with `gate`, promote it if it is better.

    `recheck` (the flows pass `doppel.consent.stop_if_withdrawn` for this person) runs
    before the gate and after it: when the person opted out meanwhile, it deletes what was
    made of them, the replies this evaluation logged included, and raises."""
    check = recheck or (lambda: None)
    registry = Registry(settings)
    name = model_name(workspace_id, user_id)
    candidate = registry.version(name, version or _challenger(registry, name))
    run_id = candidate.run_id
    if run_id is None:  # `doppel train` registers every version from its run
        raise DoppelError(
            f"{name} version {candidate.version} has no training run",
            "register versions with doppel train",
        )
    production = registry.production(name)
    if production is not None and str(production.version) == str(candidate.version):
        production = None  # scoring production against itself says nothing

    precision = evaluation_precision(settings)
    with tempfile.TemporaryDirectory(prefix="doppel-eval-") as scratch:
        run = Path(mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="", dst_path=scratch
        ))  # fmt: skip
        config = TrainConfig(**json.loads((run / "config.json").read_text()))
        validation = load_from_disk(str(run / "dataset"))["validation"]
        adapters = {"candidate": run / "adapter"}
        bases = Bases(config.base_model, settings.serve.base_model)
        if production is not None:
            adapter = registry.download_adapter(
                name, production.version, Path(scratch) / "production"
            )
            bases = Bases(bases.candidate, bases.served, PersonaCard.read(adapter).base_model)
            if bases.production == bases.candidate:
                adapters["production"] = adapter
        metrics, examples = _score(settings, config, validation, adapters, precision)

    decision = decide(
        metrics, production.version if production else None, config.gate, bases, precision
    )
    _log(run_id, metrics, examples, precision)
    check()  # before the gate: an opt-out during evaluation promotes nothing
    if gate:
        if decision.promote:
            registry.promote(name, candidate.version, decision.reason)
        else:
            registry.record_decision(name, candidate.version, "rejected", decision.reason)
        check()  # after it too: a revoke that raced with the promotion is finished here
    return Evaluation(name, str(candidate.version), metrics, decision, precision, examples)


def _challenger(registry: Registry, name: str) -> str:
    versions = registry.versions(name)
    for mv in versions:
        if CHALLENGER in mv.aliases:
            return str(mv.version)
    if versions:
        return str(versions[-1].version)
    raise DoppelError(f"{name} has no versions yet", "train first: doppel train --user USER")


def _score(
    settings: Settings,
    config: TrainConfig,
    validation: Any,
    adapters: dict[str, Path],
    precision: str,
) -> tuple[dict[str, float], list[dict[str, str]]]:
    """Same validation tokens through base, candidate and production; style on generations."""
    base_path = resolve_base_model(config.base_model, settings.models_dir)
    tokenizer = load_tokenizer(base_path)
    encoded = encode_dataset(validation, tokenizer, config.max_length)
    model = PeftModel.from_pretrained(
        load_base(base_path, precision), str(adapters["candidate"]), adapter_name="candidate"
    )
    if "production" in adapters:
        model.load_adapter(str(adapters["production"]), adapter_name="production")

    def nll() -> float:
        return mean_nll(model, encoded, config.eval.batch_size, tokenizer.pad_token_id)

    def replies() -> list[str]:
        return generate_replies(
            model,
            tokenizer,
            prompts,
            max_length=config.max_length,
            max_new_tokens=config.eval.max_new_tokens,
            batch_size=config.eval.batch_size,
        )

    chats = validation["messages"][: config.eval.max_generations]
    prompts = [chat[:-1] for chat in chats]
    real = [chat[-1]["content"] for chat in chats]
    metrics: dict[str, float] = {}
    model.set_adapter("candidate")
    metrics["eval_loss"] = nll()
    generated = replies()
    metrics |= {f"style_{k}": v for k, v in style_metrics(generated, real).items()}
    with model.disable_adapter():
        metrics["base_eval_loss"] = nll()
        base_generated = replies()
    metrics |= {f"base_style_{k}": v for k, v in style_metrics(base_generated, real).items()}
    if "production" in adapters:
        model.set_adapter("production")
        metrics["production_eval_loss"] = nll()
    examples = [
        {"context": prompt[-1]["content"][-300:], "real": r, "adapter": g, "base": b}
        for prompt, r, g, b in zip(prompts, real, generated, base_generated, strict=True)
    ]
    return metrics, examples


def _log(
    run_id: str, metrics: dict[str, float], examples: list[dict[str, str]], precision: str
) -> None:
    """Metrics, a table of replies and a comparison chart, on the version's training run;
    the precision as a tag, since a version may be evaluated again in another one."""
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(metrics)
        mlflow.set_tag("eval.precision", precision)
        if examples:
            mlflow.log_table(
                {key: [row[key] for row in examples] for key in examples[0]},
                artifact_file="eval/replies.json",
            )
        mlflow.log_figure(_comparison(metrics), "eval/comparison.png")


def _comparison(metrics: dict[str, float]) -> Figure:
    losses = {
        label: metrics[key]
        for key, label in (
            ("base_eval_loss", "base model"),
            ("production_eval_loss", "production"),
            ("eval_loss", "this adapter"),
        )
        if key in metrics
    }
    figure = Figure(figsize=(6, 3.5))
    axis = figure.subplots()
    axis.bar(list(losses), list(losses.values()), color=["#999", "#6a9", "#36c"][: len(losses)])
    axis.set_ylabel("validation NLL (nats/token)")
    axis.set_title("same validation tokens, three models")
    figure.tight_layout()
    return figure
