"""The promotion gate: a new adapter replaces production only when it is clearly better."""

from __future__ import annotations

from dataclasses import dataclass

from doppel.train.config import GateConfig


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def decide(metrics: dict[str, float], production: str | None, gate: GateConfig) -> Decision:
    """Compare validation NLL with production's, or with the base model's when there is none."""
    loss = metrics["eval_loss"]
    if production is not None:
        baseline, against = metrics["production_eval_loss"], f"production v{production}"
    else:
        baseline, against = metrics["base_eval_loss"], "the base model"
    improvement = (baseline - loss) / baseline
    verdict = (
        f"eval_loss {loss:.4f} vs {baseline:.4f} for {against}: "
        f"{improvement:+.1%} (needs {gate.min_improvement:.1%})"
    )
    return Decision(improvement >= gate.min_improvement, verdict)
