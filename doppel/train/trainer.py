"""One LoRA adapter from one user's dataset, with TRL's SFTTrainer (no hand-written loop).

The recipe: tokenize with the base model's chat template (loss on the final assistant
turn only), wrap the base in LoRA (QLoRA on CUDA), train in bf16 (fp16 on pre-Ampere GPUs,
fp32 on CPU) for a schedule of whole steps (`schedule.py`) with a warmup, evaluate every
`eval_steps`, stop early when validation loss stops improving, keep the best checkpoint,
and save a standard PEFT adapter folder that PEFT and vLLM both load.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import DatasetDict
from peft import LoraConfig as PeftLoraConfig
from peft import prepare_model_for_kbit_training
from transformers import EarlyStoppingCallback, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import SFTConfig, SFTTrainer

from doppel.train.base_model import load_model, load_tokenizer, use_qlora
from doppel.train.config import TrainConfig
from doppel.train.device import model_dtype, require_optimizer
from doppel.train.encode import encode_dataset
from doppel.train.schedule import plan

ADAPTER_DIR = "adapter"
TRAINER_STATE = "trainer_state.json"  # the Trainer writes it last in each checkpoint


@dataclass
class TrainResult:
    adapter_dir: Path
    steps: int
    resumed_from: str | None
    train_tokens: int
    history: list[dict] = field(default_factory=list)  # the trainer's log: loss per step, evals


def train_adapter(
    dataset: DatasetDict,
    config: TrainConfig,
    base_path: str,
    output_dir: Path,
    callbacks: list[TrainerCallback] | None = None,
) -> TrainResult:
    """Train (or resume) an adapter in `output_dir`; the adapter lands in `output_dir/adapter`."""
    cuda = torch.cuda.is_available()
    qlora = use_qlora(config.quantization, cuda)
    require_optimizer(config.optimizer, cuda)  # before the model loads, not at the first step
    tokenizer = load_tokenizer(base_path)
    train = encode_dataset(dataset["train"], tokenizer, config.max_length)
    validation = encode_dataset(dataset["validation"], tokenizer, config.max_length)
    model = load_model(base_path, qlora)
    if qlora:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.gradient_checkpointing
        )
    trainer = SFTTrainer(
        model=model,
        args=training_arguments(config, output_dir, len(train), cuda),
        train_dataset=train,
        eval_dataset=validation,
        processing_class=tokenizer,
        peft_config=PeftLoraConfig(
            r=config.lora.r,
            lora_alpha=config.lora.alpha,
            lora_dropout=config.lora.dropout,
            target_modules=config.lora.target_modules,
            task_type="CAUSAL_LM",
        ),
        callbacks=[
            EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience),
            *(callbacks or []),
        ],
    )
    resume = last_complete_checkpoint(output_dir)
    trainer.train(resume_from_checkpoint=resume)
    adapter_dir = output_dir / ADAPTER_DIR
    trainer.save_model(str(adapter_dir))  # the best checkpoint's adapter, PEFT format
    tokens = sum(len(ids) for ids in train["input_ids"])
    return TrainResult(
        adapter_dir=adapter_dir,
        steps=trainer.state.global_step,
        resumed_from=resume,
        train_tokens=tokens,
        history=list(trainer.state.log_history),
    )


def training_arguments(
    config: TrainConfig, output_dir: Path, train_samples: int, cuda: bool
) -> SFTConfig:
    """The Trainer's arguments: the recipe, its schedule in whole steps, this machine's dtype."""
    schedule = plan(config, train_samples)
    dtype = model_dtype(cuda)
    return SFTConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=schedule.warmup_steps,
        num_train_epochs=config.epochs,
        max_steps=schedule.steps,
        optim=config.optimizer,
        eval_strategy="steps",
        eval_steps=schedule.eval_steps,
        save_strategy="steps",
        save_steps=schedule.eval_steps,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        logging_steps=1,
        seed=config.seed,
        data_seed=config.seed,
        gradient_checkpointing=config.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        max_length=config.max_length,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=not cuda,
        dataloader_num_workers=0,
        report_to=[],  # the recipe logs to MLflow itself, with the names it wants
        disable_tqdm=False,
    )


def last_complete_checkpoint(output_dir: Path) -> str | None:
    """The newest checkpoint the Trainer finished writing, or None.

    A kill during a save leaves a checkpoint folder without a readable trainer state;
    resuming from it would fail, so such folders are removed and the one before is used."""
    if not output_dir.is_dir():
        return None
    steps = {
        int(step): path
        for path in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
        if (step := path.name.removeprefix(f"{PREFIX_CHECKPOINT_DIR}-")).isdigit()
    }
    for _, checkpoint in sorted(steps.items(), reverse=True):
        if _complete(checkpoint):
            return str(checkpoint)
        shutil.rmtree(checkpoint, ignore_errors=True)
    return None


def _complete(checkpoint: Path) -> bool:
    try:
        json.loads((checkpoint / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return False
    return True
