"""Component parameters: how a matrix's values are checked and shown.

* :class:`ConfigError`: a bad matrix or config value, whose message names the field and what is
  allowed;
* :func:`build`: a dataclass component from YAML parameters, each checked against its field's type
  (``Literal`` choices included) and allowed range (:class:`Range`, :data:`RANGES`);
* :func:`check_choices`: the ``Literal`` check components run on construction;
* :func:`params_of`, :func:`label`: a component's parameters as plain values and its display label;
* :func:`field_docs`, :func:`describe`: the documentation written beside fields and classes.

A leaf: it imports nothing of the harness.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import inspect
import math
import re
import types
import typing


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
      "u", "s", "grid_rescale", "frequency", "beta", "scale_min", "scale_max", "*_passes"), Range(0, low_open=True)),
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


def _has_literal(hint) -> bool:
    return typing.get_origin(hint) is typing.Literal or any(_has_literal(h) for h in typing.get_args(hint))


def check_choices(obj, where: str = "") -> None:
    """Raise :class:`ConfigError` (``"<field>: 'x' is not one of ..."``) for a field typed with a
    ``Literal`` whose value is not one of its choices.  Components check this on construction, so
    the choices are written once, in the type."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        hint = hints.get(f.name)
        if hint is not None and _has_literal(hint):
            _check_type(getattr(obj, f.name), hint, f"{where}{f.name}")


def check_ranges(obj, where: str = "") -> None:
    """Raise :class:`ConfigError` (``"<field>: 1.5 is out of range; allowed: [0, 1]"``) for a numeric
    field outside its range (:func:`range_of`).  Components check this on construction, so a range
    is written once: in the field's metadata, else in :data:`RANGES`."""
    for f in dataclasses.fields(obj):
        _check_range(getattr(obj, f.name), range_of(f), f"{where}{f.name}")


def check_params(obj, where: str = "") -> None:
    """Every field of a component within its choices and its range."""
    check_choices(obj, where)
    check_ranges(obj, where)


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
    """A component's parameters as plain JSON-able values.  A field the class lists in its
    ``LATER_FIELDS`` (name -> the value that reproduces the behaviour from before the field existed)
    is left out at that value, so that adding a parameter keeps the cache keys of earlier results."""
    out = {}
    later = getattr(type(obj), "LATER_FIELDS", {})
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if f.name in later and v == later[f.name]:
            continue
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def label(obj) -> str:
    """Display name plus the parameters that differ from the class defaults: ``BadNet(poison_ratio=0.1)``
    (a matrix entry's own ``label`` replaces it there: see ``bench.matrix.Entry``)."""
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
    """The first paragraph of the docstring, on one line."""
    doc = (cls.__doc__ or "").strip()
    return " ".join(doc.split("\n\n")[0].split()) if doc else ""
