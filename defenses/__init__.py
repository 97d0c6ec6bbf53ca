"""Backdoor defenses: one module per defense, each a subclass of :class:`bench.core.defense.Defense`
(or :class:`~bench.core.defense.DetectThenRepair`) registered with ``@register_defense("key")``
(from :mod:`bench.core.registry`).  Defenses import only :mod:`bench.core` and their own package."""
