"""The gate across base models and precisions: production on another base, a candidate
serving cannot serve, and the precision the gate scored in."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from doppel.config import Settings, load_settings
from doppel.consent import grant
from doppel.dataset.build import build_dataset
from doppel.evaluate.gate import Bases, decide
from doppel.evaluate.precision import evaluation_precision, serving_precision
from doppel.evaluate.run import evaluate_version
from doppel.ingest import ingest_export
from doppel.registry import Registry, model_name
from doppel.store.database import Database
from doppel.train.base_model import load_tokenizer, resolve_base_model
from doppel.train.config import BUNDLED_MODEL, GateConfig, load_train_config
from doppel.train.run import train_user
from serving.catalog import AdapterCatalog
from serving.engines import vllm_available
from tests.helpers import TEAM, TINY, USER

NAME = model_name(TEAM, USER)
METRICS = {"eval_loss": 2.0, "base_eval_loss": 4.0, "production_eval_loss": 1.9}


def test_production_on_the_candidates_base_is_the_baseline() -> None:
    bases = Bases(BUNDLED_MODEL, BUNDLED_MODEL, BUNDLED_MODEL)
    decision = decide(METRICS, "3", GateConfig(), bases, "bfloat16")
    assert not decision.promote
    assert decision.reason.startswith("eval_loss 2.0000 vs 1.9000 for production v3, in bfloat16")


def test_production_on_another_base_is_replaced_by_the_base_model() -> None:
    bases = Bases("/models/tiny-llama", "/models/tiny-llama", BUNDLED_MODEL)
    decision = decide(METRICS, "3", GateConfig(), bases, "float32")
    assert decision.promote
    assert "vs 4.0000 for the base model, in float32: +50.0%" in decision.reason
    assert (
        f"production v3 was trained on {BUNDLED_MODEL}, not /models/tiny-llama, "
        "so it was compared with the base model instead"
    ) in decision.reason


def test_a_candidate_on_a_base_serving_does_not_serve_is_never_promoted() -> None:
    for production, base in ((None, None), ("3", BUNDLED_MODEL), ("3", "/models/tiny-llama")):
        bases = Bases("/models/tiny-llama", BUNDLED_MODEL, base)
        decision = decide(METRICS | {"eval_loss": 0.1}, production, GateConfig(), bases, "nf4")
        assert not decision.promote
        assert decision.reason.startswith(
            f"not promotable: trained on /models/tiny-llama, but serving serves {BUNDLED_MODEL} "
            "(serve.base_model); "
        )


def test_the_precision_is_what_the_chosen_engine_serves_in() -> None:
    assert serving_precision("vllm", cuda=False) == "bfloat16"
    assert serving_precision("transformers", cuda=False) == "float32"
    cpu_auto = "bfloat16" if vllm_available() else "float32"
    assert serving_precision("auto", cuda=False) == cpu_auto
    served = load_settings(serve={"engine": "transformers"})
    assert evaluation_precision(served) == serving_precision("transformers")
    chosen = load_settings(serve={"engine": "transformers"}, evaluate={"precision": "bfloat16"})
    assert evaluation_precision(chosen) == "bfloat16"


@pytest.fixture
def dataset_path(settings: Settings, synth_zip: Path) -> Path:
    ingest_export(Database(settings.db_url), synth_zip, max_bytes=2**26)
    return build_dataset(settings, USER).path


def tiny_llama(settings: Settings, folder: Path) -> Path:
    """A second base model, honestly made: a small randomly initialised Llama, saved with
    SmolLM2's tokenizer (and so its chat template) as a local Hugging Face folder. Its
    weights are drawn wider than Llama's default (0.2, not 0.02) so that its logits are not
    flat and eight LoRA steps can lower its loss clearly (by 6.7% when measured)."""
    tokenizer = load_tokenizer(resolve_base_model(BUNDLED_MODEL, settings.models_dir))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_a_candidate_on_another_base_is_gated_against_its_base_model(
    settings: Settings, dataset_path: Path, tmp_path: Path
) -> None:
    """Production is a SmolLM2 adapter; the person is then trained on another base. Loading
    production's adapter onto the new base used to crash the evaluation (size mismatch)."""
    registry = Registry(settings)
    smollm2 = load_train_config(None, max_steps=1, **TINY)
    train_user(settings, TEAM, USER, dataset_path, smollm2)
    registry.promote(NAME, "1", "production on SmolLM2")

    llama = str(tiny_llama(settings, tmp_path / "tiny-llama"))
    other = load_train_config(
        None, base_model=llama, max_steps=8, **(TINY | {"learning_rate": 3e-2})
    )
    candidate = train_user(settings, TEAM, USER, dataset_path, other)

    # Serving serves SmolLM2: whatever its loss, the Llama adapter cannot be promoted.
    refused = evaluate_version(settings, TEAM, USER, candidate.version)
    assert "production_eval_loss" not in refused.metrics
    assert not refused.decision.promote
    assert refused.decision.reason.startswith(
        f"not promotable: trained on {llama}, but serving serves {BUNDLED_MODEL}"
    )
    assert f"production v1 was trained on {BUNDLED_MODEL}, not {llama}" in refused.decision.reason
    assert str(registry.production(NAME).version) == "1"
    assert registry.version(NAME, candidate.version).tags["decision"] == "rejected"

    # The operator moves serving to the new base: production v1 cannot be served there, and
    # both the server's status (/readyz) and `doppel models` say why.
    moved = settings.model_copy(
        update={"serve": settings.serve.model_copy(update={"base_model": llama})}
    )
    why = f"version 1 was trained on {BUNDLED_MODEL}, but serving serves {llama}"
    (listed,) = Registry(moved).models(TEAM)
    assert listed["not_served"] == why and Registry(settings).models(TEAM)[0]["not_served"] is None
    assert [v["base_model"] for v in listed["versions"]] == [BUNDLED_MODEL, llama]
    with Database(settings.db_url).transaction() as session:
        grant(session, TEAM, USER, "gate test")  # serving serves only people who consent
    catalog = AdapterCatalog(moved)
    catalog.refresh()
    catalog.prefetch(limit=4)
    assert (
        f"{NAME} version 1 was trained on {BUNDLED_MODEL}, but this server serves {llama}"
        in (catalog.status()["not_served"][f"{TEAM}/{USER}"])
    )

    # Now the base model is the bar to clear.
    gated = evaluate_version(moved, TEAM, USER, candidate.version)
    assert gated.metrics["eval_loss"] < gated.metrics["base_eval_loss"] * 0.98, gated.metrics
    assert gated.decision.promote, gated.decision.reason
    assert f"for the base model, in {gated.precision}" in gated.decision.reason
    assert gated.precision == serving_precision(settings.serve.engine)
    assert str(registry.production(NAME).version) == candidate.version
    run = mlflow.get_run(candidate.run_id)
    assert run.data.tags["eval.precision"] == gated.precision
