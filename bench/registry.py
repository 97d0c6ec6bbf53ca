"""Registries of attacks and defenses, and validation of their parameters.

Attacks and defenses are dataclasses: every hyperparameter is a field with a documented
default, so a component's parameters are exactly its constructor's arguments.  A matrix names a
component by its registered key (``badnet``), by ``module:Class`` (a researcher's own class in
their own module, no edit of this repository), or by an installed entry point in the groups
``bench.attacks`` / ``bench.defenses``.

Every registered package module is imported on first use (``pkgutil``), so adding a defense is
adding one file to ``defenses/`` with ``@register_defense("key")`` on its class.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import importlib
import math
import pkgutil
import re
import types
import typing
from importlib import metadata


class ConfigError(ValueError):
    """A bad matrix/config value.  The message names the field and what is allowed."""


#: a number as people write it, including the forms YAML 1.1 leaves as strings (``1e-4``, ``5E3``)
NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")


def as_number(value):
    """``value`` as an int or float when it is one or is written as one (``"1e-4"``), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str) and NUMBER.fullmatch(value.strip()):
        text = value.strip()
        return float(text) if any(c in text for c in ".eE") else int(text)
    return None


def closest(name: str, allowed) -> str:
    match = difflib.get_close_matches(str(name), list(allowed), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


class Registered:
    """Base of attacks and defenses: the registry key travels with a pickled instance.

    The registry sets ``cls.key`` when a class is registered.  A worker started with ``spawn``
    (every CUDA worker, and Ray) imports the class afresh when it unpickles a cell; where the class
    is registered somewhere other than its own module (AdvrBD, registered in ``defenses/advrbd.py``,
    or a researcher's ``module:Class``) that import alone leaves ``key`` empty, and the cell's cache
    key would differ from the parent's.  Unpickling restores it.
    """

    key: typing.ClassVar[str] = ""

    def __getstate__(self):
        return {**self.__dict__, "__registry_key__": type(self).key}

    def __setstate__(self, state):
        state = dict(state)
        key = state.pop("__registry_key__", "")
        if key and not type(self).key:
            type(self).key = key
        self.__dict__.update(state)


class Registry:
    def __init__(self, kind: str, package: str, entry_point_group: str):
        self.kind, self.package, self.group = kind, package, entry_point_group
        self._classes: dict[str, type] = {}
        self._loaded = False

    def register(self, key: str):
        def deco(cls):
            if key in self._classes and self._classes[key] is not cls:
                raise ValueError(f"{self.kind} '{key}' registered twice")
            cls.key = key
            self._classes[key] = cls
            return cls

        return deco

    def _load(self):
        if self._loaded:
            return
        self._loaded = True
        pkg = importlib.import_module(self.package)
        for mod in pkgutil.iter_modules(pkg.__path__):
            if not mod.name.startswith("_"):
                importlib.import_module(f"{self.package}.{mod.name}")
        for ep in metadata.entry_points(group=self.group):
            self.register(ep.name)(ep.load())

    def names(self) -> list[str]:
        self._load()
        return sorted(self._classes)

    def items(self):
        self._load()
        return sorted(self._classes.items())

    def get(self, name: str, field: str = None) -> type:
        """Resolve a key or ``module:Class``; raise :class:`ConfigError` naming ``field``."""
        self._load()
        field = field or self.kind
        if name in self._classes:
            return self._classes[name]
        if isinstance(name, str) and ":" in name:
            mod, _, attr = name.partition(":")
            try:
                cls = getattr(importlib.import_module(mod), attr)
            except Exception as e:  # noqa: BLE001 (a user's module may fail in any way on import)
                raise ConfigError(f"{field}: cannot import '{name}' ({type(e).__name__}: "
                                  f"{' '.join(str(e).split())})") from None
            base = importlib.import_module(self.package).BASE
            if not (isinstance(cls, type) and issubclass(cls, base)):
                raise ConfigError(f"{field}: '{name}' is not a subclass of {base.__name__}")
            if not getattr(cls, "key", None) or self._classes.get(cls.key) is not cls:
                cls.key = name
            return cls
        raise ConfigError(f"{field}: unknown {self.kind} '{name}'{closest(name, self._classes)}; "
                          f"allowed: {', '.join(self.names())} or 'module:Class'")


@dataclasses.dataclass(frozen=True)
class Range:
    """The interval a numeric parameter must lie in (``None`` = unbounded on that side)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, v) -> bool:
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        return not (self.high is not None and (v >= self.high if self.high_open else v > self.high))

    def text(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return (f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}")


#: Allowed ranges of numeric parameters, by field name (``fnmatch`` patterns, first match wins),
#: shared by the recipe, every attack, defense and evaluation.  A field can state its own range with
#: ``field(metadata={"range": Range(...)})``, which wins over this table.  Each line is the meaning
#: of the name, not a tuning choice: an lr of 0 trains nothing, a ratio is a share of a set, etc.
RANGES: tuple[tuple[tuple[str, ...], Range], ...] = (
    # at least one pass over the data; a defense's phase lengths may be 0 (the phase is skipped)
    (("epochs",), Range(1)),
    (("*_epochs",), Range(0)),
    # counts of things
    (("batch_size", "*_batch_size", "eval_batch", "eval_size", "per_class", "steps", "restarts", "pgd_steps",
      "rounds", "em_iters", "fct_draws", "prune_step", "calibrate_probe", "pieces", "k", "score_limit", "radius",
      "patch_size"), Range(1)),
    # step sizes and scales that must be positive
    (("lr", "*_lr", "gamma", "eps", "pgd_step_size", "bn_eps", "tol", "outlier_std", "init_std", "ascent_cap",
      "u", "s", "grid_rescale", "frequency", "beta", "scale_min", "scale_max"), Range(0, low_open=True)),
    # shares of a set or of the image, probabilities, opacities, fractions of a schedule
    (("partition_rate", "budgets", "calibrate_candidates"), Range(0, 1, low_open=True)),
    (("betas",), Range(0, 1, high_open=True)),
    (("*ratio", "*_rate", "*fraction", "*_share", "alpha", "alpha_*", "*_alpha", "*_alphas", "p", "*_p",
      "momentum", "*_momentum", "warmup", "milestones", "success", "acc_drop", "identify_min_confidence",
      "translate", "logo_*", "*_range", "delta", "flag_ratio_*"), Range(0, 1)),
    # non-negative amounts, class indices and seeds
    (("weight_decay", "crop_padding", "trigger_seed", "*_seed", "target", "source", "cover_classes",
      "trigger_chunk", "threshold", "*_threshold", "degrees", "*_degrees", "brightness", "contrast", "lam",
      "lambda_*", "penalty", "mad_floor", "ridge", "stop_*", "monitor_from_stage"), Range(0)),
)


def range_of(f: dataclasses.Field) -> Range | None:
    if "range" in f.metadata:
        return f.metadata["range"]
    for patterns, r in RANGES:
        if any(fnmatch.fnmatchcase(f.name, p) for p in patterns):
            return r
    return None


def _check_range(value, r: Range | None, where: str):
    """Every number in ``value`` (a number or a list of them) is finite and in ``r``."""
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_range(v, r, f"{where}[{i}]")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if not math.isfinite(value):
        raise ConfigError(f"{where}: {_show(value)} is not a finite number" + (f"; allowed: {r.text()}" if r else ""))
    if r is not None and value not in r:
        raise ConfigError(f"{where}: {_show(value)} is out of range; allowed: {r.text()}")


def _show(value, limit: int = 60) -> str:
    """``repr`` of a user's value, cut short so that a message stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + "..." + text[-2:]


def _check_type(value, hint, where: str):
    """Check (and lightly coerce) one YAML value against a dataclass field's type hint."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for h in typing.get_args(hint):
            try:
                return _check_type(value, h, where)
            except ConfigError as e:
                errors.append(e)
        raise errors[-1]
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {_show(value)}")
    if hint is typing.Any:
        return value
    if origin is typing.Literal:
        allowed = typing.get_args(hint)
        if any(value == a and type(value) is type(a) for a in allowed):
            return value
        raise ConfigError(f"{where}: {_show(value)} is not one of {', '.join(repr(a) for a in allowed)}")
    if origin in (tuple, list) or hint in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {_show(value)}")
        args = typing.get_args(hint)
        if args and args[-1] is not Ellipsis and origin is tuple and len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        item = args[0] if args else typing.Any
        value = [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(value) if (origin or hint) is tuple else value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {_show(value)}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {_show(value)}")
    if hint is float:
        number = as_number(value)
        if number is not None:
            return float(number)
        raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {_show(value)}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {_show(value)}")
    if origin is dict or hint is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def build(cls: type, params: dict, where: str):
    """Instantiate a dataclass component from YAML params, naming any bad field."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    clean = {}
    for name, value in params.items():
        if name not in fields:
            raise ConfigError(f"{where}.{name}: unknown parameter of {cls.__name__}{closest(name, fields)}; "
                              f"allowed: {', '.join(fields) or '(none)'}")
        clean[name] = _check_type(value, hints.get(name, typing.Any), f"{where}.{name}")
        _check_range(clean[name], range_of(fields[name]), f"{where}.{name}")
    try:
        return cls(**clean)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        # a component's own check names its field ("style: 'x' is not one of ..."); one line
        raise ConfigError(f"{where}: {' '.join(str(e).split())}") from None


def params_of(obj) -> dict:
    """A component's parameters as plain JSON-able values."""
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def label(obj) -> str:
    """Display name plus the parameters that differ from the class defaults: ``BadNet(poison_ratio=0.1)``.

    A matrix entry's ``label`` field replaces it (it is not a parameter and does not affect caching)."""
    if getattr(obj, "matrix_label", None):
        return obj.matrix_label
    name = getattr(obj, "display_name", "") or obj.key
    default = {}
    for f in dataclasses.fields(obj):
        if f.default is not dataclasses.MISSING:
            default[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default[f.name] = f.default_factory()
    diff = [f"{k}={v}" for k, v in params_of(obj).items()
            if k in default and (list(default[k]) if isinstance(default[k], tuple) else default[k]) != v]
    return f"{name}({', '.join(diff)})" if diff else name


def field_docs(cls) -> dict[str, str]:
    """The ``#:`` comment lines above each dataclass field of ``cls`` (and its bases), joined."""
    import inspect
    import re

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        pending: list[str] = []
        for line in lines:
            stripped = line.strip()
            if stripped.startswith("#:"):
                pending.append(stripped[2:].strip())
                continue
            m = re.match(r"([A-Za-z_]\w*)\s*:", stripped)
            if m and pending:
                docs[m.group(1)] = " ".join(pending)
            pending = []
    return docs


def describe(cls) -> str:
    """First line of the class docstring."""
    doc = (cls.__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""
