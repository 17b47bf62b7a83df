"""Many people with real adapters, fast: for the scale tests and the serving benchmark.

Each person gets a real PEFT LoRA adapter on the served base model, with random non-zero
weights (what serving measures does not depend on what was learned) and its persona card,
logged to an MLflow run of its own tagged with the person, registered as
`doppel.<workspace_id>.<user_id>` and aliased `production`, as the gate leaves it; and
the person's consent. People already registered are left as they are, so a second call
with a larger count only adds the newcomers.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from doppel.config import Settings
from doppel.consent import grant
from doppel.persona import PersonaCard
from doppel.progress import console
from doppel.registry import ADAPTER_ARTIFACT, PRODUCTION, Registry, model_name
from doppel.store.database import database
from doppel.train.base_model import resolve_base_model


def user_ids(count: int) -> list[str]:
    """Slack-like user ids that sort in the order they were made."""
    return [f"U{index:07d}" for index in range(count)]


class AdapterMaker:
    """The served base model under one LoRA shape, written out with new weights each time."""

    def __init__(self, settings: Settings, rank: int, target_modules: str | list[str]) -> None:
        self.settings = settings
        base = resolve_base_model(settings.serve.base_model, settings.models_dir)
        lora = LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            target_modules=target_modules,
            init_lora_weights="gaussian",  # non-zero B: each adapter really changes the output
        )
        self.model: PeftModel = get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora)
        self.registry = Registry(settings)
        self._experiments: dict[str, str] = {}

    def write(self, folder: Path, workspace_id: str, user_id: str, seed: int) -> Path:
        """An adapter folder with weights drawn from `seed`, and its persona card."""
        torch.manual_seed(seed)
        with torch.no_grad():
            for name, weight in self.model.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(weight, std=0.02)
        self.model.save_pretrained(str(folder))
        prompt = f"You are {user_id}. Reply the way they would."
        PersonaCard(workspace_id, user_id, prompt, self.settings.serve.base_model).write(folder)
        return folder

    def publish(self, workspace_id: str, user_id: str, seed: int) -> str:
        """A new version of the person's model, from a run of its own, in production."""
        with tempfile.TemporaryDirectory(prefix="doppel-adapter-") as scratch:
            folder = self.write(Path(scratch) / ADAPTER_ARTIFACT, workspace_id, user_id, seed)
            person = {"workspace_id": workspace_id, "user_id": user_id}
            if workspace_id not in self._experiments:
                self._experiments[workspace_id] = self.registry.experiment_id(workspace_id)
            experiment = self._experiments[workspace_id]
            with mlflow.start_run(experiment_id=experiment, tags=person) as run:
                mlflow.log_artifacts(str(folder), ADAPTER_ARTIFACT)
        version = self.registry.register(
            workspace_id, user_id, run.info.run_id, tags={"made_by": "devtools.adapters"}
        )
        name = model_name(workspace_id, user_id)
        self.registry.client.set_registered_model_alias(name, PRODUCTION, version)
        return version


def register_adapters(
    settings: Settings,
    workspace_id: str,
    count: int,
    rank: int = 16,
    target_modules: str | list[str] = "all-linear",
) -> list[str]:
    """`count` consenting people of `workspace_id`, each with an adapter in production;
    returns their model ids ("<workspace_id>/<user_id>"), in order. The recipe's shape
    (rank 16 on every linear layer) is the default; rank 1 on one module is the fastest."""
    users = user_ids(count)
    with database(settings.db_url).transaction() as session:
        for user_id in users:
            grant(session, workspace_id, user_id, "devtools.adapters")
    maker = AdapterMaker(settings, rank, target_modules)
    registered = {model.name for model in maker.registry.registered_models(workspace_id)}
    missing = [user for user in users if model_name(workspace_id, user) not in registered]
    for done, user_id in enumerate(missing, 1):
        maker.publish(workspace_id, user_id, seed=users.index(user_id))
        if done % 100 == 0:
            console.print(f"registered {done} of {len(missing)} adapters")
    return [f"{workspace_id}/{user_id}" for user_id in users]
