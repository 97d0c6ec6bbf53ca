"""Figures for the report (matplotlib, Agg backend; each as PNG for the HTML page and PDF for a paper).

Entries are told apart by colour *and* marker (:func:`style`), so any number of defenses stays
distinct; legends sit outside the axes; sweep plots carry 95 % t-interval error bars over seeds.

Each figure is drawn only when the results hold what it needs:

* ACC vs ASR scatter, one marker per defense (per dataset/model);
* ASR and ACC vs the poison ratio (cells that differ in the attack's ``poison_ratio``);
* ASR and ACC vs AdvrBD's partition rate (cells that differ in ``partition_rate``);
* detection TPR / FPR per defense;
* per-round curves a defense recorded with ``ctx.observe`` / ``ctx.observe_flags`` (AdvrBD's
  enhanced model and its identification per round, the paper's Fig. 6);
* score histograms of clean vs poisoned samples recorded with ``ctx.observe_scores`` (Fig. 5).
"""
from __future__ import annotations

import re
import textwrap
from collections import defaultdict
from pathlib import Path
from statistics import mean

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .stats import mean_ci  # noqa: E402

#: figure size in inches and resolution of the PNGs
FIGSIZE = (5.0, 3.6)
#: panels per row of the score-distribution figure (more attacks wrap onto further rows)
SCORE_PANELS_PER_ROW = 4
DPI = 110


#: marker shapes, cycled with the colours so that (colour, marker) pairs stay unique
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def style(i: int, n: int) -> dict:
    """Colour and marker of entry ``i`` of ``n``: tab10 for up to 10 entries; beyond, tab20 with its
    dark shades before its light ones, and a marker that differs between the two shades of a hue."""
    if n <= 10:
        color = plt.get_cmap("tab10")(i % 10)
    else:
        j = i % 20
        color = plt.get_cmap("tab20")(2 * j if j < 10 else 2 * (j - 10) + 1)
    # beyond 10 entries the marker shifts once per 10: entry i and i + 10 (a dark and a light shade of
    # one hue) get different markers, and so do entries 20 apart, which share a colour
    return {"color": color, "marker": MARKERS[(i + i // 10) % len(MARKERS)]}


def _legend(ax, **kw) -> None:
    """The legend to the right of the axes, off the data."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=kw.pop("fontsize", 7),
                  **kw)


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_")


def _save(fig, path: Path) -> Path:
    """Write ``path`` (PNG) and the same figure as PDF beside it; return the PNG's path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    fig.savefig(path.with_suffix(".pdf"), bbox_inches="tight")
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
        for i, (d, rs) in enumerate(defs.items()):
            ax.scatter([100 * r["asr"] for r in rs], [100 * r["acc"] for r in rs], label=d, alpha=0.85,
                       **style(i, len(defs)))
        ax.set_xlabel("ASR (%)")
        ax.set_ylabel("ACC (%)")
        ax.set_title(f"{dataset} / {model}: one point per attack and seed")
        _legend(ax)
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
        drawn = [(k, pts) for k, pts in lines.items() if len({v for v, _ in pts}) >= 2]
        for i, ((attack, defense), pts) in enumerate(drawn):
            xs = sorted({v for v, _ in pts})
            for ax, metric in zip(axes, ("asr", "acc")):
                cis = [mean_ci(_nanfree([r for v, r in pts if v == x], metric)) for x in xs]
                ys = [100 * c.mean if c else float("nan") for c in cis]
                err = [100 * c.half_width if c and c.half_width is not None else 0.0 for c in cis]
                ax.errorbar(xs, ys, yerr=err if any(err) else None, capsize=3, label=f"{attack} / {defense}",
                            **style(i, len(drawn)))
        for ax, metric in zip(axes, ("ASR", "ACC")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{metric} (%)")
        _legend(axes[1])
        fig.suptitle(f"{dataset} / {model} (error bars: 95 % t-interval over seeds, where there are several)")
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
        _legend(ax)
        figs.append((f"Detection TPR/FPR, {dataset}", _save(fig, out / f"detection_{_slug(dataset)}.png")))
    return figs


def _models(obs):
    return [o for o in obs or [] if "kind" not in o]


def _kind(obs, kind: str, prefix: str):
    return {o["tag"][len(prefix):]: o for o in obs or [] if o.get("kind") == kind and o["tag"].startswith(prefix)}


def rounds(rows, out: Path) -> list[tuple[str, Path]]:
    """One figure per defense: ASR (solid) and ACC (dashed) of its intermediate models, a line per
    attack (the AdvrBD paper's Fig. 6).  When the defense also recorded flagged sets per round
    (AdvrBD: ``identify<t>`` and ``dc<t>``), a second panel shows the identification TPR (solid) and
    FPR (dashed) if the enhancement stopped at that round, and D_c's poison share (dotted)."""
    by = defaultdict(list)
    for r in rows:
        if len(_models(r.get("observations"))) >= 2:
            by[(r["dataset"], r["model"], r["defense_name"])].append(r)
    figs = []
    for (dataset, model, defense), rs in by.items():
        flags = any(_kind(r["observations"], "flags", "identify") for r in rs)
        fig, axes = plt.subplots(1, 2 if flags else 1, figsize=(FIGSIZE[0] * (2.4 if flags else 1.3), FIGSIZE[1]),
                                 squeeze=False)
        ax = axes[0][0]
        for i, r in enumerate(rs):
            obs = _models(r["observations"])
            color = style(i, len(rs))["color"]
            label = r["attack_name"] + (f" s{r['seed']}" if r.get("seed") else "")
            ax.plot(range(len(obs)), [100 * o["asr"] for o in obs], marker="o", color=color, label=label)
            ax.plot(range(len(obs)), [100 * o["acc"] for o in obs], linestyle="--", color=color)
            if flags:
                ident, dc = _kind(r["observations"], "flags", "identify"), _kind(r["observations"], "flags", "dc")
                ts = [o["tag"][len("round"):] for o in obs]
                bx = axes[0][1]
                bx.plot(range(len(ts)), [100 * ident[t]["tpr"] if t in ident else float("nan") for t in ts],
                        marker="o", color=color, label=label)
                bx.plot(range(len(ts)), [100 * ident[t]["fpr"] if t in ident else float("nan") for t in ts],
                        linestyle="--", color=color)
                bx.plot(range(len(ts)), [100 * dc[t]["precision"] if t in dc and dc[t]["flagged"] else float("nan")
                                         for t in ts], linestyle=":", color=color)
        tags = _models(rs[0]["observations"])
        ax.set_xticks(range(len(tags)), [o["tag"] for o in tags], rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("ASR (solid) / ACC (dashed), %")
        ax.set_title(f"{defense}: intermediate models, {dataset} / {model}", fontsize=9)
        if not flags:
            _legend(ax, fontsize=6)
        if flags:
            bx = axes[0][1]
            bx.set_xticks(range(len(tags)), [o["tag"] for o in tags], rotation=30, ha="right", fontsize=7)
            bx.set_ylabel("identification TPR (solid) / FPR (dashed);\nD_c poison share (dotted), %", fontsize=8)
            bx.set_title("if identification ran after this round", fontsize=9)
            _legend(bx, fontsize=6)
        figs.append((f"{defense}: ASR/ACC of its intermediate models ({dataset} / {model})",
                     _save(fig, out / f"rounds_{_slug(defense)}_{_slug(dataset)}_{_slug(model)}.png")))
    return figs


def score_histograms(rows, out: Path) -> list[tuple[str, Path]]:
    """Clean vs poisoned score distributions of the first scored round, one panel per attack (the
    AdvrBD paper's Fig. 5), with the AUROC of "lower score = poison" in each title."""
    by = defaultdict(list)
    for r in rows:
        first = _kind(r.get("observations"), "scores", "score").get("1")
        if first and first.get("edges") and first.get("n_poison"):
            by[(r["dataset"], r["model"], r["defense_name"])].append((r, first))
    figs = []
    for (dataset, model, defense), items in by.items():
        ncols = min(len(items), SCORE_PANELS_PER_ROW)
        nrows = -(-len(items) // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(3.0 * ncols, 2.6 * nrows + 0.5), squeeze=False,
                                 layout="constrained")
        flat = [ax for row in axes for ax in row]
        for ax in flat[len(items):]:
            ax.axis("off")
        for ax, (r, sc) in zip(flat, items):
            edges = sc["edges"]
            width = edges[1] - edges[0]
            for hist, color, name in ((sc["clean_hist"], "C0", "clean"), (sc["poison_hist"], "C3", "poisoned")):
                total = max(1, sum(hist))
                ax.bar(edges[:-1], [h / total for h in hist], width, align="edge", alpha=0.55, color=color, label=name)
            ax.set_title(textwrap.fill(f"{r['attack_name']}: AUROC {sc['auroc']:.2f}", 34), fontsize=8)
            ax.set_xlabel("robustness score (KL)", fontsize=7)
            ax.tick_params(labelsize=6)
        for row in axes:
            row[0].set_ylabel("share of group", fontsize=7)
        _legend(flat[len(items) - 1], fontsize=6)
        fig.suptitle(f"{defense}: round-1 scores, {dataset} / {model}", fontsize=9)
        figs.append((f"{defense}: score distributions of clean and poisoned samples ({dataset} / {model})",
                     _save(fig, out / f"scores_{_slug(defense)}_{_slug(dataset)}_{_slug(model)}.png")))
    return figs


def make_figures(rows: list[dict], out: Path) -> list[tuple[str, Path]]:
    """Draw every applicable figure into ``out`` (emptied first: it holds generated files only)."""
    if out.exists():
        for old in [*out.glob("*.png"), *out.glob("*.pdf")]:
            old.unlink()
    return (scatter(rows, out)
            + sweep(rows, out, "poison_ratio", "attack_params", "poison ratio")
            + sweep(rows, out, "partition_rate", "defense_params", "AdvrBD partition rate")
            + detection(rows, out)
            + rounds(rows, out)
            + score_histograms(rows, out))
