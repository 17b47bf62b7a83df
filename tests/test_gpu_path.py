"""The GPU path, checked on any machine: what imports where, the dtype, bitsandbytes.

What a GPU machine would decide is passed in as an argument (`cuda=True`); what a machine
lacks is made absent in a subprocess (a `sys.modules` entry of None, a name transformers 4
does not have), so that nothing here depends on the machine the tests run on.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from doppel.errors import DoppelError
from doppel.train.base_model import use_qlora
from doppel.train.device import model_dtype, require_optimizer
from tests.helpers import REPO


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


# transformers 4 has no top-level GgufConfig: hide it the way `from transformers import`
# would then fail, without touching anything else of transformers.
WITHOUT_GGUF_CONFIG = """
    import transformers

    lazy = type(transformers)
    found = lazy.__getattr__

    def without_gguf_config(module, name):
        if module.__name__ == "transformers" and name == "GgufConfig":
            raise AttributeError(name)
        return found(module, name)

    lazy.__getattr__ = without_gguf_config
    transformers.__dict__.pop("GgufConfig", None)
"""


def test_serving_and_training_import_without_transformers_gguf_config(tmp_path) -> None:
    done = run_python(
        WITHOUT_GGUF_CONFIG
        + f"""
    import serving.engines, serving.engines.transformers_engine, serving.engines.vllm_engine
    import doppel.train.trainer
    print("imported")

    # The one place that needs it still does, so the hiding above is real.
    from doppel.train.base_model import bundled_model
    try:
        bundled_model(__import__("pathlib").Path({str(tmp_path)!r}))
    except ImportError as error:
        print("conversion:", error)
    """
    )
    assert done.returncode == 0, done.stderr
    assert "imported" in done.stdout
    assert "conversion: cannot import name 'GgufConfig'" in done.stdout


def test_model_dtype_is_bf16_where_native_fp16_on_older_gpus_fp32_on_cpu() -> None:
    assert model_dtype(cuda=True, bf16_native=True) is torch.bfloat16  # A100, RTX 40xx, H100
    assert model_dtype(cuda=True, bf16_native=False) is torch.float16  # T4, V100
    assert model_dtype(cuda=False) is torch.float32
    if torch.cuda.is_available():  # this machine's own answer, asked of the device
        native = torch.cuda.get_device_capability()[0] >= 8
        assert model_dtype() is (torch.bfloat16 if native else torch.float16)
    else:
        assert model_dtype() is torch.float32


def test_without_bitsandbytes_qlora_on_cuda_fails_early_with_the_install_command() -> None:
    done = run_python(
        """
    import sys
    sys.modules["bitsandbytes"] = None  # as if it were not installed

    from doppel.errors import DoppelError
    from doppel.train.base_model import use_qlora
    from doppel.train.device import require_optimizer

    checks = {
        "auto": lambda: use_qlora("auto", cuda=True),
        "qlora": lambda: use_qlora("qlora", cuda=True),
        "paged": lambda: require_optimizer("paged_adamw_8bit", cuda=True),
    }
    for name, check in checks.items():
        try:
            check()
        except DoppelError as error:
            print(name, "|", error.message, "|", error.hint)
    print("cpu auto:", use_qlora("auto", cuda=False), "cuda none:", use_qlora("none", cuda=True))
    require_optimizer("adamw_torch_fused", cuda=True)
    """
    )
    assert done.returncode == 0, done.stderr
    *errors, cpu = done.stdout.splitlines()
    whats = ("quantization: auto", "quantization: qlora", "optimizer: paged_adamw_8bit")
    for line, what in zip(errors, whats, strict=True):
        assert line.split(" | ")[1].startswith(what)
        assert "needs bitsandbytes, which is not installed" in line
        assert "make install-gpu" in line.split(" | ")[2]
    assert cpu == "cpu auto: False cuda none: False"


def test_with_bitsandbytes_auto_chooses_qlora_on_cuda_only_and_cpu_refuses_8bit_optimizers() -> (
    None
):
    pytest.importorskip("bitsandbytes")
    assert use_qlora("auto", cuda=True) and use_qlora("qlora", cuda=True)
    assert not use_qlora("auto", cuda=False)
    assert use_qlora("qlora", cuda=False)  # NF4 on CPU: the GPU recipe's path, slowly
    require_optimizer("paged_adamw_8bit", cuda=True)
    with pytest.raises(DoppelError, match="optimizer: paged_adamw_8bit needs a CUDA GPU"):
        require_optimizer("paged_adamw_8bit", cuda=False)
