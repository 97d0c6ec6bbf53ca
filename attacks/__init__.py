"""Backdoor attacks: one module per attack, each a subclass of :class:`bench.core.attack.Attack`
registered with ``@register_attack("key")`` (from :mod:`bench.core.registry`).  Attacks import
only :mod:`bench.core` and their own package."""
