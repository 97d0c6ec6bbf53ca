"""Renders a matrix's results as paper-style tables.

Per dataset and model: rows = attacks + Average, a column pair ACC/ASR per defense, seeds as
mean ± std.  A comparison table puts our numbers beside the AdvrBD paper's
(``bench/reference/advrbd_paper_tables.csv``, shipped with the package) where the same
dataset/attack/defense was published, and a detection table shows TPR/FPR for defenses that
flag samples.  Outputs: ``tables.md``, ``tables.csv`` and ``results.csv`` (one row per cell).
"""
from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from importlib import resources
from pathlib import Path
from statistics import mean, stdev

from .matrix import Matrix
from .runner import Runner


def paper_numbers() -> dict[tuple[str, str, str], tuple[float, float]]:
    text = resources.files("bench").joinpath("reference/advrbd_paper_tables.csv").read_text()
    out = {}
    for r in csv.DictReader(io.StringIO(text)):
        out[(r["dataset"], r["attack"], r["defense"])] = (float(r["acc"]), float(r["asr"]))
    return out


def _ms(values: list[float]) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "–"
    m = 100 * mean(values)
    return f"{m:.1f}" if len(values) == 1 else f"{m:.1f}±{100 * stdev(values):.1f}"


def collect(matrix: Matrix, runner: Runner) -> tuple[list[dict], list[str]]:
    rows, missing = [], []
    for cell in matrix.cells:
        r = runner.cached_result(cell)
        if r is None:
            missing.append(cell.label)
        else:
            rows.append({**r, **{k: v for k, v in cell.row().items() if k in ("attack_name", "defense_name")}})
    return rows, missing


def _group(rows):
    g = defaultdict(lambda: defaultdict(list))
    for r in rows:
        g[(r["dataset"], r["model"])][(r["attack_name"], r["defense_name"])].append(r)
    return g


def markdown_tables(rows: list[dict]) -> str:
    out = []
    paper = paper_numbers()
    for (dataset, model), cells in _group(rows).items():
        attacks = list(dict.fromkeys(a for a, _ in cells))
        defenses = list(dict.fromkeys(d for _, d in cells))
        out.append(f"## {dataset} / {model}\n")
        head = "| Attack | " + " | ".join(f"{d} ACC | {d} ASR" for d in defenses) + " |"
        out += [head, "|" + "---|" * (1 + 2 * len(defenses))]
        for a in attacks + ["Average"]:
            vals = []
            for d in defenses:
                rs = [r for (aa, dd), v in cells.items() if dd == d and (aa == a or a == "Average") for r in v]
                if a == "Average":  # average of per-attack means
                    per = defaultdict(list)
                    for r in rs:
                        per[r["attack_name"]].append(r)
                    accs = [mean(x["acc"] for x in v) for v in per.values()]
                    asrs = [mean(x["asr"] for x in v if not math.isnan(x["asr"])) for v in per.values()]
                    vals += [_ms([mean(accs)]) if accs else "–", _ms([mean(asrs)]) if asrs else "–"]
                else:
                    vals += [_ms([r["acc"] for r in rs]), _ms([r["asr"] for r in rs])]
            out.append(f"| {'**Average**' if a == 'Average' else a} | " + " | ".join(vals) + " |")
        clean = {r["defense_name"]: r.get("clean_data", 0.0) for v in cells.values() for r in v}
        out.append("\nClean data used: " + ", ".join(f"{d} {100 * c:.0f}%" for d, c in clean.items()) + "\n")

        cmp = [(a, d) for (a, d) in cells if (dataset, a, d) in paper]
        if cmp:
            out += ["### Ours vs the AdvrBD paper (ResNet-18; our model and budget may differ)\n",
                    "| Attack | Defense | ACC (ours) | ACC (paper) | ASR (ours) | ASR (paper) |",
                    "|---|---|---|---|---|---|"]
            for a, d in cmp:
                pa, ps = paper[(dataset, a, d)]
                rs = cells[(a, d)]
                out.append(f"| {a} | {d} | {_ms([r['acc'] for r in rs])} | {pa:.1f} | "
                           f"{_ms([r['asr'] for r in rs])} | {ps:.1f} |")
            out.append("")
        det = [(k, v) for k, v in cells.items() if any("detection" in r for r in v)]
        if det:
            out += ["### Detection of poisoned training samples\n", "| Attack | Defense | TPR | FPR | precision |",
                    "|---|---|---|---|---|"]
            for (a, d), v in det:
                ds = [r["detection"] for r in v if "detection" in r]
                out.append(f"| {a} | {d} | {_ms([x['tpr'] for x in ds])} | {_ms([x['fpr'] for x in ds])} | "
                           f"{_ms([x['precision'] for x in ds])} |")
            out.append("")
        out += ["### Cost\n", "| Defense | wall time (s) | epoch-equivalents |", "|---|---|---|"]
        by_def = defaultdict(list)
        for v in cells.values():
            for r in v:
                by_def[r["defense_name"]].append(r)
        for d, rs in by_def.items():
            out.append(f"| {d} | {mean(r['wall_time_s'] for r in rs):.1f} | "
                       f"{mean(r['epoch_equivalents'] for r in rs):.2f} |")
        out.append("")
    return "\n".join(out)


FLAT = ["dataset", "model", "attack", "defense", "defense_name", "seed", "acc", "asr", "ra", "clean_data",
        "wall_time_s", "epoch_equivalents", "n_train", "n_poison", "n_cover", "tpr", "fpr", "precision", "key"]


def flat_rows(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        f = {k: r.get(k) for k in FLAT}
        f.update({k: r.get("detection", {}).get(k) for k in ("tpr", "fpr", "precision")})
        out.append(f)
    return out


def write_report(matrix: Matrix, runner: Runner, out_dir: Path) -> tuple[Path, list[str]]:
    rows, missing = collect(matrix, runner)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = f"# Results: {matrix.name}\n\nACC and ASR in %. ASR counts test images whose true label is not " \
         f"the target (TaCT: source class only).\n\n" + markdown_tables(rows)
    if missing:
        md += f"\n{len(missing)} cell(s) have no result yet: " + ", ".join(missing[:10]) + \
              (" ..." if len(missing) > 10 else "") + "\n"
    (out_dir / "tables.md").write_text(md)
    with open(out_dir / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FLAT)
        w.writeheader()
        w.writerows(flat_rows(rows))
    with open(out_dir / "tables.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dataset", "model", "attack", "defense", "acc_mean", "acc_std", "asr_mean", "asr_std", "seeds"])
        for (dataset, model), cells in _group(rows).items():
            for (a, d), rs in cells.items():
                acc, asr = [r["acc"] for r in rs], [r["asr"] for r in rs]
                w.writerow([dataset, model, a, d, f"{100 * mean(acc):.2f}",
                            f"{100 * stdev(acc):.2f}" if len(acc) > 1 else "",
                            f"{100 * mean(asr):.2f}", f"{100 * stdev(asr):.2f}" if len(asr) > 1 else "", len(rs)])
    return out_dir / "tables.md", missing
