"""The environment a training child process gets: what training needs, and no more.

The Slack app holds secrets a training never uses: the signing secret, the OAuth client
secret, the model API's keys and admin token. A child (and anything it runs, such as a
tokenizer's custom code) gets an allowlist instead of the app's whole environment, so a
training can never leak what it was never given.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

# Names kept as they are: the platform, Python, and the libraries a training uses.
KEEP = {"PATH", "HOME", "USER", "LOGNAME", "LANG", "TZ", "TMPDIR", "TEMP", "TMP"}
KEEP |= {"VIRTUAL_ENV", "DATABASE_URL", "DOPPEL_SECRET_KEY"}  # the store, its tokens' key
KEEP |= {"SLACK_BOT_TOKEN", "SLACK_USER_TOKEN", "SLACK_API_URL"}  # ingest, before training
KEEP_PREFIXES = (
    "LC_",
    "PYTHON",
    "DOPPEL_",  # settings; the serving secrets among them are dropped below
    "MLFLOW_",
    "PREFECT_",
    "HF_",
    "TRANSFORMERS_",
    "TORCH",
    "CUDA_",
    "NVIDIA_",
    "OMP_",
    "MKL_",
    "AWS_",  # MLflow artifacts on S3, GCS or Azure
    "GOOGLE_",
    "AZURE_",
)
# Settings that only serving reads: they never reach a training.
DROP = {
    "DOPPEL_SERVE__API_KEYS",
    "DOPPEL_SERVE__ADMIN_TOKEN",
    "DOPPEL_SLACK_APP__MODEL_API_KEY",
}


def training_env(environ: Mapping[str, str] | None = None, **overrides: str) -> dict[str, str]:
    """The allowlisted part of `environ` (default: this process's), plus `overrides`."""
    source = os.environ if environ is None else environ
    kept = {
        name: value
        for name, value in source.items()
        if (name in KEEP or name.startswith(KEEP_PREFIXES)) and name not in DROP
    }
    return kept | overrides
