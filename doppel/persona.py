"""The persona card: what serving needs to know about an adapter, shipped inside it.

Training writes `doppel_persona.json` next to the PEFT weights, so an adapter pulled from
MLflow carries the exact system prompt it was trained with and the base model it needs.
Serving never re-derives them from settings that may have changed since.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from doppel.errors import DoppelError

PERSONA_FILE = "doppel_persona.json"


@dataclass(frozen=True)
class PersonaCard:
    workspace_id: str
    user_id: str
    system_prompt: str
    base_model: str  # the recipe's `base_model` spec, e.g. smollm2-135m-instruct

    def write(self, adapter_dir: Path) -> None:
        (adapter_dir / PERSONA_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def read(cls, adapter_dir: Path) -> PersonaCard:
        path = adapter_dir / PERSONA_FILE
        try:
            card = json.loads(path.read_text())
        except FileNotFoundError:
            raise DoppelError(
                f"the adapter at {adapter_dir} has no {PERSONA_FILE}",
                "it predates serving support: retrain it (doppel pipeline --user USER)",
            ) from None
        if "team_id" in card:  # cards written before the field was named workspace_id
            card["workspace_id"] = card.pop("team_id")
        return cls(**card)
