"""Backdoor defenses.  One module per defense; each registers its class with ``@register_defense``."""
from bench.registry import Registry

from .base import Defense, DefenseContext, Outcome

DEFENSES = Registry("defense", "defenses", "bench.defenses")
register_defense = DEFENSES.register
BASE = Defense

__all__ = ["DEFENSES", "Defense", "DefenseContext", "Outcome", "register_defense"]
