"""The undefended baseline: the model trained normally on the poisoned set."""
from __future__ import annotations

from dataclasses import dataclass

from bench.core.defense import Defense, DefenseContext, Needs, Outcome
from bench.core.registry import register_defense


@register_defense("undefended")
@dataclass
class Undefended(Defense):
    """No defense: the backdoored model as trained on the poisoned set."""

    display_name = "No Defense"
    is_baseline = True

    def needs(self) -> Needs:
        return Needs(backdoored_model=True, training=False)

    def run(self, ctx: DefenseContext) -> Outcome:
        return Outcome(ctx.backdoored_model())
