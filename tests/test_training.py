"""Real training, evaluation and the MLflow registry on the bundled SmolLM2 (tiny runs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from datasets import DatasetDict, load_from_disk
from peft import PeftModel
from transformers import AutoModelForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from doppel.config import load_settings
from doppel.dataset.build import build_dataset
from doppel.errors import DoppelError
from doppel.evaluate.run import evaluate_version
from doppel.ingest import ingest_export
from doppel.registry import PRODUCTION, Registry, model_name
from doppel.store.database import Database
from doppel.train.base_model import load_tokenizer, resolve_base_model
from doppel.train.config import TrainConfig, default_config_path, load_train_config
from doppel.train.encode import encode
from doppel.train.run import train_user
from doppel.train.schedule import Schedule, plan
from doppel.train.trainer import last_complete_checkpoint, train_adapter, training_arguments
from tests.helpers import REPO, TEAM, TINY, USER


@pytest.fixture
def dataset_path(settings, synth_zip: Path) -> Path:
    ingest_export(Database(settings.db_url), synth_zip, max_bytes=2**26)
    return build_dataset(settings, USER).path


def test_the_default_recipe_file_is_the_built_in_default() -> None:
    assert load_train_config(default_config_path()) == TrainConfig()


def test_loss_is_masked_to_the_final_assistant_turn(settings) -> None:
    tokenizer = load_tokenizer(resolve_base_model("smollm2-135m-instruct", settings.models_dir))
    reply = "honestly, the deploy is fine :rocket:"
    messages = [
        {"role": "system", "content": "You are Alice."},
        {"role": "user", "content": "Bo: is the deploy ok?"},
        {"role": "assistant", "content": "an earlier answer that must not be learned"},
        {"role": "user", "content": "Bo: sure?"},
        {"role": "assistant", "content": reply},
    ]
    row = encode(tokenizer, messages, max_length=256)
    # The batch exactly as TRL's trainer collates it.
    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
    batch = collator([row, encode(tokenizer, messages[:3], 256)])
    labels = batch["labels"][0]
    learned = tokenizer.decode([t for t in labels.tolist() if t != -100])
    assert learned == reply + "<|im_end|>"  # not ChatML's newline after the end of turn
    context = tokenizer.decode(batch["input_ids"][0][labels == -100])
    assert "an earlier answer that must not be learned" in context and reply not in context


def test_long_context_is_trimmed_from_the_oldest_turns(settings) -> None:
    tokenizer = load_tokenizer(resolve_base_model("smollm2-135m-instruct", settings.models_dir))
    old = [{"role": "user", "content": f"Bo: old message {i} " + "x " * 40} for i in range(6)]
    chat = [{"role": "system", "content": "S"}, *old, {"role": "assistant", "content": "reply"}]
    row = encode(tokenizer, chat, max_length=120)
    assert len(row["input_ids"]) <= 120
    text = tokenizer.decode(row["input_ids"])
    assert (
        "old message 5" in text and "old message 0" not in text and text.endswith("reply<|im_end|>")
    )


@pytest.mark.slow
def test_training_lowers_the_loss_and_the_adapter_loads_in_peft(
    settings, dataset_path: Path, tmp_path: Path
) -> None:
    config = load_train_config(None, max_steps=8, **TINY)
    base = resolve_base_model(config.base_model, settings.models_dir)
    result = train_adapter(load_from_disk(str(dataset_path)), config, base, tmp_path / "run")
    losses = [h["loss"] for h in result.history if "loss" in h]
    evals = [h["eval_loss"] for h in result.history if "eval_loss" in h]
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert evals[-1] < evals[0]
    files = {p.name for p in result.adapter_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), result.adapter_dir
    )
    out = model.generate(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
    assert out.shape[1] == 6


@pytest.mark.slow
def test_registry_gate_both_ways_promote_and_rollback(settings, dataset_path: Path) -> None:
    name = model_name(TEAM, USER)
    good = load_train_config(None, max_steps=8, **TINY)
    v1 = train_user(settings, TEAM, USER, dataset_path, good)
    registry = Registry(settings)
    assert v1.version == "1" and registry.production(name) is None
    first = evaluate_version(settings, TEAM, USER)
    assert first.decision.promote, first.decision.reason
    assert first.metrics["eval_loss"] < first.metrics["base_eval_loss"]
    assert {"style_similarity", "style_length_ratio", "style_distinct_2"} <= set(first.metrics)
    assert str(registry.production(name).version) == "1"

    # An adapter that barely moved from the base model cannot beat production.
    weak = load_train_config(None, max_steps=1, **(TINY | {"learning_rate": 1e-7}))
    v2 = train_user(settings, TEAM, USER, dataset_path, weak)
    second = evaluate_version(settings, TEAM, USER, v2.version)
    assert not second.decision.promote
    assert "production v1" in second.decision.reason
    assert second.metrics["production_eval_loss"] == pytest.approx(first.metrics["eval_loss"])
    assert str(registry.production(name).version) == "1"

    registry.promote(name, "2", "by hand")
    assert str(registry.production(name).version) == "2"
    assert registry.rollback(name) == ("2", "1")
    assert str(registry.production(name).version) == "1"
    (model,) = registry.models(TEAM)
    assert model["production"] == 1
    decisions = {v["version"]: v["decision"] for v in model["versions"]}
    assert decisions == {1: "promoted", 2: "rolled_back"}
    assert model["versions"][0]["aliases"] == [PRODUCTION]


def test_bad_inputs_register_nothing(settings, dataset_path: Path, tmp_path: Path) -> None:
    registry = Registry(settings)

    def fails(match: str, config: TrainConfig, path: Path = dataset_path, user: str = USER):
        with pytest.raises(DoppelError, match=match):
            train_user(settings, TEAM, user, path, config)

    fails("the minimum is 100000", load_train_config(None, min_train_samples=100_000))
    fails("belongs to U0000001, not U0000004", TrainConfig(), user="U0000004")
    fails("no dataset at", TrainConfig(), path=tmp_path / "nothing")
    fails("does not exist or has no config.json", TrainConfig(base_model=str(tmp_path)))
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("lora:\n  rank: 8\n")
    with pytest.raises(DoppelError, match=r"unknown config key 'lora.rank'.*alpha, dropout, r"):
        load_train_config(bad_yaml)
    assert registry.models() == []


def test_unreachable_mlflow_is_a_clear_error(settings, dataset_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    settings = load_settings()
    with pytest.raises(DoppelError, match=r"MLflow is unreachable at http://127\.0\.0\.1:9"):
        train_user(settings, TEAM, USER, dataset_path, TrainConfig())


def test_empty_validation_is_refused(settings, dataset_path: Path, tmp_path: Path) -> None:
    dataset = load_from_disk(str(dataset_path))
    empty = DatasetDict(
        {"train": dataset["train"], "validation": dataset["validation"].filter(lambda _: False)}
    )
    empty.save_to_disk(str(tmp_path / "ds"), num_shards={"train": 1, "validation": 1})
    with pytest.raises(DoppelError, match="no validation samples"):
        train_user(settings, TEAM, USER, tmp_path / "ds", TrainConfig())


def test_a_checkpoint_cut_short_by_a_kill_is_not_resumed_from(tmp_path: Path) -> None:
    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2}')
    (tmp_path / "checkpoint-4" / "adapter_model.safetensors").write_bytes(b"half")
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert not (tmp_path / "checkpoint-4").exists()
    assert last_complete_checkpoint(tmp_path / "absent") is None


def test_the_schedule_is_whole_steps_epochs_capped_or_exact_max_steps(tmp_path: Path) -> None:
    gpu = load_train_config(REPO / "configs" / "qwen2.5-7b-qlora.yaml")
    # 50 samples, 8 a step: 7 steps an epoch, 3 epochs; a fifth of the run between evals.
    assert plan(gpu, 50) == Schedule(steps=21, warmup_steps=2, eval_steps=4)
    assert plan(gpu, 2000) == Schedule(steps=750, warmup_steps=38, eval_steps=150)
    assert plan(gpu, 10_000).steps == 800  # the step cap
    # The CPU default: exactly max_steps, as before; the ratio rounded up as transformers does.
    assert plan(TrainConfig(), 20) == Schedule(steps=16, warmup_steps=2, eval_steps=8)
    args = training_arguments(TrainConfig(), tmp_path, 20, cuda=False)
    # transformers 4 rejects a float warmup_steps; 5 would read 0.1 as a ratio.
    assert type(args.warmup_steps) is int and args.warmup_steps == 2
    assert (args.max_steps, args.eval_steps, args.save_steps) == (16, 8, 8)
    assert args.optim == "adamw_torch_fused" and args.use_cpu and not (args.bf16 or args.fp16)


@pytest.mark.parametrize("recipe", ["llama-3.1-8b-qlora.yaml", "qwen2.5-7b-qlora.yaml"])
def test_the_gpu_recipes_checkpoint_page_and_evaluate_small_data(recipe: str) -> None:
    config = load_train_config(REPO / "configs" / recipe)
    assert config.quantization == "qlora" and config.gradient_checkpointing
    assert config.optimizer == "paged_adamw_8bit"
    for samples in (50, 2000):  # the typical person; every run is evaluated five times
        schedule = plan(config, samples)
        assert schedule.steps // schedule.eval_steps == 5
        assert schedule.steps > config.early_stopping_patience * schedule.eval_steps
