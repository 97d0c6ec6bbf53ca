"""The undefended baseline: the model trained normally on the poisoned set."""
from __future__ import annotations

from dataclasses import dataclass

from . import register_defense
from .base import Defense, DefenseContext, Outcome


@register_defense("undefended")
@dataclass
class Undefended(Defense):
    """No defense: the backdoored model as trained on the poisoned set."""

    needs_backdoored_model = True
    trains = False
    display_name = "No Defense"

    def run(self, ctx: DefenseContext) -> Outcome:
        return Outcome(ctx.backdoored_model())
