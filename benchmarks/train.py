"""Training throughput and peak memory: LoRA on CPU, and QLoRA beside LoRA on a GPU.

Trains a few steps on a synthetic persona with the real recipe (TRL's SFTTrainer) and
reports tokens/s (tokens seen by the optimizer, padding excluded) and peak memory
(process RSS on CPU, torch's peak allocation on CUDA).

    python benchmarks/train.py [--steps 6] [--config configs/smollm2-135m-cpu.yaml]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch
from datasets import load_from_disk

from devtools.synth import generate_workspace, write_export
from doppel.config import load_settings
from doppel.dataset.build import build_dataset
from doppel.ingest import ingest_export
from doppel.store.database import Database
from doppel.train.base_model import resolve_base_model
from doppel.train.config import load_train_config
from doppel.train.trainer import train_adapter


def run(config_path: Path | None, quantization: str, steps: int, home: Path) -> dict:
    settings = load_settings(home=home)
    export = write_export(generate_workspace(users=6, days=30, seed=0), home / "ws.zip")
    ingest_export(Database(settings.db_url), export, max_bytes=2**28)
    dataset = load_from_disk(str(build_dataset(settings, "U0000001").path))
    config = load_train_config(
        config_path, max_steps=steps, eval_steps=steps, quantization=quantization
    )
    base = resolve_base_model(config.base_model, settings.models_dir)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = train_adapter(dataset, config, base, home / f"run-{quantization}")
    seconds = time.perf_counter() - start
    tokens = max(float(h.get("num_tokens", 0)) for h in result.history)  # trained, no padding
    peak = (
        torch.cuda.max_memory_allocated() / 2**30
        if torch.cuda.is_available()
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "base_model": config.base_model,
        "quantization": quantization,
        "steps": result.steps,
        "batch": config.batch_size * config.gradient_accumulation_steps,
        "seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / max(result.steps, 1), 2),
        "tokens_per_second": round(tokens / seconds, 1),
        "peak_memory_gib": round(peak, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--config", type=Path, default=None)
    args = parser.parse_args()
    kinds = ["none", "qlora"] if torch.cuda.is_available() else ["none"]
    for kind in kinds:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(run(args.config, kind, args.steps, Path(tmp))))


if __name__ == "__main__":
    main()
