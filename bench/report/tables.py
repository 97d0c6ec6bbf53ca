"""The report's tables, one function each, built from result rows (dicts as the store keeps them,
with the matrix's labels): a :class:`Table` is rendered to Markdown, LaTeX and HTML by
:mod:`bench.report.render`.  Which defense is the baseline and which the studied method, and which
further models and evaluations have tables, the components declare (``Defense.is_baseline``,
``Defense.is_reference_method``, ``Defense.extra_model_tables``, ``Evaluation.summary_kind``)."""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from statistics import mean, stdev

from ..results import defense_class, frame, inverted_triggers, is_baseline, is_reference_method
from ..stats import ALPHA, mean_ci, paired_test
from .reference import (
    BB_ATTACKS,
    BB_DEFENSES,
    BB_MODELS,
    BB_REGIME,
    PAPER_NOTE,
    PAPER_REGIME,
    leaderboard,
    paper_numbers,
    regime,
)


def _vals(values) -> list[float]:
    return [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]


def pct(values) -> str:
    """Mean in percent; over several seeds, ± the half-width of the 95 % t-interval and the seed count."""
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

    def column_header(self) -> list[str]:
        """The header row under the groups (every renderer's): a grouped column drops its group's
        name ("AdvrBD ACC" under "AdvrBD" is "ACC")."""
        if not self.groups:
            return list(self.header)
        out, j = [], 0
        for text, span in self.groups:
            out += [h[len(text) + 1:] if text and h.startswith(text + " ") else h for h in self.header[j:j + span]]
            j += span
        return out


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
            for b in inverted_triggers(r).get("budgets", []):
                if b not in budgets:
                    budgets.append(b)
    if not budgets:
        return None
    budgets.sort()
    body = []
    for (a, d), rs in cells.items():
        nb = [inverted_triggers(r) for r in rs if inverted_triggers(r)]
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
    asr = [r["asr"] for (a, d), rs in cells.items() if a == attack for r in rs if is_baseline(r)]
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
    """One section per dataset and model, its tables in reading order; a table with nothing to show
    is left out."""
    paper = paper_numbers()
    sections = []
    for (dataset, model), cells in group(rows).items():
        attacks = list(dict.fromkeys(a for a, _ in cells))
        defenses = list(dict.fromkeys(d for _, d in cells))
        tables = [acc_asr_table(cells, attacks, defenses), per_class_table(cells), paper_table(dataset, cells, paper),
                  *extra_model_tables(cells), detection_table(cells), warnings_table(cells), natural_table(cells),
                  rounds_table(cells), ratings_table(dataset, model, cells), paired_table(cells, attacks, defenses),
                  cost_table(cells)]
        sections.append(Section(f"{dataset} / {model}", [t for t in tables if t is not None]))
    return sections


def acc_asr_table(cells, attacks: list[str], defenses: list[str]) -> Table:
    """The main table: a row per attack and an Average row, an ACC/ASR column pair per defense."""
    missed = not_implanted(cells, attacks)
    body = []
    for a in attacks:
        line = [f"{a} (did not implant)" if a in missed else a]
        for d in defenses:
            rs = cells.get((a, d), [])
            line += [_marked(rs, pct(r["acc"] for r in rs)), pct(r["asr"] for r in rs)]
        body.append(line)
    average, partial = _average_row(cells, [a for a in attacks if a not in missed], defenses)
    body.append(average)
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
    defended = [2 + 2 * j for j, d in enumerate(defenses) if not is_baseline(_first(cells, d))]
    return Table("ACC / ASR (%)", header, body, note, {len(body) - 1},
                 groups=[("", 1)] + [(d, 2) for d in defenses], bold_cells=_lowest(body, defended))


def _first(cells, defense: str) -> dict:
    """A result of ``defense`` (any attack, any seed): what the defense is, for its role."""
    return next(r for (_, d), rs in cells.items() if d == defense for r in rs)


def _average_row(cells, counted: list[str], defenses: list[str]) -> tuple[list[str], bool]:
    """The Average row (mean over the implanted attacks of the per-attack seed means) and whether a
    defense's average covers fewer attacks than the others'."""
    avg, partial = ["Average"], False
    for d in defenses:
        accs = [mean(_vals(r["acc"] for r in cells[(a, d)])) for a in counted if _vals(r["acc"] for r in cells.get((a, d), []))]
        asrs = [mean(_vals(r["asr"] for r in cells[(a, d)])) for a in counted if _vals(r["asr"] for r in cells.get((a, d), []))]
        # an average over fewer attacks than the others' says so: it is not comparable with them
        of = f" ({len(accs)} of {len(counted)})" if accs and len(accs) < len(counted) else ""
        partial |= bool(of)
        avg += [pct([mean(accs)]) + of if accs else "–", pct([mean(asrs)]) + of if asrs else "–"]
    return avg, partial


def per_class_table(cells) -> Table:
    body = [[a, d, pct(r["acc"] for r in rs), pct(r.get("acc_nontarget") for r in rs),
             pct(r.get("target_recall") for r in rs), pct(r["asr"] for r in rs), pct(r.get("ra") for r in rs)]
            for (a, d), rs in cells.items()]
    return Table("ACC on all classes and on non-target images, target-class recall, ASR, RA (%)",
                 ["Attack", "Defense", "ACC", "ACC non-target", "target recall", "ASR", "RA"], body,
                 "ACC non-target: clean test images whose label is not the target; a defense that stops "
                 "predicting the target class keeps it while ACC and the target recall fall")


def paper_table(dataset: str, cells, paper: dict) -> Table | None:
    """Our cells beside the AdvrBD paper's published ones (same dataset, attack and defense names)."""
    body = []
    for (a, d), rs in cells.items():
        key = (dataset, rs[0]["attack_display"], rs[0]["defense_display"])
        if key in paper and a == rs[0]["attack_display"]:
            pa, ps = paper[key]
            # the paper's defended ACC is on test images outside the target class (see the note)
            ours = "acc" if is_baseline(rs[0]) else "acc_nontarget"
            body.append([a, d, pct(r.get(ours) for r in rs), f"{pa:.1f}", pct(r["asr"] for r in rs), f"{ps:.1f}",
                         regime(rs[0], PAPER_REGIME)])
    if not body:
        return None
    return Table("Ours vs the AdvrBD paper", ["Attack", "Defense", "ACC (ours, as the paper's)", "ACC (paper)",
                                              "ASR (ours)", "ASR (paper)", "Regime"], body, PAPER_NOTE)


def extra_model_tables(cells) -> list[Table]:
    """For each further model a defense declares in ``Defense.extra_model_tables`` (AdvrBD's relearn):
    the defended model beside it."""
    declared = {}
    for rs in cells.values():
        for name, (caption, note) in getattr(defense_class(rs[0].get("defense")), "extra_model_tables", {}).items():
            declared.setdefault(name, (caption, note))
    tables = []
    for name, (caption, note) in declared.items():
        body = []
        for (a, d), rs in cells.items():
            ex = [r["extra"][name] for r in rs if name in (r.get("extra") or {})]
            if ex:
                body.append([a, d, pct(r["acc"] for r in rs), pct(r["asr"] for r in rs), pct(x["acc"] for x in ex),
                             pct(x.get("acc_nontarget") for x in ex), pct(x["asr"] for x in ex)])
        if body:
            tables.append(Table(caption, ["Attack", "Defense", "ACC", "ASR", f"ACC {name}", f"ACC non-target {name}",
                                          f"ASR {name}"], body, note))
    return tables


def detection_table(cells) -> Table | None:
    body = []
    for (a, d), rs in cells.items():
        ds = [r["detection"] for r in rs if "detection" in r]
        if ds:
            body.append([a, d, pct(x["tpr"] for x in ds), pct(x["fpr"] for x in ds), pct(x["precision"] for x in ds)])
    if not body:
        return None
    return Table("Detection of poisoned training samples (%)", ["Attack", "Defense", "TPR", "FPR", "precision"], body)


def warnings_table(cells) -> Table | None:
    body = [[a, d, str(r.get("seed", "")), w] for (a, d), rs in cells.items() for r in rs
            for w in r.get("warnings") or []]
    if not body:
        return None
    return Table("Warnings: cells whose numbers need a second look", ["Attack", "Defense", "seed", "warning"], body,
                 "recorded by the defense's own guards, or by the harness when a returned model is at chance on "
                 "the training data")


def cost_table(cells) -> Table:
    by_def = defaultdict(list)
    for (a, d), rs in cells.items():
        by_def[d] += rs
    body = [[d, f"{mean(r['wall_time_s'] for r in rs):.1f}", f"{mean(r['epoch_equivalents'] for r in rs):.2f}",
             f"{100 * max(r.get('clean_data', 0.0) for r in rs):.0f}%"] for d, rs in by_def.items()]
    return Table("Cost per cell and clean data used", ["Defense", "wall time (s)", "epoch-equivalents", "clean data"],
                 body, "the backdoored model's training is shared and not included")


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
    def by_seed(a, d, metric):
        return {r.get("seed"): r.get(metric) for r in cells.get((a, d), [])}

    base = next((d for d in defenses if is_baseline(_first(cells, d))), None)
    method = next((d for d in defenses if is_reference_method(_first(cells, d))), None)
    if base is None and method is None:
        return None
    single = all(len({r.get("seed") for r in rs}) == 1 for rs in cells.values())
    body = []
    for a in attacks:
        for d in defenses:
            if d == base or (a, d) not in cells:
                continue
            line = [a, d, str(len(cells[(a, d)]))]
            for ref in (base, method):
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
