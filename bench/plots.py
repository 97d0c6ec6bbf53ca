"""Figures for the report (matplotlib, Agg backend; PNG files).

Each figure is drawn only when the results hold what it needs:

* ACC vs ASR scatter, one marker per defense (per dataset/model);
* ASR and ACC vs the poison ratio (cells that differ in the attack's ``poison_ratio``);
* ASR and ACC vs AdvrBD's partition rate (cells that differ in ``partition_rate``);
* detection TPR / FPR per defense;
* per-round curves a defense recorded with ``ctx.observe`` (AdvrBD's enhanced model, Fig. 6).
"""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from statistics import mean

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

#: figure size in inches and resolution of the PNGs
FIGSIZE = (5.0, 3.6)
DPI = 110


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_")


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _nanfree(rs, k):
    return [r[k] for r in rs if r.get(k) is not None and r[k] == r[k]]


def scatter(rows, out: Path) -> list[tuple[str, Path]]:
    figs = []
    by = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by[(r["dataset"], r["model"])][r["defense_name"]].append(r)
    for (dataset, model), defs in by.items():
        fig, ax = plt.subplots(figsize=FIGSIZE)
        for d, rs in defs.items():
            ax.scatter([100 * r["asr"] for r in rs], [100 * r["acc"] for r in rs], label=d, alpha=0.8)
        ax.set_xlabel("ASR (%)")
        ax.set_ylabel("ACC (%)")
        ax.set_title(f"{dataset} / {model}: one point per attack and seed")
        ax.legend(fontsize=7, ncol=2)
        figs.append((f"ACC vs ASR per defense, {dataset} / {model}",
                     _save(fig, out / f"scatter_{_slug(dataset)}_{_slug(model)}.png")))
    return figs


def sweep(rows, out: Path, param: str, where: str, xlabel: str) -> list[tuple[str, Path]]:
    """ACC/ASR against a parameter (``where`` = 'attack_params' or 'defense_params')."""
    figs = []
    series = defaultdict(lambda: defaultdict(list))
    for r in rows:
        v = r.get(where, {}).get(param)
        if v is None:
            continue
        # one line per (attack, defense), named without the swept parameter
        line = (r["attack"], r["defense_name"]) if where == "attack_params" else (r["attack_name"], r["defense"])
        series[(r["dataset"], r["model"])][line].append((v, r))
    for (dataset, model), lines in series.items():
        if all(len({v for v, _ in pts}) < 2 for pts in lines.values()):
            continue
        fig, axes = plt.subplots(1, 2, figsize=(FIGSIZE[0] * 1.8, FIGSIZE[1]))
        for (attack, defense), pts in lines.items():
            xs = sorted({v for v, _ in pts})
            if len(xs) < 2:
                continue
            for ax, metric in zip(axes, ("asr", "acc")):
                ys = [100 * mean(_nanfree([r for v, r in pts if v == x], metric) or [float("nan")]) for x in xs]
                ax.plot(xs, ys, marker="o", label=f"{attack} / {defense}")
        for ax, metric in zip(axes, ("ASR", "ACC")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{metric} (%)")
            ax.legend(fontsize=7)
        fig.suptitle(f"{dataset} / {model}")
        figs.append((f"ASR and ACC vs {xlabel}, {dataset} / {model}",
                     _save(fig, out / f"{_slug(param)}_{_slug(dataset)}_{_slug(model)}.png")))
    return figs


def detection(rows, out: Path) -> list[tuple[str, Path]]:
    det = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if "detection" in r:
            det[r["dataset"]][r["defense_name"]].append(r["detection"])
    figs = []
    for dataset, defs in det.items():
        names = list(defs)
        fig, ax = plt.subplots(figsize=FIGSIZE)
        xs = range(len(names))
        tpr = [100 * mean(_nanfree(defs[n], "tpr") or [0]) for n in names]
        fpr = [100 * mean(_nanfree(defs[n], "fpr") or [0]) for n in names]
        ax.bar([x - 0.2 for x in xs], tpr, 0.4, label="TPR")
        ax.bar([x + 0.2 for x in xs], fpr, 0.4, label="FPR")
        ax.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("%")
        ax.set_title(f"Detection of poisoned samples, {dataset} (mean over attacks)")
        ax.legend()
        figs.append((f"Detection TPR/FPR, {dataset}", _save(fig, out / f"detection_{_slug(dataset)}.png")))
    return figs


def rounds(rows, out: Path) -> list[tuple[str, Path]]:
    """One figure per defense: ASR (solid) and ACC (dashed) of its intermediate models, a line per attack."""
    by = defaultdict(list)
    for r in rows:
        if len(r.get("observations") or []) >= 2:
            by[(r["dataset"], r["model"], r["defense_name"])].append(r)
    figs = []
    for (dataset, model, defense), rs in by.items():
        fig, ax = plt.subplots(figsize=(FIGSIZE[0] * 1.3, FIGSIZE[1]))
        for i, r in enumerate(rs):
            obs = r["observations"]
            color = f"C{i % 10}"
            label = r["attack_name"] + (f" s{r['seed']}" if r.get("seed") else "")
            ax.plot(range(len(obs)), [100 * o["asr"] for o in obs], marker="o", color=color, label=label)
            ax.plot(range(len(obs)), [100 * o["acc"] for o in obs], linestyle="--", color=color)
        tags = rs[0]["observations"]
        ax.set_xticks(range(len(tags)), [o["tag"] for o in tags], rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("ASR (solid) / ACC (dashed), %")
        ax.set_title(f"{defense}: intermediate models, {dataset} / {model}", fontsize=9)
        ax.legend(fontsize=6, ncol=2)
        figs.append((f"{defense}: ASR/ACC of its intermediate models ({dataset} / {model})",
                     _save(fig, out / f"rounds_{_slug(defense)}_{_slug(dataset)}_{_slug(model)}.png")))
    return figs


def make_figures(rows: list[dict], out: Path) -> list[tuple[str, Path]]:
    """Draw every applicable figure into ``out`` (emptied first: it holds generated files only)."""
    if out.exists():
        for old in out.glob("*.png"):
            old.unlink()
    return (scatter(rows, out)
            + sweep(rows, out, "poison_ratio", "attack_params", "poison ratio")
            + sweep(rows, out, "partition_rate", "defense_params", "AdvrBD partition rate")
            + detection(rows, out)
            + rounds(rows, out))
