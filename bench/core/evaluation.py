"""The :class:`Evaluation` base class: a further measurement of every defended model, requested by
a matrix's ``evaluate`` list (e.g. ``natural_backdoor``).

An evaluation is a dataclass whose fields are its parameters, with one method::

    def evaluate(self, model, test: ImageSet, num_classes: int, trainer: Trainer, seed: int) -> result

whose result has a ``summary()`` giving the JSON-able record stored under the evaluation's key in
the cell's result.  It sees the clean test set only.  Forward passes run under
``trainer.autocast()`` so that the evaluation computes in the cell's precision.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .params import params_of
from .registry import Registered


#: a summary of per-label inverted triggers: ``budgets``, ``asr_max`` (per budget), ``asr_max_label``,
#: ``anomaly_max`` and ``flagged`` (the natural-backdoor evaluation's)
INVERTED_TRIGGERS = "inverted_triggers"


@dataclass(frozen=True)
class Evaluation(Registered):
    """Base class of all evaluations."""

    key: ClassVar[str] = ""
    kind: ClassVar[str] = "evaluation"
    #: bump when the evaluation's output changes, so cached results are recomputed
    version: ClassVar[int] = 1
    #: the shape of its ``summary()`` the report knows how to tabulate ("" : none; see
    #: :data:`INVERTED_TRIGGERS`)
    summary_kind: ClassVar[str] = ""

    def params(self) -> dict:
        return params_of(self)

    def evaluate(self, model, test, num_classes: int, trainer, seed: int = 0):
        raise NotImplementedError
