"""Registers AdvrBD (the method lives in the ``advrbd`` package)."""
from advrbd.defense import AdvrBD as _AdvrBD

from . import register_defense

AdvrBD = register_defense("advrbd")(_AdvrBD)

__all__ = ["AdvrBD"]
