"""Renders a matrix's results as paper-style tables and figures.

Per dataset and model: rows = attacks + Average, a column pair ACC/ASR per defense, seeds as
mean ± std; beside it a comparison with the AdvrBD paper's published numbers
(``bench/reference/advrbd_paper_tables.csv``, shipped with the package) where the same
dataset/attack/defense was published, a detection table (TPR/FPR/precision) for defenses that
flag samples, and a cost table (wall time, epoch-equivalents, clean data used).

Every table is built once as a :class:`Table` and rendered to Markdown (``tables.md``), LaTeX
(``tables.tex``), CSV (``tables.csv``, long format) and one self-contained HTML page
(``report.html``, figures embedded).  ``results.csv`` / ``results.jsonl`` (and ``results.parquet``
with pyarrow) have one row per cell, every parameter a column (see :mod:`bench.results`).
"""
from __future__ import annotations

import base64
import csv
import html
import io
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from statistics import mean, stdev

from .matrix import Matrix
from .results import collect, frame
from .store import Store

log = logging.getLogger("bench.report")


def paper_numbers() -> dict[tuple[str, str, str], tuple[float, float]]:
    text = resources.files("bench").joinpath("reference/advrbd_paper_tables.csv").read_text()
    out = {}
    for r in csv.DictReader(io.StringIO(text)):
        out[(r["dataset"], r["attack"], r["defense"])] = (float(r["acc"]), float(r["asr"]))
    return out


#: our names -> BackdoorBench leaderboard names (models, attacks, defenses); unlisted names have no row there
BB_MODELS = {"preact_resnet18": "PreActResNet-18"}
BB_ATTACKS = {"BadNet": "BadNet", "Blend": "Blended", "SIG": "SIG", "WaNet": "WaNet"}
BB_DEFENSES = {"No Defense": "No Defense", "FineTuning": "FT", "FinePruning": "FP", "ABL": "ABL", "CLP": "CLP",
               "DBR": "D-BR"}


def leaderboard() -> dict[tuple, tuple[float, float, float]]:
    """BackdoorBench's CIFAR-10 leaderboard (shipped in ``bench/reference``): (dataset, model, poison
    ratio, attack, defense) -> (ACC, ASR, RA) in %."""
    text = resources.files("bench").joinpath("reference/backdoorbench_leaderboard_cifar10.csv").read_text()
    def value(v: str) -> float:  # the leaderboard writes N/A for runs it does not have
        return float("nan") if v.strip() in ("", "N/A") else float(v)

    return {(r["dataset"], r["model"], float(r["pratio"]), r["attack"], r["defense"]):
            (value(r["acc"]), value(r["asr"]), value(r["ra"])) for r in csv.DictReader(io.StringIO(text))}


def _vals(values) -> list[float]:
    return [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]


def pct(values) -> str:
    """Mean in percent; over several seeds, ± the half-width of the 95 % t-interval and the seed count."""
    from .stats import mean_ci

    ci = mean_ci(_vals(values))
    if ci is None:
        return "–"
    if ci.half_width is None:
        return f"{100 * ci.mean:.1f}"
    return f"{100 * ci.mean:.1f}±{100 * ci.half_width:.1f} (n={ci.n})"


SEEDS_NOTE = "mean over seeds; with several, ± the half-width of the 95 % t-interval and (n=seeds)"


@dataclass
class Table:
    caption: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""
    bold_rows: set[int] = field(default_factory=set)
    #: a header row above ``header``: (text, columns spanned), e.g. a defense over its ACC and ASR
    groups: list[tuple[str, int]] | None = None
    #: (row, column) entries to set in bold: the best value of a row
    bold_cells: set[tuple[int, int]] = field(default_factory=set)


@dataclass
class Section:
    title: str
    tables: list[Table]


def group(rows):
    g = defaultdict(lambda: defaultdict(list))
    for r in rows:
        g[(r["dataset"], r["model"])][(r["attack_name"], r["defense_name"])].append(r)
    return g


def num(values, digits: int = 2) -> str:
    """Mean (± std over seeds) of plain numbers."""
    values = _vals(values)
    if not values:
        return "–"
    m = mean(values)
    return f"{m:.{digits}f}" if len(values) == 1 else f"{m:.{digits}f}±{stdev(values):.{digits}f}"


def natural_table(cells) -> Table | None:
    """Natural-backdoor ASR per area budget (max over labels), the label reaching it at the largest
    budget, and the Neural Cleanse anomaly index, per attack x defense (``natural_backdoor`` results)."""
    budgets: list[float] = []
    for rs in cells.values():
        for r in rs:
            for b in (r.get("natural_backdoor") or {}).get("budgets", []):
                if b not in budgets:
                    budgets.append(b)
    if not budgets:
        return None
    budgets.sort()
    body = []
    for (a, d), rs in cells.items():
        nb = [r["natural_backdoor"] for r in rs if r.get("natural_backdoor")]
        if not nb:
            continue
        line = [a, d, pct(r["acc"] for r in rs)]
        for b in budgets:
            line.append(pct(n["asr_max"][n["budgets"].index(b)] for n in nb if b in n["budgets"]))
        line.append("/".join(str(n["asr_max_label"][-1]) for n in nb))
        line.append(num(n["anomaly_max"] for n in nb))
        line.append("/".join(str(len(n["flagged"])) for n in nb))
        body.append(line)
    header = (["Attack", "Defense", "ACC"] + [f"ASR@{100 * b:g}%" for b in budgets]
              + ["max label", "anomaly index", "flagged"])
    return Table("Natural backdoors: inverted-trigger ASR (%) by mask-area budget", header, body,
                 "max over labels of the share of held-out non-label test images sent to the label by a "
                 "trigger inverted on a disjoint split; max label (at the largest budget), flagged-label "
                 "count per seed; anomaly index: Neural Cleanse MAD index of the smallest-norm label; "
                 "mean ± std over seeds")


#: an attack whose undefended model's ASR (mean over seeds) is below this did not implant a
#: backdoor: its row is marked and left out of the averages (a defense cannot remove what is not there)
IMPLANT_ASR = 0.5
#: marks a table entry whose cell recorded a warning (listed in the Warnings table)
WARN_MARK = "†"


def undefended_asr(cells, attack: str) -> float | None:
    """The attack's undefended ASR: the undefended cells', else the backdoored model's that repair
    defenses started from; ``None`` when neither was run."""
    asr = [r["asr"] for (a, d), rs in cells.items() if a == attack for r in rs if r.get("defense") == "undefended"]
    if not asr:
        asr = [r["backdoor"]["asr"] for (a, d), rs in cells.items() if a == attack for r in rs
               if (r.get("backdoor") or {}).get("asr") is not None]
    return mean(asr) if asr else None


def not_implanted(cells, attacks) -> list[str]:
    return [a for a in attacks if (u := undefended_asr(cells, a)) is not None and u < IMPLANT_ASR]


def _number(text: str) -> float | None:
    try:
        return float(text.split("±")[0].split()[0])
    except (ValueError, IndexError):
        return None


def _lowest(body, columns) -> set[tuple[int, int]]:
    """The lowest value per row among ``columns`` (the best ASR of the defended models); ties all bold."""
    out = set()
    for i, row in enumerate(body):
        vals = {c: _number(row[c]) for c in columns if c < len(row)}
        vals = {c: v for c, v in vals.items() if v is not None}
        if len(vals) >= 2:
            best = min(vals.values())
            out |= {(i, c) for c, v in vals.items() if v == best}
    return out


def _marked(rs, text: str) -> str:
    return f"{text} {WARN_MARK}" if any(r.get("warnings") for r in rs) else text


def build_sections(rows: list[dict]) -> list[Section]:
    paper = paper_numbers()
    sections = []
    for (dataset, model), cells in group(rows).items():
        attacks = list(dict.fromkeys(a for a, _ in cells))
        defenses = list(dict.fromkeys(d for _, d in cells))
        missed = not_implanted(cells, attacks)
        tables = []

        body = []
        for a in attacks:
            line = [f"{a} (did not implant)" if a in missed else a]
            for d in defenses:
                rs = cells.get((a, d), [])
                line += [_marked(rs, pct(r["acc"] for r in rs)), pct(r["asr"] for r in rs)]
            body.append(line)
        avg = ["Average"]
        counted = [a for a in attacks if a not in missed]
        partial = False
        for d in defenses:  # mean over implanted attacks of the per-attack seed means
            accs = [mean(_vals(r["acc"] for r in cells[(a, d)])) for a in counted if _vals(r["acc"] for r in cells.get((a, d), []))]
            asrs = [mean(_vals(r["asr"] for r in cells[(a, d)])) for a in counted if _vals(r["asr"] for r in cells.get((a, d), []))]
            # an average over fewer attacks than the others' says so: it is not comparable with them
            of = f" ({len(accs)} of {len(counted)})" if accs and len(accs) < len(counted) else ""
            partial |= bool(of)
            avg += [pct([mean(accs)]) + of if accs else "–", pct([mean(asrs)]) + of if asrs else "–"]
        body.append(avg)
        header = ["Attack"] + [f"{d} {m}" for d in defenses for m in ("ACC", "ASR")]
        note = SEEDS_NOTE
        if missed:
            note += (f"; did not implant: undefended ASR below {100 * IMPLANT_ASR:.0f} % ({', '.join(missed)}), "
                     f"left out of the average")
        if partial:
            note += ("; Average (k of n): the defense has results for k of the n attacks averaged in the other "
                     "columns (a cell is missing, failed or was dropped as corrupt): not comparable with them")
        if any(r.get("warnings") for rs in cells.values() for r in rs):
            note += f"; {WARN_MARK}: the cell recorded a warning (see the Warnings table)"
        note += "; bold: the lowest ASR of the defended models in the row"
        keys = {d: next(r.get("defense") for (_, d2), rs in cells.items() if d2 == d for r in rs) for d in defenses}
        tables.append(Table("ACC / ASR (%)", header, body, note, {len(body) - 1},
                            groups=[("", 1)] + [(d, 2) for d in defenses],
                            bold_cells=_lowest(body, [2 + 2 * j for j, d in enumerate(defenses)
                                                      if keys[d] != "undefended"])))

        per_class = []
        for (a, d), rs in cells.items():
            per_class.append([a, d, pct(r["acc"] for r in rs), pct(r.get("acc_nontarget") for r in rs),
                              pct(r.get("target_recall") for r in rs), pct(r["asr"] for r in rs),
                              pct(r.get("ra") for r in rs)])
        tables.append(Table("ACC on all classes and on non-target images, target-class recall, ASR, RA (%)",
                            ["Attack", "Defense", "ACC", "ACC non-target", "target recall", "ASR", "RA"], per_class,
                            "ACC non-target: clean test images whose label is not the target; a defense that stops "
                            "predicting the target class keeps it while ACC and the target recall fall"))

        cmp = []
        for (a, d), rs in cells.items():
            key = (dataset, rs[0]["attack_display"], rs[0]["defense_display"])
            if key in paper and a == rs[0]["attack_display"]:
                pa, ps = paper[key]
                # the paper's defended ACC is on test images outside the target class (see the note)
                ours = "acc" if rs[0].get("defense") == "undefended" else "acc_nontarget"
                cmp.append([a, d, pct(r.get(ours) for r in rs), f"{pa:.1f}", pct(r["asr"] for r in rs), f"{ps:.1f}",
                            regime(rs[0], PAPER_REGIME)])
        if cmp:
            tables.append(Table("Ours vs the AdvrBD paper", ["Attack", "Defense", "ACC (ours, as the paper's)",
                                                            "ACC (paper)", "ASR (ours)", "ASR (paper)", "Regime"], cmp,
                                PAPER_NOTE))

        relearn = []
        for (a, d), rs in cells.items():
            ex = [r["extra"]["relearn"] for r in rs if "relearn" in (r.get("extra") or {})]
            if ex:
                relearn.append([a, d, pct(r["acc"] for r in rs), pct(r["asr"] for r in rs),
                                pct(x["acc"] for x in ex), pct(x.get("acc_nontarget") for x in ex),
                                pct(x["asr"] for x in ex)])
        if relearn:
            tables.append(Table("Relabel + relearn (the AdvrBD paper's Table IV): the clean model before and after",
                                ["Attack", "Defense", "ACC", "ASR", "ACC relearn", "ACC non-target relearn",
                                 "ASR relearn"], relearn,
                                "relearn: the declared-poisoned samples relabelled by the clean model, then the clean "
                                "model fine-tuned on the whole relabelled set"))

        det = []
        for (a, d), rs in cells.items():
            ds = [r["detection"] for r in rs if "detection" in r]
            if ds:
                det.append([a, d, pct(x["tpr"] for x in ds), pct(x["fpr"] for x in ds),
                            pct(x["precision"] for x in ds)])
        if det:
            tables.append(Table("Detection of poisoned training samples (%)",
                                ["Attack", "Defense", "TPR", "FPR", "precision"], det))

        warned = [[a, d, str(r.get("seed", "")), w] for (a, d), rs in cells.items() for r in rs
                  for w in r.get("warnings") or []]
        if warned:
            tables.append(Table("Warnings: cells whose numbers need a second look", ["Attack", "Defense", "seed",
                                                                                    "warning"], warned,
                                "recorded by the defense's own guards, or by the harness when a returned model is "
                                "at chance on the training data"))

        nat = natural_table(cells)
        if nat is not None:
            tables.append(nat)

        per_round = rounds_table(cells)
        if per_round is not None:
            tables.append(per_round)

        ratings = ratings_table(dataset, model, cells)
        if ratings is not None:
            tables.append(ratings)

        paired = paired_table(cells, attacks, defenses)
        if paired is not None:
            tables.append(paired)

        by_def = defaultdict(list)
        for (a, d), rs in cells.items():
            by_def[d] += rs
        cost = [[d, f"{mean(r['wall_time_s'] for r in rs):.1f}", f"{mean(r['epoch_equivalents'] for r in rs):.2f}",
                 f"{100 * max(r.get('clean_data', 0.0) for r in rs):.0f}%"] for d, rs in by_def.items()]
        tables.append(Table("Cost per cell and clean data used", ["Defense", "wall time (s)", "epoch-equivalents",
                                                                  "clean data"], cost,
                            "the backdoored model's training is shared and not included"))
        sections.append(Section(f"{dataset} / {model}", tables))
    return sections


def rounds_table(cells) -> Table | None:
    """Per round of a defense that observed its intermediate models round by round (AdvrBD's
    ``round<t>``, ``identify<t>``, ``dc<t>`` and ``score<t>``; the paper's Fig. 6 as numbers): f's
    ACC and ASR after the round, identification TPR/FPR had the enhancement stopped there, the
    poison share of D_c and the AUROC of the round's scores (low score = poison)."""
    rows = []
    for (a, d), rs in cells.items():
        for r in sorted(rs, key=lambda r: r.get("seed", 0)):
            obs = {o["tag"]: o for o in r.get("observations") or []}
            ts = sorted(int(tag[5:]) for tag, o in obs.items() if tag.startswith("round") and tag[5:].isdigit()
                        and "kind" not in o)
            if len(ts) < 2 or not any(f"identify{t}" in obs for t in ts):
                continue
            for t in ts:
                f, ident, dc, sc = (obs.get(f"{p}{t}", {}) for p in ("round", "identify", "dc", "score"))
                share = dc["precision"] if dc.get("flagged") else None  # the poisoned share of D_c
                rows.append([a, d, str(r.get("seed", "")), str(t), pct([f.get("acc")]), pct([f.get("asr")]),
                             pct([ident.get("tpr")]), pct([ident.get("fpr")]),
                             pct([share]) if share is not None else "–",
                             f"{sc['auroc']:.2f}" if sc.get("auroc") is not None else "–"])
    if not rows:
        return None
    return Table("Intermediate models per round (%): the enhancement's course, the AdvrBD paper's Fig. 6",
                 ["Attack", "Defense", "seed", "round", "f ACC", "f ASR", "TPR if stopped", "FPR if stopped",
                  "D_c poison share", "score AUROC"], rows,
                 "f: the enhanced model after the round (round 0: the start model); TPR/FPR: what identification "
                 "would flag had the enhancement stopped after this round; D_c poison share: poisoned samples among "
                 "those set aside as clean so far; score AUROC: how well the round's robustness scores rank poison "
                 "below clean samples (0.5: chance)")


def ratings_table(dataset: str, model: str, cells) -> Table | None:
    """DER and RIR against the undefended model of the same poisoned set, with BackdoorBench's
    leaderboard numbers where its dataset, model, poison ratio, attack and defense match ours."""
    df = frame([r for rs in cells.values() for r in rs])
    if df.empty or df["der"].isna().all():
        return None
    board = leaderboard()
    body = []
    for (a, d), g in df.groupby(["attack_name", "defense_name"], sort=False):
        r0 = cells[(a, d)][0]
        ratio = (r0.get("attack_params") or {}).get("poison_ratio")
        key = (dataset, BB_MODELS.get(model, BB_MODELS[BB_REGIME[0]]), ratio,
               BB_ATTACKS.get(r0.get("attack_display")), BB_DEFENSES.get(r0.get("defense_display")))
        bb = board.get(key) if ratio is not None else None
        same = regime(r0, BB_REGIME)
        body.append([a, d, pct(g["acc"]), pct(g["asr"]), pct(g["ra"]), pct(g["der"]), pct(g["rir"]),
                     "/".join(f"{v:.1f}" for v in bb) + ("" if same == "same" else f" ({same})") if bb else "–"])
    return Table("DER / RIR (%) and BackdoorBench's leaderboard", ["Attack", "Defense", "ACC", "ASR", "RA", "DER",
                                                                   "RIR", "BackdoorBench ACC/ASR/RA"], body,
                 "DER = [max(0, ΔASR) − max(0, ΔACC) + 1] / 2 and RIR = [max(0, ΔRA) − max(0, ΔACC) + 1] / 2 against "
                 "the undefended model of the same poisoned set (50 = no change); BackdoorBench: its CIFAR-10 "
                 "leaderboard (PreAct-ResNet-18, 100 epochs) where poison ratio, attack and defense match ours; "
                 "'differs' names our model and epochs where they are not the leaderboard's")


def _paired_text(p, all_single: bool = False) -> str:
    if p is None:
        return "–"
    d = f"{100 * p.diff:+.1f}"
    if p.p is None:
        if all_single:
            return d  # the table's note says it once
        return f"{d} (one seed: cannot tell)" if p.n == 1 else f"{d} (no spread: no test)"
    return f"{d} (p={p.p:.3f}){'*' if p.significant else ''}"


def paired_table(cells, attacks, defenses) -> Table | None:
    """Each defense against the undefended model and against AdvrBD on the same seeds (paired t-test)."""
    from .stats import ALPHA, paired_test

    def by_seed(a, d, metric):
        return {r.get("seed"): r.get(metric) for r in cells.get((a, d), [])}

    keys = {d: next(r.get("defense") for (a2, d2), rs in cells.items() if d2 == d for r in rs) for d in defenses}
    base = next((d for d in defenses if keys[d] == "undefended"), None)
    advrbd = next((d for d in defenses if keys[d] == "advrbd"), None)
    if base is None and advrbd is None:
        return None
    single = all(len({r.get("seed") for r in rs}) == 1 for rs in cells.values())
    body = []
    for a in attacks:
        for d in defenses:
            if d == base or (a, d) not in cells:
                continue
            line = [a, d, str(len(cells[(a, d)]))]
            for ref in (base, advrbd):
                for metric in ("asr", "acc"):
                    ok = ref is not None and ref != d and (a, ref) in cells
                    line.append(_paired_text(paired_test(by_seed(a, d, metric), by_seed(a, ref, metric)), single)
                                if ok else "–")
            body.append(line)
    if not body:
        return None
    note = (f"paired t-test over the seeds both were run with (same poisoned sets), two-sided; * p < {ALPHA:g}; "
            f"with one seed a difference is a single draw and no test can say whether it would repeat")
    if single:
        note = "one seed per cell: each difference is a single draw and no test can say whether it would repeat"
    return Table("Paired differences over seeds (percentage points): each defense minus the reference",
                 ["Attack", "Defense", "seeds", "ΔASR vs undefended", "ΔACC vs undefended", "ΔASR vs AdvrBD",
                  "ΔACC vs AdvrBD"], body, note)


# --- renderers --------------------------------------------------------------------------------

def to_markdown(sections: list[Section]) -> str:
    out = []
    for s in sections:
        out.append(f"## {s.title}\n")
        for t in s.tables:
            out += [f"**{t.caption}**\n", "| " + " | ".join(t.header) + " |", "|" + "---|" * len(t.header)]
            for i, r in enumerate(t.rows):
                cells = [f"**{c}**" if i in t.bold_rows or (i, j) in t.bold_cells else c for j, c in enumerate(r)]
                out.append("| " + " | ".join(cells) + " |")
            out.append(f"\n{t.note}\n" if t.note else "")
    return "\n".join(out)


#: LaTeX for the characters a table's text may hold that pdflatex does not take as they are
TEX_CHARS = {"\\": "\\textbackslash{}", "&": "\\&", "%": "\\%", "_": "\\_", "#": "\\#", "$": "\\$",
             "{": "\\{", "}": "\\}", "^": "\\^{}", "~": "\\~{}", "<": "$<$", ">": "$>$",
             "±": "$\\pm$", "–": "--", "—": "---", "−": "$-$", "†": "$^\\dagger$", "‡": "$^\\ddagger$",
             "Δ": "$\\Delta$", "×": "$\\times$", "≥": "$\\geq$", "≤": "$\\leq$", "≈": "$\\approx$",
             "→": "$\\rightarrow$", "…": "\\ldots{}", "·": "$\\cdot$", "°": "$^\\circ$", "µ": "$\\mu$",
             "μ": "$\\mu$", "’": "'", "‘": "`", "“": "``", "”": "''", "⚠": "(!)"}


def _tex(s: str) -> str:
    """``s`` as LaTeX text; a character outside ASCII and :data:`TEX_CHARS` is written as its code point."""
    return "".join(TEX_CHARS.get(c, c if c.isascii() else f"[U+{ord(c):04X}]") for c in s)


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


#: tables wider than this many columns are scaled to the text width
LATEX_MAX_COLUMNS = 9
#: ... and so are tables whose text is estimated wider than this many characters (a standard
#: article's 345-pt text width holds about 76 characters of \small type, column padding counted)
LATEX_MAX_CHARS = 76


def latex_chars(t: "Table") -> int:
    """The estimated width of ``t`` in characters: each column's longest entry plus 3 for padding,
    a group header as wide as its label where that is wider than its columns."""
    cols = [max([len(h)] + [len(str(r[j])) for r in t.rows if j < len(r)]) + 3 for j, h in enumerate(t.header)]
    if not t.groups:
        return sum(cols)
    total, j = 0, 0
    for g, n in t.groups:
        total += max(len(g) + 3, sum(cols[j:j + n]))
        j += n
    return total


def to_latex(sections: list[Section]) -> str:
    """booktabs tables: a two-level header where a table groups columns (defense over ACC/ASR), the
    best entry of a row in bold, a ``\\label`` per table, wide tables scaled to ``\\textwidth``.
    Needs ``\\usepackage{booktabs,graphicx}``."""
    out = ["% generated by python -m bench report; needs \\usepackage{booktabs,graphicx}"]
    for s in sections:
        for k, t in enumerate(s.tables):
            wide = len(t.header) > LATEX_MAX_COLUMNS or latex_chars(t) > LATEX_MAX_CHARS
            out += ["\\begin{table}[t]", "\\centering", "\\small",
                    f"\\caption{{{_tex(t.caption)}: {_tex(s.title)}}}",
                    f"\\label{{tab:{_slug(s.title)}-{k}-{_slug(t.caption)[:24].strip('-')}}}"]
            if wide:
                out.append("\\resizebox{\\textwidth}{!}{%")
            out += ["\\begin{tabular}{l" + "c" * (len(t.header) - 1) + "}", "\\toprule"]
            sub = t.header
            if t.groups:
                top, rules, col = [], [], 1
                for text, span in t.groups:
                    top.append(f"\\multicolumn{{{span}}}{{c}}{{{_tex(text)}}}" if span > 1 else _tex(text))
                    if text and span > 1:
                        rules.append(f"\\cmidrule(lr){{{col}-{col + span - 1}}}")
                    col += span
                out += [" & ".join(top) + " \\\\", " ".join(rules)]
                sub, j = [], 0
                for text, span in t.groups:  # the lower row drops the group's name from each header
                    for h in t.header[j:j + span]:
                        sub.append(h[len(text) + 1:] if text and h.startswith(text + " ") else h)
                    j += span
            out += [" & ".join(_tex(h) for h in sub) + " \\\\", "\\midrule"]
            for i, r in enumerate(t.rows):
                if i in t.bold_rows:
                    out.append("\\midrule")
                out.append(" & ".join(f"\\textbf{{{_tex(c)}}}" if (i, j) in t.bold_cells else _tex(c)
                                      for j, c in enumerate(r)) + " \\\\")
            out += ["\\bottomrule", "\\end{tabular}" + ("}" if wide else "")]
            if t.note:
                out.append(f"\\par\\smallskip{{\\footnotesize {_tex(t.note)}}}")
            out += ["\\end{table}", ""]
    return "\n".join(out)


HTML_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1340px;color:#222;
padding:0 1em}
table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:0.8em}
th,td{border-bottom:1px solid #ddd;padding:3px 5px;text-align:right}
td{white-space:nowrap}
th:first-child,td:first-child{text-align:left;white-space:normal;overflow-wrap:break-word;min-width:6em;max-width:11em}
th{background:#f3f3f3}
tr.avg td{font-weight:bold;border-top:2px solid #999}
caption{text-align:left;font-weight:600;padding:4px 0}
.note{color:#666;font-size:0.85em;margin-top:-1em}
figure{display:inline-block;margin:0 1em 1.5em 0;max-width:100%;vertical-align:top}
figcaption{font-size:0.85em;color:#555}
img{max-width:100%;height:auto}
.scroll{overflow-x:auto;padding-bottom:.9em}
"""


def to_html(title: str, intro: str, sections: list[Section], figures: list[tuple[str, Path]]) -> str:
    e = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>",
           f"<style>{HTML_STYLE}</style></head><body>", f"<h1>{e(title)}</h1>",
           *(f"<p>{e(p)}</p>" for p in intro.split("\n\n") if p.strip())]
    for s in sections:
        out.append(f"<h2>{e(s.title)}</h2>")
        for t in s.tables:
            head, sub = "", t.header
            if t.groups:
                head = "<tr>" + "".join(f"<th colspan='{n}'>{e(g)}</th>" for g, n in t.groups) + "</tr>"
                sub, j = [], 0
                for g, n in t.groups:
                    sub += [h[len(g) + 1:] if g and h.startswith(g + " ") else h for h in t.header[j:j + n]]
                    j += n
            out.append(f"<div class='scroll'><table><caption>{e(t.caption)}</caption>{head}<tr>" +
                       "".join(f"<th>{e(h)}</th>" for h in sub) + "</tr>")
            for i, r in enumerate(t.rows):
                cls = " class='avg'" if i in t.bold_rows else ""
                out.append(f"<tr{cls}>" + "".join(f"<td><b>{e(c)}</b></td>" if (i, j) in t.bold_cells
                                                  else f"<td>{e(c)}</td>" for j, c in enumerate(r)) + "</tr>")
            out.append("</table></div>" + (f"<p class='note'>{e(t.note)}</p>" if t.note else ""))
    if figures:
        out.append("<h2>Figures</h2>")
        for caption, path in figures:
            data = base64.b64encode(path.read_bytes()).decode()
            out.append(f"<figure><img alt='{e(caption)}' src='data:image/png;base64,{data}'>"
                       f"<figcaption>{e(caption)}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out)


def write_results(rows: list[dict], out_dir: Path) -> list[Path]:
    """``results.csv`` and ``results.jsonl`` (and ``results.parquet`` when pyarrow is installed): the
    DataFrame of :func:`bench.results.load`, one row per cell."""
    df = frame(rows)
    paths = [out_dir / "results.csv", out_dir / "results.jsonl"]
    df.to_csv(paths[0], index=False)
    df.to_json(paths[1], orient="records", lines=True)
    try:
        import pyarrow  # noqa: F401

        df.to_parquet(out_dir / "results.parquet", index=False)
        paths.append(out_dir / "results.parquet")
    except ImportError:
        pass
    return paths


def gallery_attacks(matrix: Matrix, dataset: str) -> list:
    """The matrix's attacks on ``dataset``, each parameter setting once, in matrix order."""
    from .core.params import params_of

    seen, out = set(), []
    for c in matrix.cells:
        ident = (c.attack.key, repr(params_of(c.attack)))
        if c.dataset.display == dataset and ident not in seen:
            seen.add(ident)
            out.append(c.attack)
    return out


def galleries(datasets: list[str], data_root: str | None, out: Path,
              matrix: Matrix | None = None) -> list[tuple[str, Path]]:
    """The trigger gallery (clean vs triggered examples of every attack) for each dataset: the
    matrix's attacks with its parameters when ``matrix`` is given, else defaults."""
    from .gallery import render_gallery

    figs = []
    for name in datasets:
        attacks = gallery_attacks(matrix, name) if matrix is not None else None
        what = "the matrix's attack parameters" if attacks else "default parameters"
        try:
            figs.append((f"Trigger gallery, {name} ({what})",
                         render_gallery(name, data_root, out / f"gallery_{name}.png",
                                        attacks=attacks or None)))
        except (FileNotFoundError, ValueError) as e:  # data not here: the tables still render
            log.warning("no trigger gallery for %s: %s", name, e)
    return figs


#: the training regime of the AdvrBD paper's tables: (model, at least this many epochs)
PAPER_REGIME = ("resnet18", 100)
#: BackdoorBench's leaderboard rows we compare with: (model, epochs)
BB_REGIME = ("preact_resnet18", 100)


def regime(row: dict, theirs: tuple[str, int]) -> str:
    """``same`` when the cell's model and training length are the reference's, else what differs,
    so that a reader never compares, say, a fastnet number with a ResNet-18 one silently."""
    model, epochs = row.get("model"), (row.get("recipe") or {}).get("epochs")
    if model == theirs[0] and (epochs is None or epochs >= theirs[1]):
        return "same"
    ours = f"{model}" + (f", {epochs} ep." if epochs is not None else "")
    return f"differs: {ours}"


PAPER_NOTE = ("the paper trains ResNet-18 for 100+ epochs; Regime says where our cell differs (model, epochs). "
              "Its defended CIFAR-10 numbers are all multiples of 1/910 while its undefended ones are multiples of "
              "1/1000 or 1/10000, so its defended ACC is very likely measured on a test subset without the target "
              "class: ACC (ours) is therefore our ACC on non-target test images for a defended cell and our ACC on "
              "all test images for the undefended one")

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
        from .plots import make_figures

        figs = make_figures(rows, out_dir / "figures")
        figs += galleries(sorted({r["dataset"] for r in rows}), data_root, out_dir / "figures", matrix)
    (out_dir / "report.html").write_text(to_html(f"Results: {matrix.name}", intro + tail, sections, figs))
    return out_dir / "tables.md", missing
