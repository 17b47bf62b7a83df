"""The training recipe's configuration: one YAML file per base model in `configs/`.

The defaults below are `configs/smollm2-135m-cpu.yaml`, so a fresh machine trains with
no file at all. Unknown keys are an error that lists the valid ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError

from doppel.config import REPO_CONFIGS, Section, explain
from doppel.errors import DoppelError

BUNDLED_MODEL = "smollm2-135m-instruct"
# transformers' names. The paged 8-bit AdamW keeps its states in 8 bits (a quarter of the
# memory of 32-bit ones) and pages them to host memory when a long batch spikes the GPU.
Optimizer = Literal["adamw_torch_fused", "adamw_torch", "adamw_8bit", "paged_adamw_8bit"]
BITSANDBYTES_OPTIMIZERS = frozenset({"adamw_8bit", "paged_adamw_8bit"})


class LoraConfig(Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class EvalConfig(Section):
    """How adapters are compared: NLL on validation, plus generated replies for style."""

    max_generations: int = Field(6, ge=0)  # validation contexts to generate replies for
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(8, ge=1)


class GateConfig(Section):
    # Promote when eval_loss <= baseline * (1 - min_improvement), the baseline being the
    # production adapter's eval loss, or the base model's when there is none.
    min_improvement: float = Field(0.02, ge=0, lt=1)


class TrainConfig(Section):
    """Everything one training run needs; every value is logged to MLflow as a parameter."""

    base_model: str = BUNDLED_MODEL  # the bundled model, a local HF folder or a hub id
    quantization: Literal["auto", "qlora", "none"] = "auto"  # auto: QLoRA on CUDA, LoRA on CPU
    lora: LoraConfig = LoraConfig()
    max_length: int = Field(256, ge=32)  # tokens per sample; context is trimmed to fit
    batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    lr_scheduler: str = "cosine"
    warmup_ratio: float = Field(0.1, ge=0, lt=1)  # of the run's steps, rounded up
    epochs: float = Field(1.0, gt=0)
    max_steps: int = 16  # > 0: exactly this many steps, epochs ignored; -1: epochs decide
    step_cap: int | None = Field(None, ge=1)  # with max_steps -1: at most this many steps
    eval_steps: int | float = Field(8, gt=0)  # >= 1: every this many steps; < 1: of the run
    early_stopping_patience: int = Field(3, ge=1)  # evaluations without a better eval loss
    gradient_checkpointing: bool = False  # trades compute for memory; GPUs need it
    optimizer: Optimizer = "adamw_torch_fused"  # the 8-bit and paged ones need bitsandbytes
    seed: int = 42
    min_train_samples: int = Field(8, ge=1)
    eval: EvalConfig = EvalConfig()
    gate: GateConfig = GateConfig()

    def flat(self) -> dict[str, Any]:
        """Every resolved value as `section.key`, for MLflow parameters."""
        return _flatten(self.model_dump())


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def default_config_path() -> Path:
    return REPO_CONFIGS / "smollm2-135m-cpu.yaml"


def load_train_config(path: Path | None = None, **overrides: Any) -> TrainConfig:
    """Read a recipe YAML (or the built-in default) and apply CLI overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise DoppelError(
                f"training config {path} does not exist",
                f"pick one of: {', '.join(p.name for p in sorted(REPO_CONFIGS.glob('*.yaml')))}",
            )
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise DoppelError(f"training config {path} is not a YAML mapping", "see configs/")
    values |= {key: value for key, value in overrides.items() if value is not None}
    try:
        return TrainConfig(**values)
    except ValidationError as error:
        raise explain(error, TrainConfig, f"training config {path or '(defaults)'}") from None
