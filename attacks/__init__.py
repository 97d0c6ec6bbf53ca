"""Backdoor attacks.  One module per attack; each registers its class with ``@register_attack``."""
from bench.registry import Registry

from .base import Attack, PoisonedSet, TriggeredTest

ATTACKS = Registry("attack", "attacks", "bench.attacks")
register_attack = ATTACKS.register
BASE = Attack

__all__ = ["ATTACKS", "Attack", "PoisonedSet", "TriggeredTest", "register_attack"]
