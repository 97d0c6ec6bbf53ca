"""A report on disk: ``tables.md``, ``tables.tex``, ``tables.csv``, the results frame
(``results.csv``, ``results.jsonl``, ``results.parquet`` with pyarrow) and ``report.html`` with its
figures and trigger galleries."""
from __future__ import annotations

import csv
import logging
from pathlib import Path
from statistics import mean, stdev

from ..core.params import params_of
from ..gallery import render_gallery
from ..matrix import Matrix
from ..plots import make_figures
from ..results import collect, frame
from ..store import Store
from .render import to_html, to_latex, to_markdown
from .tables import _vals, build_sections, group

log = logging.getLogger("bench.report")


def write_results(rows: list[dict], out_dir: Path) -> list[Path]:
    """``results.csv`` and ``results.jsonl`` (and ``results.parquet`` when pyarrow is installed): the
    DataFrame of :func:`bench.results.load`, one row per cell."""
    df = frame(rows)
    paths = [out_dir / "results.csv", out_dir / "results.jsonl"]
    df.to_csv(paths[0], index=False)
    df.to_json(paths[1], orient="records", lines=True)
    try:
        import pyarrow  # noqa: F401  (optional: parquet only where it is installed)

        df.to_parquet(out_dir / "results.parquet", index=False)
        paths.append(out_dir / "results.parquet")
    except ImportError:
        pass
    return paths


def gallery_attacks(matrix: Matrix, dataset: str) -> list[tuple]:
    """The matrix's attacks on ``dataset`` with their labels there, each parameter setting once, in
    matrix order."""
    seen, out = set(), []
    for c in matrix.cells:
        ident = (c.attack.key, repr(params_of(c.attack)))
        if c.dataset.display == dataset and ident not in seen:
            seen.add(ident)
            out.append((c.attack, c.attack_name))
    return out


def galleries(datasets: list[str], data_root: str | None, out: Path,
              matrix: Matrix | None = None) -> list[tuple[str, Path]]:
    """The trigger gallery (clean vs triggered examples of every attack) for each dataset: the
    matrix's attacks with its parameters when ``matrix`` is given, else defaults."""
    figs = []
    for name in datasets:
        entries = gallery_attacks(matrix, name) if matrix is not None else []
        what = "the matrix's attack parameters" if entries else "default parameters"
        try:
            figs.append((f"Trigger gallery, {name} ({what})",
                         render_gallery(name, data_root, out / f"gallery_{name}.png",
                                        attacks=[a for a, _ in entries] or None,
                                        names=[n for _, n in entries] or None)))
        except (FileNotFoundError, ValueError) as e:  # data not here: the tables still render
            log.warning("no trigger gallery for %s: %s", name, e)
    return figs


INTRO = ("ACC and ASR in %. ASR counts triggered test images whose true label is not the target "
         "(TaCT: source class only); RA is the share of them classified as their true label.")


def write_report(matrix: Matrix, store: Store, out_dir: Path, data_root: str | None = None,
                 figures: bool = True) -> tuple[Path, list[str]]:
    """Tables (Markdown, LaTeX, CSV), the results frame and ``report.html`` of ``matrix``'s results in
    ``store`` (``data_root``: where the trigger galleries read their images)."""
    rows, missing = collect(matrix, store)
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = build_sections(rows)
    tail = ""
    if missing:
        tail = (f"\n{len(missing)} cell(s) have no result yet: " + ", ".join(missing[:10]) +
                (" ..." if len(missing) > 10 else "") + "\n")
    # the matrix's description (what it is, what a reader should know of its numbers) above the tables
    intro = f"{' '.join(matrix.description.split())}\n\n{INTRO}" if matrix.description.strip() else INTRO
    (out_dir / "tables.md").write_text(f"# Results: {matrix.name}\n\n{intro}\n\n" + to_markdown(sections) + tail)
    (out_dir / "tables.tex").write_text(to_latex(sections))
    write_results(rows, out_dir)
    with open(out_dir / "tables.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dataset", "model", "attack", "defense", "acc_mean", "acc_std", "asr_mean", "asr_std", "seeds"])
        for (dataset, model), cells in group(rows).items():
            for (a, d), rs in cells.items():
                acc, asr = _vals(r["acc"] for r in rs), _vals(r["asr"] for r in rs)
                w.writerow([dataset, model, a, d, f"{100 * mean(acc):.2f}" if acc else "",
                            f"{100 * stdev(acc):.2f}" if len(acc) > 1 else "",
                            f"{100 * mean(asr):.2f}" if asr else "",
                            f"{100 * stdev(asr):.2f}" if len(asr) > 1 else "", len(rs)])
    figs = []
    if figures and rows:
        figs = make_figures(rows, out_dir / "figures")
        figs += galleries(sorted({r["dataset"] for r in rows}), data_root, out_dir / "figures", matrix)
    (out_dir / "report.html").write_text(to_html(f"Results: {matrix.name}", intro + tail, sections, figs))
    return out_dir / "tables.md", missing
