"""The training recipe: a user's dataset in, a registered `challenger` version out.

Read top to bottom: check the inputs, open (or resume) the MLflow run, log the config,
code and data, train, log the adapter and the curves, register the version. Nothing is
registered unless training finished; a killed run resumes from its last checkpoint, unless
the person opted out meanwhile: then nothing of it is kept.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version as package_version
from pathlib import Path
from typing import ClassVar

import mlflow
from datasets import Dataset, DatasetDict, load_from_disk
from matplotlib.figure import Figure
from mlflow.data.huggingface_dataset import from_huggingface
from mlflow.data.meta_dataset import MetaDataset
from mlflow.types.schema import Array, ColSpec, Object, Property, Schema
from transformers import TrainerCallback

from doppel.config import Settings
from doppel.errors import DoppelError
from doppel.persona import PersonaCard
from doppel.registry import Registry, model_name
from doppel.train.base_model import resolve_base_model
from doppel.train.config import TrainConfig
from doppel.train.trainer import TrainResult, train_adapter

RUN_ID_FILE = "mlflow_run_id"
LIBRARIES = ("torch", "transformers", "peft", "trl", "datasets", "mlflow")


@dataclass
class TrainedVersion:
    name: str
    version: str
    run_id: str
    steps: int
    resumed_from: str | None


def load_user_dataset(path: Path, user_id: str, minimum: int) -> DatasetDict:
    """The dataset, checked to be this user's and big enough to learn from."""
    try:
        dataset = load_from_disk(str(path))
    except (FileNotFoundError, ValueError):
        raise DoppelError(
            f"no dataset at {path}", "build it first: doppel dataset build --user USER"
        ) from None
    if not isinstance(dataset, DatasetDict) or set(dataset) < {"train", "validation"}:
        raise DoppelError(f"{path} is not a train/validation dataset", "rebuild it")
    if len(dataset["train"]) < minimum:
        raise DoppelError(
            f"the dataset has {len(dataset['train'])} training samples; the minimum is "
            f"{minimum} (min_train_samples)",
            "ingest more history, lower --min-chars, or lower min_train_samples",
        )
    if len(dataset["validation"]) == 0:
        raise DoppelError(
            "the dataset has no validation samples",
            "it needs at least two conversations; ingest more history",
        )
    owners = set(dataset["train"]["user_id"]) | set(dataset["validation"]["user_id"])
    if owners != {user_id}:
        raise DoppelError(
            f"the dataset at {path} belongs to {', '.join(sorted(owners))}, not {user_id}",
            "pass the dataset built for this user",
        )
    return dataset


def train_user(
    settings: Settings,
    workspace_id: str,
    user_id: str,
    dataset_path: Path,
    config: TrainConfig,
    recheck: Callable[[], None] | None = None,
) -> TrainedVersion:
    """Train, log and register. `recheck` (the flows pass `doppel.consent.stop_if_withdrawn`
    for this person; training cannot import consent, its sibling layer) runs when training
    stops early, before registering and after: when the person opted out meanwhile, it
    deletes what was made, this run included, and raises."""
    check = recheck or (lambda: None)
    dataset = load_user_dataset(dataset_path, user_id, config.min_train_samples)
    registry = Registry(settings)  # fail now, not after an hour of training
    base_path = resolve_base_model(config.base_model, settings.models_dir)
    digest = _digest(dataset, config)
    output_dir = settings.run_dir(workspace_id, user_id, digest)
    output_dir.mkdir(parents=True, exist_ok=True)
    run_id_file = output_dir / RUN_ID_FILE
    previous_run = run_id_file.read_text().strip() if run_id_file.exists() else None

    try:
        with mlflow.start_run(
            run_id=previous_run,
            experiment_id=None if previous_run else registry.experiment_id(workspace_id),
            run_name=None if previous_run else f"{user_id}-{digest[:8]}",
            # Tagged from its first moment, so that an opt-out finds it whenever it comes.
            tags={"workspace_id": workspace_id, "user_id": user_id},
        ) as run:
            run_id_file.write_text(run.info.run_id)
            if previous_run is None:
                _log_inputs(dataset, dataset_path, config, base_path, user_id, digest)
            with _sigterm_as_interrupt():
                try:
                    result = train_adapter(
                        dataset, config, base_path, output_dir, callbacks=[MlflowMetrics()]
                    )
                except KeyboardInterrupt:
                    mlflow.end_run(status="KILLED")
                    raise DoppelError(
                        "training was interrupted; no version was registered",
                        "run the same command again: it resumes from the last checkpoint",
                    ) from None
            system_prompt = dataset["train"][0]["messages"][0]["content"]
            PersonaCard(workspace_id, user_id, system_prompt, config.base_model).write(
                result.adapter_dir
            )
            mlflow.log_artifacts(str(result.adapter_dir), "adapter")
            mlflow.log_figure(_loss_figure(result), "loss_curves.png")
            mlflow.log_metrics({"train_tokens": result.train_tokens, "steps": result.steps})
    except BaseException:
        check()  # an opt-out while it ran leaves nothing, even of a killed or failed run
        raise
    check()  # before registering: an opt-out during training gets no version
    version = registry.register(
        workspace_id,
        user_id,
        run.info.run_id,
        tags={
            "dataset_digest": digest,
            "train_samples": str(len(dataset["train"])),
            "base_model": config.base_model,
        },
    )
    check()  # after registering too: a revoke that raced with it is finished here
    run_id_file.unlink()  # finished: a later identical request trains afresh
    return TrainedVersion(
        model_name(workspace_id, user_id),
        version,
        run.info.run_id,
        result.steps,
        result.resumed_from,
    )


class MlflowMetrics(TrainerCallback):
    """The trainer's per-step log, to MLflow under stable names."""

    NAMES: ClassVar = {
        "loss": "train_loss",
        "eval_loss": "trainer_eval_loss",
        "learning_rate": "lr",
    }

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        metrics = {self.NAMES[k]: float(v) for k, v in (logs or {}).items() if k in self.NAMES}
        if metrics:
            mlflow.log_metrics(metrics, step=state.global_step)


def _digest(dataset: DatasetDict, config: TrainConfig) -> str:
    """Same data and same recipe, same digest: that is what makes a rerun a resume."""
    fingerprints = [dataset[split]._fingerprint for split in ("train", "validation")]
    payload = json.dumps([fingerprints, config.model_dump()], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _log_inputs(
    dataset: DatasetDict,
    dataset_path: Path,
    config: TrainConfig,
    base_path: str,
    user_id: str,
    digest: str,
) -> None:
    mlflow.log_params(config.flat())
    mlflow.log_params(
        {
            "dataset.train_samples": len(dataset["train"]),
            "dataset.validation_samples": len(dataset["validation"]),
            "dataset.path": str(dataset_path),
        }
    )
    mlflow.set_tags(
        {
            "base_model": config.base_model,
            "base_model_path": base_path,
            "git_commit": _git_commit(),
            "run_digest": digest,
        }
        | {f"version.{name}": package_version(name) for name in LIBRARIES}
    )
    for split in ("train", "validation"):
        mlflow.log_input(_dataset_input(dataset[split], f"{user_id}-{split}"), context=split)
    mlflow.log_artifacts(str(dataset_path), "dataset")  # evaluation reads it back from here
    mlflow.log_dict(config.model_dump(), "config.json")


# The columns of `doppel.dataset.build.FEATURES`, declared: MLflow's own inference warns about
# the integer column on every run, and a declared schema says the same thing exactly.
SAMPLE_SCHEMA = Schema(
    [
        ColSpec(
            Array(Object([Property("role", "string"), Property("content", "string")])), "messages"
        ),
        *(
            ColSpec("string", name)
            for name in ("workspace_id", "user_id", "conversation_id", "channel", "reply_ts")
        ),
        ColSpec("integer", "context_turns"),
    ]
)


def _dataset_input(split: Dataset, name: str) -> MetaDataset:
    """A split as an MLflow dataset input: its source and digest, and the declared schema."""
    # Our own digest, of every row: MLflow's samples the first rows through pandas.
    rows = json.dumps(split.to_list(), sort_keys=True).encode()
    found = from_huggingface(split, name=name, digest=hashlib.sha256(rows).hexdigest()[:8])
    # MLflow marks `profile` abstract on a Dataset that is no ABC and MetaDataset leaves it out;
    # MLflow's own docs build MetaDataset directly, and it works.
    return MetaDataset(  # type: ignore[abstract]
        found.source, name=name, digest=found.digest, schema=SAMPLE_SCHEMA
    )


def _git_commit() -> str:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except OSError:
        return "unknown"
    return done.stdout.strip() or "unknown"


def _loss_figure(result: TrainResult) -> Figure:
    figure = Figure(figsize=(7, 4))
    axis = figure.subplots()
    for key, label in (("loss", "train loss"), ("eval_loss", "validation loss")):
        points = [(h["step"], h[key]) for h in result.history if key in h]
        if points:
            axis.plot(*zip(*points, strict=True), marker="o", markersize=3, label=label)
    axis.set_xlabel("step")
    axis.set_ylabel("loss (nats/token)")
    axis.legend()
    figure.tight_layout()
    return figure


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Prefect cancellations and `kill` send SIGTERM; treat it like Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
