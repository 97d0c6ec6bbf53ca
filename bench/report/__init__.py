"""Renders a matrix's results as paper-style tables and figures.

Its one input is the results (rows as the store keeps them, read by :func:`bench.results.collect`).
Per dataset and model: a row per attack and an Average row, an ACC/ASR column pair per defense,
seeds as mean ± interval; beside it the AdvrBD paper's published numbers and BackdoorBench's
leaderboard where they have the cell (:mod:`~bench.report.reference`), detection, warnings,
per-round and cost tables (:mod:`~bench.report.tables`, one function per table).  Every table is
built once as a :class:`~bench.report.tables.Table` and rendered to Markdown, LaTeX and one
self-contained HTML page (:mod:`~bench.report.render`); :func:`write_report` writes them with the
results frame and the figures (:mod:`~bench.report.files`).
"""
from .files import galleries, gallery_attacks, write_report, write_results
from .reference import PAPER_REGIME, leaderboard, paper_numbers, regime
from .render import to_html, to_latex, to_markdown
from .tables import IMPLANT_ASR, WARN_MARK, Section, Table, build_sections, rounds_table

__all__ = ["IMPLANT_ASR", "PAPER_REGIME", "WARN_MARK", "Section", "Table", "build_sections", "galleries",
           "gallery_attacks", "leaderboard", "paper_numbers", "regime", "rounds_table", "to_html", "to_latex",
           "to_markdown", "write_report", "write_results"]
