"""Further evaluations of a defended model, requested by a matrix's ``evaluate`` list: one module
per evaluation, each a subclass of :class:`bench.core.evaluation.Evaluation` registered with
``@register_evaluation("key")``.  Evaluations import only :mod:`bench.core` and their own package."""
