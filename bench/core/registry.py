"""One registry for every kind of component (parameters are checked in :mod:`bench.core.params`).

Five registries: attacks, defenses, evaluations (dataclasses: every hyperparameter is a field
with a documented default, so a component's parameters are exactly its constructor's
arguments), datasets and models.  A matrix names a component by its registered key
(``badnet``), by ``module:Name`` (a researcher's own component in their own module, no edit of
this repository), or by an installed entry point in the group ``bench.<kind>s``
(``bench.attacks``, ``bench.defenses``, ``bench.evaluations``, ``bench.datasets``,
``bench.models``).  A dataset may also be a path to an ``.npz`` file.

Every module of a component package is imported on first use (``pkgutil``), so adding a defense
is adding one file to ``defenses/`` with ``@register_defense("key")`` on its class.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import typing
from importlib import metadata

from .params import ConfigError, _show, check_params, closest, describe


class Registered:
    """Base of the dataclass components (attacks, defenses, evaluations).

    The registry sets ``cls.key``.  A component pickles as data: its registry kind, key and
    parameters (plus any attribute it set on itself).  Unpickling, in a worker
    started with ``spawn`` (CUDA workers, Ray, SLURM), resolves the key through the registry and
    rebuilds the instance, so a class registered outside its own module or given as
    ``module:Class`` arrives with the same key, and so the same cache key, as in the parent.
    """

    key: typing.ClassVar[str] = ""
    #: the registry this kind of component lives in ("attack", "defense", "evaluation")
    kind: typing.ClassVar[str] = ""

    def __post_init__(self):
        check_params(self)

    def __reduce__(self):
        names = {f.name for f in dataclasses.fields(self)}
        params = {k: v for k, v in self.__dict__.items() if k in names}
        extra = {k: v for k, v in self.__dict__.items() if k not in names}
        return _rebuild, (self.kind, type(self).key, params), extra or None


def _rebuild(kind: str, key: str, params: dict):
    cls = REGISTRIES[kind].get(key)
    obj = cls.__new__(cls)
    obj.__dict__.update(params)  # the values were validated when the matrix was read
    return obj


class Registry:
    """Named components of one kind: ``register`` them, ``get`` them by key.

    A key is a registered name (``badnet``), ``module:Name`` (an object in any importable module,
    checked with ``check``), or an installed entry point of the group ``bench.<kind>s``.  The
    modules of ``packages`` are imported on first use, so adding a component is adding a file
    with ``@register_<kind>("key")`` on it.  ``resolve`` handles any other form of key (datasets
    accept a path to an ``.npz`` file).
    """

    def __init__(self, kind: str, packages: tuple[str, ...], check: typing.Callable[[object], str | None] = None,
                 resolve: typing.Callable[[str], object] | None = None, allowed_extra: str = "'module:Name'"):
        self.kind, self.packages, self.group = kind, packages, f"bench.{kind}s"
        self.check, self.resolve, self.allowed_extra = check, resolve, allowed_extra
        self._entries: dict[str, object] = {}
        self._descriptions: dict[str, str] = {}
        self._loaded = False

    def configure(self, check: typing.Callable[[object], str | None],
                  resolve: typing.Callable[[str, str], object] | None = None) -> None:
        """Set the check of ``module:Name`` entries and the resolver of other forms of key, from the
        module that defines what this kind is (datasets: :mod:`bench.core.data`)."""
        self.check, self.resolve = check, resolve

    def register(self, key: str, description: str | None = None):
        def deco(obj):
            if key in self._entries and self._entries[key] is not obj:
                raise ValueError(f"{self.kind} '{key}' registered twice")
            try:
                obj.key = key
            except (AttributeError, TypeError):  # a frozen object: its key is the registry's
                pass
            self._entries[key] = obj
            if description is not None:
                self._descriptions[key] = description
            return obj

        return deco

    def _load(self):
        if self._loaded:
            return
        self._loaded = True
        for package in self.packages:
            pkg = importlib.import_module(package)
            for mod in pkgutil.iter_modules(getattr(pkg, "__path__", [])):
                if not mod.name.startswith("_"):
                    importlib.import_module(f"{package}.{mod.name}")
        for ep in metadata.entry_points(group=self.group):
            self.register(ep.name)(ep.load())

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def items(self):
        self._load()
        return sorted(self._entries.items())

    def __iter__(self):
        return iter(self.names())

    def __contains__(self, key) -> bool:
        self._load()
        return key in self._entries

    def describe(self, key: str) -> str:
        """A one-line description: the one given at registration or the entry's own ``description``,
        else its docstring's first line."""
        self._load()
        obj = self._entries[key]
        return self._descriptions.get(key) or getattr(obj, "description", None) or describe(obj)

    def get(self, name: str, field: str = None):
        """Resolve a key, ``module:Name`` or a form ``resolve`` accepts; raise :class:`ConfigError`
        naming ``field``."""
        self._load()
        field = field or self.kind
        if not isinstance(name, str):
            raise ConfigError(f"{field}: expected a {self.kind} name, got {type(name).__name__} {_show(name)}; "
                              f"allowed: {', '.join(self.names())} or {self.allowed_extra}")
        if name in self._entries:
            return self._entries[name]
        if self.resolve is not None:
            obj = self.resolve(name, field)
            if obj is not None:
                return obj
        if ":" in name:
            mod, _, attr = name.partition(":")
            try:
                obj = getattr(importlib.import_module(mod), attr)
            except Exception as e:  # noqa: BLE001 (a user's module may fail in any way on import)
                raise ConfigError(f"{field}: cannot import '{name}' ({type(e).__name__}: "
                                  f"{' '.join(str(e).split())})") from None
            problem = self.check(obj)
            if problem:
                raise ConfigError(f"{field}: '{name}' {problem}")
            if self._entries.get(getattr(obj, "key", None)) is not obj:
                try:  # its key is the name it was given by (not listed: names() are the registered ones)
                    obj.key = name
                except (AttributeError, TypeError):
                    pass
            return obj
        raise ConfigError(f"{field}: unknown {self.kind} '{name}'{closest(name, self._entries)}; "
                          f"allowed: {', '.join(self.names())} or {self.allowed_extra}")


def _component_of(kind: str, base: str):
    """A ``check`` for class components: ``obj`` must be a component class of this ``kind`` (a
    subclass of the base class ``base`` names, which declares the kind; the registry imports none)."""

    def check(obj) -> str | None:
        if not (isinstance(obj, type) and issubclass(obj, Registered) and obj.kind == kind):
            return f"is not a subclass of {base}"
        return None

    return check


def _model_check(obj) -> str | None:
    return None if callable(obj) else "is not callable (a model builder takes in_channels, num_classes, mean, std, image_size)"


#: One registry per kind of component.  Attacks, defenses and evaluations are dataclasses;
#: datasets are :class:`~bench.core.data.DatasetSource` objects; models are builder functions.
ATTACKS = Registry("attack", ("attacks",), _component_of("attack", "Attack"), allowed_extra="'module:Class'")
DEFENSES = Registry("defense", ("defenses", "advrbd"), _component_of("defense", "Defense"),
                    allowed_extra="'module:Class'")
EVALUATIONS = Registry("evaluation", ("evaluations",), _component_of("evaluation", "Evaluation"),
                       allowed_extra="'module:Class'")
#: its check and its reader of ``.npz`` paths are set by :mod:`bench.core.data` (imported on first use)
DATASETS = Registry("dataset", ("bench.core.data",), allowed_extra="'module:Name' or a path to an .npz file")
MODELS = Registry("model", ("bench.core.models", "bench.core.fastnet"), _model_check)
REGISTRIES = {r.kind: r for r in (ATTACKS, DEFENSES, EVALUATIONS, DATASETS, MODELS)}

register_attack = ATTACKS.register
register_defense = DEFENSES.register
register_evaluation = EVALUATIONS.register
register_dataset = DATASETS.register
register_model = MODELS.register
