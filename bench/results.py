"""Results as a pandas DataFrame: one row per finished cell, every parameter a column.

    from bench.results import load
    df = load("matrices/quick.yaml")               # the matrix's cells, from its store
    df = load("runs")                              # every verified result in a store
    df.pivot_table(index="attack_name", columns="defense_name", values=["acc", "asr"])

Columns (``NaN`` where a cell has no such value):

* identity: ``dataset, train_limit, test_limit, model, attack, attack_name, defense, defense_name,
  seed, key`` (``*_name`` are the matrix's labels; ``key`` names the result file);
* parameters: ``attack.<field>``, ``defense.<field>``, ``recipe.<field>`` (lists as JSON text);
* metrics of the defended model: ``acc, acc_nontarget, target_recall, asr, ra`` (fractions, not %),
  ``train_acc`` (the chance guard's probe);
* the undefended model on the same poisoned set: ``undefended.acc, undefended.acc_nontarget,
  undefended.asr, undefended.ra`` (from the backdoored model a repair defense started from, or the
  matrix's undefended cell);
* ``der, rir``: BackdoorBench's ratings against that undefended model (:mod:`bench.core.metrics`);
* detection: ``tpr, fpr, precision, flagged``; further models: ``<name>.acc, <name>.asr`` (e.g. ``relearn``);
* natural backdoors: ``natural.asr@<budget>`` and ``natural.anomaly``;
* cost and setting: ``wall_time_s, epoch_equivalents, clean_data, n_train, n_poison, n_cover``,
  ``numerics.device, numerics.dtype, numerics.threads, numerics.torch``;
* ``warnings``: the cell's warnings joined by "; " (empty when none).

The report's ``results.csv``, ``results.jsonl`` and (with pyarrow) ``results.parquet`` are this frame.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .core.evaluation import INVERTED_TRIGGERS
from .core.metrics import der, rir
from .core.params import ConfigError
from .core.registry import DEFENSES, EVALUATIONS
from .matrix import Matrix, load_matrix
from .store import Store

METRICS = ("acc", "acc_nontarget", "target_recall", "asr", "ra")
#: the columns that identify a poisoned set and its training: an undefended cell matching on all
#: of them is the baseline of a defended one
POISON_COLUMNS = ("dataset", "train_limit", "test_limit", "model", "attack", "seed")


def defense_class(key: str):
    """The registered class of a stored result's defense key, or None (a user's component that no
    longer imports)."""
    try:
        return DEFENSES.get(key)
    except ConfigError:
        return None


def is_baseline(row: dict) -> bool:
    """Whether the row is the undefended baseline's (the component says so: ``Defense.is_baseline``)."""
    return bool(getattr(defense_class(row.get("defense")), "is_baseline", False))


def is_reference_method(row: dict) -> bool:
    """Whether the row is the studied method's (``Defense.is_reference_method``)."""
    return bool(getattr(defense_class(row.get("defense")), "is_reference_method", False))


def evaluation_keys(summary_kind: str) -> list[str]:
    """The keys under which results store the summaries of every evaluation of this kind."""
    return [key for key, cls in EVALUATIONS.items() if getattr(cls, "summary_kind", "") == summary_kind]


def inverted_triggers(row: dict) -> dict:
    """The row's inverted-trigger summary (an evaluation of kind INVERTED_TRIGGERS), or {}."""
    return next((row[k] for k in evaluation_keys(INVERTED_TRIGGERS) if row.get(k)), {})


def _scalar(v):
    """Parameters as column values: lists and mappings as JSON text (one type per column)."""
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, sort_keys=True)
    return v


def flatten(row: dict) -> dict:
    """One result (as stored, plus the matrix's labels) as one flat record."""
    out = {k: row.get(k) for k in ("dataset", "train_limit", "model", "attack", "attack_name", "defense",
                                   "defense_name", "seed", "key")}
    out["test_limit"] = row.get("test_limit")
    for group in ("attack", "defense"):
        for k, v in (row.get(f"{group}_params") or {}).items():
            out[f"{group}.{k}"] = _scalar(v)
    for k, v in (row.get("recipe") or {}).items():
        out[f"recipe.{k}"] = _scalar(v)
    for k in METRICS:
        out[k] = row.get(k)
    out["train_acc"] = (row.get("train_acc") or {}).get("defended")
    for k in METRICS:
        out[f"undefended.{k}"] = (row.get("backdoor") or {}).get(k)
    for k in ("tpr", "fpr", "precision", "flagged"):
        out[k] = (row.get("detection") or {}).get(k)
    for name, ev in (row.get("extra") or {}).items():
        for k in ("acc", "acc_nontarget", "asr"):
            out[f"{name}.{k}"] = ev.get(k)
    nat = inverted_triggers(row)
    for b, asr in zip(nat.get("budgets", []), nat.get("asr_max", [])):
        out[f"natural.asr@{b:g}"] = asr
    if nat:
        out["natural.anomaly"] = nat.get("anomaly_max")
    for k in ("wall_time_s", "epoch_equivalents", "clean_data", "n_train", "n_poison", "n_cover"):
        out[k] = row.get(k)
    for k, v in (row.get("numerics") or {}).items():
        out[f"numerics.{k}"] = v
    out["warnings"] = "; ".join(str(w) for w in row.get("warnings") or [])
    return out


def frame(rows: list[dict]) -> pd.DataFrame:
    """The DataFrame of stored results; fills ``undefended.*`` from the matching undefended cell
    where the defense did not start from the backdoored model."""
    df = pd.DataFrame([flatten(r) for r in rows])
    if df.empty:
        return df
    for k in METRICS:
        df[f"undefended.{k}"] = pd.to_numeric(df[f"undefended.{k}"], errors="coerce")
    attack_params = sorted(c for c in df.columns if c.startswith(("attack.", "recipe.")))
    match = [c for c in (*POISON_COLUMNS, *attack_params) if c in df.columns]
    base = df[[bool(getattr(defense_class(k), "is_baseline", False)) for k in df["defense"]]]
    if len(base):
        _fill_undefended(df, base, match)
        # results stored before the test slice was recorded: match them on everything else
        loose = [c for c in match if c != "test_limit"]
        if len(loose) < len(match):
            _fill_undefended(df, base, loose, only=df["test_limit"].isna(), among=base["test_limit"].notna())
            _fill_undefended(df, base, loose, only=df["test_limit"].notna(), among=base["test_limit"].isna())
    _ratings(df)
    return df


def _fill_undefended(df: pd.DataFrame, base: pd.DataFrame, match: list[str], only=None, among=None) -> None:
    """Fill missing ``undefended.*`` of ``df`` (rows in ``only``) from the undefended rows in ``base``
    (those in ``among``) that agree on every column of ``match``."""
    if among is not None:
        base = base[among]
    if base.empty:
        return
    keyed = base[match + list(METRICS)].astype({c: str for c in match}).drop_duplicates(match)
    keyed = keyed.rename(columns={k: f"_u.{k}" for k in METRICS})
    merged = df.astype({c: str for c in match})[match].merge(keyed, on=match, how="left")
    for k in METRICS:
        fill = pd.Series(pd.to_numeric(merged[f"_u.{k}"], errors="coerce").to_numpy(), index=df.index)
        if only is not None:
            fill = fill.where(only)
        df[f"undefended.{k}"] = df[f"undefended.{k}"].fillna(fill)


def _ratings(df: pd.DataFrame) -> None:
    def rate(fn, a, b, c, d):
        return [fn(*v) if not any(pd.isna(x) for x in v) else float("nan")
                for v in zip(df[a], df[b], df[c], df[d])]

    df["der"] = rate(der, "undefended.acc", "undefended.asr", "acc", "asr")
    df["rir"] = rate(rir, "undefended.acc", "undefended.ra", "acc", "ra")


def collect(matrix, store) -> tuple[list[dict], list[str]]:
    """The verified results of ``matrix``'s cells in ``store``, each with the matrix's names for its
    attack and defense (labels include non-default parameters), and the labels of the cells
    without a result."""
    rows, missing = [], []
    for cell in matrix.cells:
        result = store.read_result(cell.key)
        if result is None:
            missing.append(cell.label)
        else:
            rows.append({**result.row, **{k: v for k, v in cell.row().items() if k in ("attack_name", "defense_name")},
                         "attack_display": cell.attack.display_name or cell.attack.key,
                         "defense_display": cell.defense.display_name or cell.defense.key})
    return rows, missing


def load(source, output: str | Path | None = None) -> pd.DataFrame:
    """Results as a DataFrame.  ``source``: a matrix (a YAML path or a :class:`~bench.matrix.Matrix`),
    whose cells are read from ``output`` (default: the matrix's own), or a store folder, every
    verified result of which is read (corrupt or edited files are named in the log and skipped)."""
    if isinstance(source, Matrix) or (isinstance(source, (str, Path)) and Path(source).suffix in (".yaml", ".yml")):
        matrix = source if isinstance(source, Matrix) else load_matrix(source)
        rows, _ = collect(matrix, Store(Path(output or matrix.output)))
        return frame(rows)
    store = Store(Path(source))
    if not (store.root / "results").is_dir():
        raise FileNotFoundError(f"{source}: no results/ folder in it (not a run's --output folder, or no "
                                f"cell has finished there yet); give a run's --output folder (default: runs) or a "
                                f"matrix YAML")
    rows = []
    for path in sorted((store.root / "results").glob("*.json")):
        result, problem = store.load_result(path, path.stem)
        if problem:
            store.report_bad(path, problem)
        elif result is not None:
            rows.append(result.row)
    return frame(rows)
