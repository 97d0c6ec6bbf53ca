"""Experiment matrices: a YAML grid of dataset x model x attack x defense x seed, validated
before any work and expanded into :class:`Cell` objects.

Example (every field but ``attacks`` and ``defenses`` is optional)::

    name: quick
    data_root: null            # else --data-root, else $BENCH_DATA_ROOT, else ./data
    output: runs               # the artifact store (results, checkpoints, logs)
    seeds: [0]
    datasets: [digits]         # or {name: cifar10, train_limit: 10000, recipe: {epochs: 15}}
    models: [small_cnn]
    recipe: {epochs: 30, lr: 0.05}   # or {preset: fast, epochs: 12}: a named recipe, fields beside it win;
                                     # precision: auto | fp32 | bf16 (auto: bf16 where native)
    reserve_ratio: 0.05        # clean reserve for defenses that use clean data
    attacks:
      - badnet
      - {name: blend, alpha: 0.2}
      - {name: badnet, sweep: {poison_ratio: [0.0, 0.1]}}   # one entry per value
    defenses: [undefended, {name: my_pkg.my_module:MyDefense, lr: 0.01}]
    evaluate: [natural_backdoor]   # optional extra evaluations of every defended model, e.g.
                                   # [{name: natural_backdoor, budgets: [0.02, 0.06]}]

Any bad value raises :class:`~bench.core.params.ConfigError` whose message names the field
(``attacks[1].alpha``) and what is allowed.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from .core.attack import Attack
from .core.defense import Defense
from .core.params import as_number, build, closest, ConfigError, label, params_of
from .core.registry import ATTACKS, DATASETS, DEFENSES, EVALUATIONS, MODELS, REGISTRIES
from .core.trainer import RECIPE_PRESETS, Recipe, resolve_precision
from .store import digest, sha256_file
from .versions import code_hash, source_files

#: bump when the harness changes how any artifact is computed (2: a training's random streams are
#: derived from its seed by name, no longer the attack's poison draw; see ``Trainer.fit``)
HARNESS_VERSION = 2
#: how the clean reserve is drawn (bump when :func:`bench.runner.clean_reserve` draws differently)
RESERVE_DRAW = 2
#: largest seed accepted (seeds are offset by small constants and fed to torch generators)
MAX_SEED = 2**31 - 1

TOP_LEVEL = {"name", "description", "data_root", "output", "seeds", "datasets", "models", "recipe",
             "reserve_ratio", "attacks", "defenses", "evaluate", "backdoored_models"}
EXTERNAL_FIELDS = {"attack", "seed", "dataset", "model", "weights", "poison_indices"}


@dataclass(frozen=True)
class ExternalBackdoor:
    """A backdoored model trained outside the harness: its weights (a state dict as ``.safetensors``
    or ``.pt``) and the training samples it was poisoned on.  The poisoned set applies the attack's
    trigger to exactly those indices (instead of the attack's seeded draw), and the model replaces
    the undefended training; repair defenses then start from it."""

    weights: str
    weights_sha256: str
    poison_idx: tuple[int, ...]
    cover_idx: tuple[int, ...] = ()

    def ident(self) -> dict:
        idx = hashlib.sha256(repr((self.poison_idx, self.cover_idx)).encode()).hexdigest()[:24]
        return {"poison_indices": idx, "weights_sha256": self.weights_sha256}
DATASET_FIELDS = {"name", "train_limit", "test_limit", "recipe"}


@dataclass(frozen=True)
class DatasetSpec:
    #: the registry key, or the path of an ``.npz`` file
    name: str
    train_limit: int | None = None
    test_limit: int | None = None
    #: SHA-256 of a dataset given as a file (its contents are part of every cache key)
    sha256: str | None = None

    def ident(self) -> dict:
        ident = dataclasses.asdict(self)
        if self.sha256 is None:  # registered datasets keep the keys they always had
            ident.pop("sha256")
        return ident

    @property
    def display(self) -> str:
        """The name in tables and labels: the key, or a file's stem."""
        return Path(self.name).stem if self.name.endswith(".npz") else self.name

    @property
    def label(self) -> str:
        return self.display + (f"[{self.train_limit}]" if self.train_limit else "")


#: the top-level packages of this project (the harness and the packages its registries load
#: components from): their components are versioned by ``version`` and ``bench/versions.json``
#: (checked by a test), so their code stays out of the cache keys
OWN_PACKAGES = tuple(dict.fromkeys(["bench", *(p.split(".")[0] for r in REGISTRIES.values() for p in r.packages)]))


@functools.lru_cache(maxsize=None)
def user_code(obj) -> str | None:
    """For a component from outside this project (``module:Class``, an entry point, a model
    builder of your own): a hash of its code, the syntax tree of its module and of the modules of
    its own package it imports, without docstrings.  It enters the cache keys, so editing your
    component recomputes its results without a ``version`` bump.  None for our own components."""
    module = getattr(obj, "__module__", None) or ""
    if module.split(".")[0] in OWN_PACKAGES or module in ("", "__main__"):
        return None
    files = source_files(obj)
    return code_hash(files) if files else None


@dataclass(frozen=True)
class Entry:
    """Where a cell's attack or defense stands in the matrix: its label in tables and selections
    (the entry's ``label``, else the component's name and its non-default parameters) and its place
    in the YAML (``attacks[2]``), for messages.  The component itself stays pure parameters."""

    label: str
    field: str
    index: int


@dataclass(frozen=True)
class Cell:
    dataset: DatasetSpec
    model: str
    attack: Attack
    defense: Defense
    recipe: Recipe
    seed: int
    reserve_ratio: float
    data_root: str | None = None
    #: extra evaluations of the defended model (``evaluate`` in the matrix), e.g. natural backdoors
    evaluations: tuple = ()
    #: a backdoored model trained elsewhere (``backdoored_models`` in the matrix)
    external: ExternalBackdoor | None = None
    #: the dtype the cell computes in ("fp32" | "bf16"): ``recipe.precision`` resolved for the run's
    #: device (:meth:`Matrix.for_device`); it, not the request, enters the cache keys
    dtype: str | None = None
    #: the matrix entries of the attack and the defense (None: a cell built outside a matrix)
    attack_entry: Entry | None = None
    defense_entry: Entry | None = None

    @property
    def attack_name(self) -> str:
        """The attack's label in tables: the matrix entry's, else its name and non-default parameters."""
        return self.attack_entry.label if self.attack_entry else label(self.attack)

    @property
    def defense_name(self) -> str:
        return self.defense_entry.label if self.defense_entry else label(self.defense)

    @property
    def attack_field(self) -> str:
        """Where the attack stands in the matrix (``attacks[2]``), else its key: for messages."""
        return self.attack_entry.field if self.attack_entry else self.attack.key

    @property
    def run_recipe(self) -> Recipe:
        """The recipe the cell trains with: ``recipe`` with its precision resolved to :attr:`dtype`."""
        return self.recipe.with_(precision=self.dtype)

    # --- identities ---------------------------------------------------------------------------
    def poison_ident(self) -> dict:
        ident = {"harness": HARNESS_VERSION, "dataset": self.dataset.ident(), "seed": self.seed,
                 "attack": self.attack.key, "attack_version": self.attack.version,
                 "attack_params": params_of(self.attack)}
        if user_code(type(self.attack)):  # only for components outside this project: ours keep their keys
            ident["attack_code"] = user_code(type(self.attack))
        if self.external is not None:  # only then, so every other cell keeps its key
            ident["poison_indices"] = self.external.ident()["poison_indices"]
        return ident

    def backdoor_ident(self) -> dict:
        # the defense phases' settings (recipe.tuning) do not change the backdoored model: they key results only
        recipe = {k: v for k, v in self.run_recipe.ident().items() if k != "tuning"}
        ident = {**self.poison_ident(), "model": self.model, "recipe": recipe}
        if user_code(MODELS.get(self.model)):
            ident["model_code"] = user_code(MODELS.get(self.model))
        if self.external is not None:
            ident["external_weights"] = self.external.weights_sha256
        return ident

    def result_ident(self) -> dict:
        ident = {**self.backdoor_ident(), "defense": self.defense.key,
                 "defense_version": self.defense.version, "defense_params": params_of(self.defense)}
        if self.run_recipe.tuning:
            ident["tuning"] = self.run_recipe.ident()["tuning"]
        if user_code(type(self.defense)):
            ident["defense_code"] = user_code(type(self.defense))
        if self.defense.needs().clean_data:
            ident["reserve_ratio"] = self.reserve_ratio
            ident["reserve_draw"] = RESERVE_DRAW
        if self.evaluations:  # only when present, so results without extra evaluations keep their keys
            ident["evaluate"] = [{"name": e.key, "version": e.version, **e.params()} for e in self.evaluations]
        return ident

    @property
    def key(self) -> str:
        """The cell's cache key: its result is ``results/<key>.json`` in the store."""
        return digest(self.result_ident())

    @property
    def backdoor_key(self) -> str:
        """The key of the backdoored model the cell shares with every cell of its poisoned set."""
        return digest(self.backdoor_ident())

    @property
    def label(self) -> str:
        return f"{self.dataset.label}/{self.model}/{self.attack_name}/{self.defense_name}/seed{self.seed}"

    def row(self) -> dict[str, Any]:
        """The cell's parameters, flattened for the results table."""
        return {"dataset": self.dataset.display, "train_limit": self.dataset.train_limit,
                "test_limit": self.dataset.test_limit, "model": self.model,
                "attack": self.attack.key, "defense": self.defense.key, "seed": self.seed,
                "attack_params": params_of(self.attack), "defense_params": params_of(self.defense),
                "recipe": self.recipe.as_dict(),
                "clean_data": self.reserve_ratio if self.defense.needs().clean_data else 0.0,
                "attack_name": self.attack_name, "defense_name": self.defense_name}


@dataclass
class Matrix:
    name: str
    cells: list[Cell]
    output: str = "runs"
    data_root: str | None = None
    description: str = ""

    def for_device(self, device, precision: str | None = None) -> "Matrix":
        """The matrix with every cell's ``recipe.precision`` resolved to the dtype it computes in on
        ``device`` ("auto" becomes "fp32" or "bf16", see :func:`~bench.core.trainer.resolve_precision`),
        after ``precision`` (the ``--precision`` flag) replaced the matrix's where given.  Results
        are keyed by that dtype, so a bf16 result and an fp32 one of the same cell never share a key;
        fp32 results keep the keys they had before precision was a choice."""
        cells = []
        for c in self.cells:
            recipe = c.recipe.with_(precision=precision)
            cells.append(dataclasses.replace(c, recipe=recipe, dtype=resolve_precision(recipe.precision, device)[0]))
        return dataclasses.replace(self, cells=cells)


def _as_list(value, where):
    if isinstance(value, list):
        return value
    if value is None:
        raise ConfigError(f"{where}: missing; give a list")
    return [value]


def _entry(item, where) -> tuple[str, dict]:
    """A component entry: 'key' or {name: key, ...params}."""
    if isinstance(item, str):
        return item, {}
    if isinstance(item, dict):
        if "name" not in item:
            raise ConfigError(f"{where}.name: missing (each entry is a name or a mapping with 'name')")
        if not isinstance(item["name"], str):
            raise ConfigError(f"{where}.name: expected a string, got {item['name']!r}")
        rest = {k: v for k, v in item.items() if k != "name"}
        return item["name"], rest
    raise ConfigError(f"{where}: expected a name or a mapping, got {type(item).__name__} {item!r}")


def _expand_sweep(params: dict, where: str) -> list[dict]:
    sweep = params.pop("sweep", None)
    if sweep is None:
        return [params]
    if not isinstance(sweep, dict) or not sweep:
        raise ConfigError(f"{where}.sweep: expected a mapping of parameter -> list of values")
    keys = list(sweep)
    for k in keys:
        if not isinstance(sweep[k], list) or not sweep[k]:
            raise ConfigError(f"{where}.sweep.{k}: expected a non-empty list of values")
    return [{**params, **dict(zip(keys, combo))} for combo in itertools.product(*(sweep[k] for k in keys))]


def _label(params: dict, where: str) -> str | None:
    """Pop an entry's optional display ``label`` (not a parameter of the component)."""
    tag = params.pop("label", None)
    if tag is not None and not isinstance(tag, str):
        raise ConfigError(f"{where}.label: expected a string, got {tag!r}")
    return tag


def _entry_label(obj, tag: str | None, params: dict, entry: dict) -> str:
    """The entry's label (swept values appended, so the sweep's points stay apart), else the
    component's own."""
    if tag:
        swept = [f"{k}={params[k]}" for k in params if k not in entry]
        return f"{tag}({', '.join(swept)})" if swept else tag
    return label(obj)


def _recipe(base: Recipe, overrides, where: str) -> Recipe:
    if overrides is None:
        return base
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where}: expected a mapping of recipe fields")
    fields = {f.name for f in dataclasses.fields(Recipe)}
    current = dataclasses.asdict(base)
    overrides = dict(overrides)
    preset = overrides.pop("preset", None)
    if preset is not None:  # the preset's fields replace the inherited ones; fields beside it win
        if preset not in RECIPE_PRESETS:
            raise ConfigError(f"{where}.preset: {preset!r} is not a recipe preset; allowed: "
                              f"{', '.join(RECIPE_PRESETS)}{closest(str(preset), RECIPE_PRESETS)}")
        current = dataclasses.asdict(Recipe.preset(preset))
    for k in overrides:
        if k not in fields:
            raise ConfigError(f"{where}.{k}: unknown recipe field{closest(k, fields | {'preset'})}; allowed: "
                              f"{', '.join(sorted(fields | {'preset'}))}")
    tuning = overrides.get("tuning")
    if tuning is not None:  # a defense's own phases: recipe fields again, checked as such
        if not isinstance(tuning, dict):
            raise ConfigError(f"{where}.tuning: expected a mapping of recipe fields (the settings of a "
                              f"defense's own phases), e.g. {{batch_size: 128, momentum: 0.9}}")
        for k in tuning:
            if k not in fields - {"tuning"}:
                raise ConfigError(f"{where}.tuning.{k}: unknown recipe field{closest(str(k), fields)}; allowed: "
                                  f"{', '.join(sorted(fields - {'tuning'}))}")
        build(Recipe, {**current, **overrides, "tuning": None, **tuning}, f"{where}.tuning")
    # type-check through the same machinery as components
    return build(Recipe, {**current, **overrides}, where)


def _check_ratio(value, where):
    number = as_number(value)
    if number is None or not 0 <= number <= 1:
        raise ConfigError(f"{where}: {value!r} must be a number in [0, 1]")
    return float(number)


def parse_matrix(raw: dict, name: str = "matrix") -> Matrix:
    if not isinstance(raw, dict):
        raise ConfigError(f"matrix: expected a mapping at the top level, got {type(raw).__name__}")
    for k in raw:
        if k not in TOP_LEVEL:
            raise ConfigError(f"{k}: unknown field{closest(k, TOP_LEVEL)}; allowed: {', '.join(sorted(TOP_LEVEL))}")
    for k in ("attacks", "defenses"):
        if k not in raw:
            raise ConfigError(f"{k}: missing; give a list of {k}")
    seeds = _seeds(raw.get("seeds", [0]))
    reserve = _check_ratio(raw.get("reserve_ratio", 0.05), "reserve_ratio")
    base_recipe = _recipe(Recipe(), raw.get("recipe"), "recipe")
    for k in ("data_root", "output", "name", "description"):
        if raw.get(k) is not None and not isinstance(raw[k], str):
            raise ConfigError(f"{k}: expected a string, got {raw[k]!r}")
    datasets = _datasets(raw.get("datasets", ["digits"]), base_recipe)
    models = _as_list(raw.get("models", ["small_cnn"]), "models")
    for i, m in enumerate(models):
        MODELS.get(m, f"models[{i}]")
    attacks = _components(raw["attacks"], "attacks", ATTACKS)
    defenses = _components(raw["defenses"], "defenses", DEFENSES)
    evaluations = _evaluations(raw.get("evaluate", []))
    _check_attacks_fit(datasets, attacks)
    for key, items in (("datasets", datasets), ("models", models), ("attacks", attacks), ("defenses", defenses),
                       ("seeds", seeds)):
        if not items:
            raise ConfigError(f"{key}: empty list; a matrix needs at least one entry in each of datasets, "
                              f"models, attacks, defenses and seeds")
    externals = _externals(raw.get("backdoored_models", []), datasets, models, attacks, seeds)
    cells = [Cell(spec, model, attack, defense, recipe, seed, reserve, raw.get("data_root"), tuple(evaluations),
                  externals.get((spec.name, model, a_entry.index, seed)), attack_entry=a_entry, defense_entry=d_entry)
             for (spec, recipe), model, (attack, a_entry), (defense, d_entry), seed
             in itertools.product(datasets, models, attacks, defenses, seeds)]
    # resolved for the default device (CUDA where there is one); a run on another re-resolves
    return Matrix(raw.get("name") or name, cells, raw.get("output") or "runs", raw.get("data_root"),
                  raw.get("description", "")).for_device("cuda" if torch.cuda.is_available() else "cpu")


def _seeds(value) -> list[int]:
    seeds = _as_list(value, "seeds")
    for i, s in enumerate(seeds):
        if not isinstance(s, int) or isinstance(s, bool):
            raise ConfigError(f"seeds[{i}]: expected an integer, got {s!r}")
        if not 0 <= s <= MAX_SEED:
            raise ConfigError(f"seeds[{i}]: {s} is out of range; allowed: 0..{MAX_SEED}")
        if s in seeds[:i]:
            raise ConfigError(f"seeds[{i}]: seed {s} is listed twice")
    return seeds


def _datasets(value, base_recipe: Recipe) -> list[tuple[DatasetSpec, Recipe]]:
    """Each dataset entry with its recipe (the matrix's, the entry's overrides, and the augmentation
    the dataset fills in where both leave it unset: no flips for digits or signs)."""
    datasets = []
    for i, item in enumerate(_as_list(value, "datasets")):
        where = f"datasets[{i}]"
        dname, rest = _entry(item, where)
        source = DATASETS.get(dname, where)
        for k in rest:
            if k not in DATASET_FIELDS:
                raise ConfigError(f"{where}.{k}: unknown field{closest(k, DATASET_FIELDS)}; "
                                  f"allowed: {', '.join(sorted(DATASET_FIELDS))}")
        for k in ("train_limit", "test_limit"):
            v = rest.get(k)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise ConfigError(f"{where}.{k}: expected a positive integer, got {v!r}")
        spec = DatasetSpec(dname, rest.get("train_limit"), rest.get("test_limit"), source.sha256)
        recipe = _recipe(base_recipe, rest.get("recipe"), f"{where}.recipe")
        datasets.append((spec, recipe.filled(**source.augmentation())))
    return datasets


def _components(value, field: str, registry) -> list[tuple[Any, Entry]]:
    """The entries of ``attacks`` or ``defenses``: each component (one per point of a sweep) with
    its :class:`Entry`."""
    out = []
    for i, item in enumerate(_as_list(value, field)):
        where = f"{field}[{i}]"
        key, params = _entry(item, where)
        cls = registry.get(key, where)
        tag = _label(params, where)
        for p in _expand_sweep(params, where):
            component = build(cls, p, where)
            out.append((component, Entry(_entry_label(component, tag, p, params), where, i)))
    return out


def _evaluations(value) -> list:
    evaluations, seen = [], set()
    for i, item in enumerate(_as_list(value, "evaluate")):
        where = f"evaluate[{i}]"
        key, params = _entry(item, where)
        cls = EVALUATIONS.get(key, where)
        if key in seen:
            raise ConfigError(f"{where}: evaluation '{key}' is listed twice")
        seen.add(key)
        evaluations.append(build(cls, params, where))
    return evaluations


def _check_attacks_fit(datasets, attacks) -> None:
    """Class fields and pixel sizes must fit every dataset they meet (``Attack.check``)."""
    for spec, _ in datasets:
        info = DATASETS.get(spec.name)
        for attack, entry in attacks:
            try:
                attack.check(info.size, info.num_classes)
            except ValueError as e:
                raise ConfigError(f"{entry.field}.{e} [dataset '{spec.display}': {info.num_classes} classes, "
                                  f"{info.size}x{info.size} px]") from None


def _read_indices(path: Path, where: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``poison_indices``: JSON, a list of indices or ``{"poison_idx": [...], "cover_idx": [...]}``
    (the harness's own ``poison/<key>/indices.json`` has this form)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where}: cannot read '{path}' as JSON ({' '.join(str(e).split())})") from None
    poison, cover = (data, []) if isinstance(data, list) else (data.get("poison_idx"), data.get("cover_idx", []))
    for name, idx in (("poison_idx", poison), ("cover_idx", cover)):
        if not isinstance(idx, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                for i in idx):
            raise ConfigError(f"{where}: '{path}': {name} must be a list of non-negative integers")
        if len(set(idx)) != len(idx):
            raise ConfigError(f"{where}: '{path}': {name} lists an index twice")
    if set(poison) & set(cover):
        raise ConfigError(f"{where}: '{path}': an index is both poisoned and a cover")
    return tuple(sorted(poison)), tuple(sorted(cover))


def _externals(items, datasets, models, attacks, seeds) -> dict:
    """``backdoored_models`` entries -> {(dataset, model, attack entry, seed): ExternalBackdoor}."""
    out = {}
    for i, item in enumerate(_as_list(items, "backdoored_models")):
        where = f"backdoored_models[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected a mapping with {', '.join(sorted(EXTERNAL_FIELDS))}")
        for k in item:
            if k not in EXTERNAL_FIELDS:
                raise ConfigError(f"{where}.{k}: unknown field{closest(k, EXTERNAL_FIELDS)}; "
                                  f"allowed: {', '.join(sorted(EXTERNAL_FIELDS))}")
        for k in ("attack", "weights", "poison_indices"):
            if k not in item:
                raise ConfigError(f"{where}.{k}: missing")
        entry = item["attack"]
        expanded = [a for a, e in attacks if e.index == entry]
        if not isinstance(entry, int) or not expanded:
            raise ConfigError(f"{where}.attack: expected the index of an entry in attacks (0..{len(attacks) - 1}), "
                              f"got {entry!r}")
        if len(expanded) > 1:
            raise ConfigError(f"{where}.attack: attacks[{entry}] is a sweep; one model fits one attack setting")
        names = {"dataset": [s.name for s, _ in datasets], "model": list(models)}
        picked = {}
        for k, allowed in names.items():
            v = item.get(k, allowed[0] if len(allowed) == 1 else None)
            if v not in allowed:
                raise ConfigError(f"{where}.{k}: {'missing' if v is None else repr(v)}; allowed: {', '.join(allowed)}")
            picked[k] = v
        seed = item.get("seed", seeds[0] if len(seeds) == 1 else None)
        if seed not in seeds:
            raise ConfigError(f"{where}.seed: {'missing' if seed is None else repr(seed)}; allowed: "
                              f"{', '.join(map(str, seeds))}")
        weights = Path(str(item["weights"])).expanduser()
        if not weights.is_file():
            raise ConfigError(f"{where}.weights: '{weights}' does not exist")
        poison, cover = _read_indices(Path(str(item["poison_indices"])).expanduser(), f"{where}.poison_indices")
        key = (picked["dataset"], picked["model"], entry, seed)
        if key in out:
            raise ConfigError(f"{where}: a second model for attacks[{entry}], seed {seed} on {key[0]}/{key[1]}")
        out[key] = ExternalBackdoor(str(weights), sha256_file(weights), poison, cover)
    return out


class MatrixLoader(yaml.SafeLoader):
    """YAML as people write matrices: safe (no tag builds a Python object), ``1e-4`` is a number
    (YAML 1.1 would leave it a string), and a key given twice is an error instead of a silent
    overwrite."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark, f"found the key {key!r} twice",
                        key_node.start_mark)
        return super().construct_mapping(node, deep)


MatrixLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def _yaml_error(path, e: yaml.YAMLError) -> ConfigError:
    """One line: where in the file and what is wrong (PyYAML's own message spans several)."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    problem = " ".join(str(getattr(e, "problem", None) or e).split())
    return ConfigError(f"matrix: '{path}' is not valid YAML{where}: {problem}")


def parse_yaml(text: str, path="matrix"):
    try:
        return yaml.load(text, Loader=MatrixLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        raise _yaml_error(path, e) from None
    except RecursionError:
        raise ConfigError(f"matrix: '{path}' is nested too deeply") from None


_STEP = re.compile(r"([A-Za-z_]\w*)((?:\[\d+\])*)")


def _set_path(path: str) -> list:
    """``defenses[1].lr`` -> ``["defenses", 1, "lr"]``; a malformed path is a :class:`ConfigError`."""
    steps: list = []
    for part in path.split("."):
        m = _STEP.fullmatch(part)
        if not m:
            raise ConfigError(f"--set {path}: '{part}' is not a field name or name[index] "
                              f"(e.g. recipe.epochs=5, defenses[1].lr=0.01)")
        steps.append(m.group(1))
        steps += [int(i) for i in re.findall(r"\[(\d+)\]", m.group(2))]
    return steps


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``--set PATH=VALUE`` overrides to a matrix's parsed YAML.  ``VALUE`` is read as YAML
    (``5``, ``1e-4``, ``[0, 1]``, ``{epochs: 5}``).  An entry written as a bare name
    (``defenses: [abl]``) becomes ``{name: abl, ...}`` when one of its parameters is set.  The
    result goes through the same validation as the file, so a bad field or value gets the same
    message."""
    raw = copy.deepcopy(raw) if isinstance(raw, dict) else raw
    for item in overrides:
        path, sep, text = item.partition("=")
        if not sep or not path:
            raise ConfigError(f"--set {item}: expected PATH=VALUE, e.g. recipe.epochs=5")
        value = parse_yaml(text, f"--set {path}")
        steps = _set_path(path)
        node, where = raw, ""
        for i, step in enumerate(steps):
            last = i == len(steps) - 1
            if isinstance(step, int):
                if not isinstance(node, list) or not -len(node) <= step < len(node):
                    size = len(node) if isinstance(node, list) else 0
                    raise ConfigError(f"--set {path}: {where} has {size} entries; no index {step}")
                if last:
                    node[step] = value
                    break
                if isinstance(node[step], str):  # a bare name: give it parameters
                    node[step] = {"name": node[step]}
                node, where = node[step], f"{where}[{step}]"
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"--set {path}: {where or 'the matrix'} is not a mapping")
            if last:
                node[step] = value
                break
            if node.get(step) is None:
                node[step] = {}
            node, where = node[step], f"{where}.{step}" if where else step
    return raw


def load_matrix(path: str | Path, overrides: list[str] | None = None) -> Matrix:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"matrix: file '{path}' does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"matrix: '{path}' is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"matrix: cannot read '{path}' ({e.strerror or e})") from None
    return parse_matrix(apply_overrides(parse_yaml(text, path), overrides or []), path.stem)
