"""The promotion gate: a new adapter replaces production only when it is clearly better,
and only when serving can serve it."""

from __future__ import annotations

from dataclasses import dataclass

from doppel.train.config import GateConfig


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


@dataclass(frozen=True)
class Bases:
    """Which base model each side needs (their PersonaCards' `base_model`), and the one
    serving runs (`serve.base_model`). Adapters only compare, and only serve, on their own."""

    candidate: str
    served: str
    production: str | None = None  # None: there is no production version


def decide(
    metrics: dict[str, float],
    production: str | None,
    gate: GateConfig,
    bases: Bases,
    precision: str,
) -> Decision:
    """Compare validation NLL with production's, or with the base model's when there is no
    production on the candidate's base; refuse a candidate that serving would not serve."""
    loss = metrics["eval_loss"]
    if production is not None and bases.production == bases.candidate:
        baseline, against = metrics["production_eval_loss"], f"production v{production}"
    else:
        baseline, against = metrics["base_eval_loss"], "the base model"
    improvement = (baseline - loss) / baseline
    verdict = (
        f"eval_loss {loss:.4f} vs {baseline:.4f} for {against}, in {precision}: "
        f"{improvement:+.1%} (needs {gate.min_improvement:.1%})"
    )
    if production is not None and bases.production != bases.candidate:
        verdict += (
            f"; production v{production} was trained on {bases.production}, not "
            f"{bases.candidate}, so it was compared with the base model instead"
        )
    if bases.candidate != bases.served:
        return Decision(
            False,
            f"not promotable: trained on {bases.candidate}, but serving serves {bases.served} "
            f"(serve.base_model); {verdict}",
        )
    return Decision(improvement >= gate.min_improvement, verdict)
