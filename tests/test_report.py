import csv

from conftest import REPO

from bench.report import build_sections, paper_numbers, to_html, to_latex, to_markdown


def _row(attack, defense, acc, asr, seed=0, dataset="cifar10", **extra):
    return {"dataset": dataset, "model": "small_cnn", "attack": attack.lower(), "attack_name": attack,
            "attack_display": attack, "defense": "undefended" if defense == "No Defense" else defense.lower(), "defense_name": defense,
            "defense_display": defense, "seed": seed, "acc": acc, "asr": asr, "wall_time_s": 1.0,
            "epoch_equivalents": 2.0, "clean_data": 0.0, **extra}


def test_paper_numbers_match_the_reference_csv():
    paper = paper_numbers()
    with open(REPO / "bench" / "reference" / "advrbd_paper_tables.csv") as f:
        first = next(csv.DictReader(f))
    assert paper[(first["dataset"], first["attack"], first["defense"])] == (float(first["acc"]), float(first["asr"]))


def test_tables_average_seeds_and_attacks_and_show_the_paper():
    rows = [_row("BadNet", "No Defense", 0.90, 0.95, 0), _row("BadNet", "No Defense", 0.80, 0.85, 1),
            _row("Blend", "No Defense", 0.70, 0.50),
            _row("BadNet", "ABL", 0.6, 0.1, detection={"tpr": 0.5, "fpr": 0.1, "precision": 0.8, "flagged": 3})]
    [section] = build_sections(rows)
    main = section.tables[0]
    assert main.header == ["Attack", "No Defense ACC", "No Defense ASR", "ABL ACC", "ABL ASR"]
    assert main.rows[0][:3] == ["BadNet", "85.0±63.5 (n=2)", "90.0±63.5 (n=2)"]
    assert main.rows[-1][:3] == ["Average", "77.5", "70.0"]  # mean of per-attack means
    assert main.rows[1][3:] == ["–", "–"]  # Blend has no ABL cell
    cmp = next(t for t in section.tables if "paper" in t.caption)
    pa, ps = paper_numbers()[("cifar10", "BadNet", "No Defense")]
    assert ["BadNet", "No Defense", "85.0±63.5 (n=2)", f"{pa:.1f}", "90.0±63.5 (n=2)", f"{ps:.1f}",
            "differs: small_cnn"] in cmp.rows
    det = next(t for t in section.tables if "Detection" in t.caption)
    assert det.rows == [["BadNet", "ABL", "50.0", "10.0", "80.0"]]


def test_non_target_accuracy_and_relearn_tables():
    rows = [_row("BadNet", "AdvrBD", 0.80, 0.02, acc_nontarget=0.88, target_recall=0.1, ra=0.7,
                 extra={"relearn": {"acc": 0.84, "acc_nontarget": 0.87, "asr": 0.01}}),
            _row("BadNet", "No Defense", 0.90, 0.95, acc_nontarget=0.9, target_recall=0.92, ra=0.04)]
    [section] = build_sections(rows)
    per = next(t for t in section.tables if "non-target" in t.caption)
    assert ["BadNet", "AdvrBD", "80.0", "88.0", "10.0", "2.0", "70.0"] in per.rows
    assert ["BadNet", "No Defense", "90.0", "90.0", "92.0", "95.0", "4.0"] in per.rows
    rel = next(t for t in section.tables if "Table IV" in t.caption)
    assert rel.rows == [["BadNet", "AdvrBD", "80.0", "2.0", "84.0", "87.0", "1.0"]]
    cmp = next(t for t in section.tables if "paper" in t.caption)
    assert "1/910" in cmp.note
    # like with like: a defended cell's ACC is its non-target ACC (the paper's subset), the baseline's all-class ACC
    pa = paper_numbers()[("cifar10", "BadNet", "AdvrBD")][0]
    assert ["BadNet", "AdvrBD", "88.0", f"{pa:.1f}", "2.0"] == next(r for r in cmp.rows if r[1] == "AdvrBD")[:5]
    assert next(r for r in cmp.rows if r[1] == "No Defense")[2] == "90.0"


def test_regime_marks_what_differs_from_the_reference():
    from bench.report import PAPER_REGIME, regime

    assert regime({"model": "resnet18", "recipe": {"epochs": 100}}, PAPER_REGIME) == "same"
    assert regime({"model": "resnet18", "recipe": {"epochs": 30}}, PAPER_REGIME) == "differs: resnet18, 30 ep."
    assert regime({"model": "fastnet", "recipe": {"epochs": 10}}, PAPER_REGIME) == "differs: fastnet, 10 ep."


def test_renderers_carry_the_same_numbers():
    sections = build_sections([_row("BadNet", "No Defense", 0.9, 0.95)])
    md, tex = to_markdown(sections), to_latex(sections)
    page = to_html("t", "intro", sections, [])
    for text in (md, tex, page):
        assert "90.0" in text and "95.0" in text
    assert "\\begin{tabular}" in tex and "\\%" in tex
    assert page.startswith("<!doctype html>") and "<table>" in page


def _latex_rows(rows_per_attack=2, defenses=12):
    names = ["undefended"] + [f"D{i}" for i in range(defenses - 1)]
    return [_row(a, d, 0.9 - 0.01 * i, 0.5 - 0.03 * i, seed=s) for a in ["BadNet", "Blend"][:rows_per_attack]
            for i, d in enumerate(names) for s in (0, 1)]


def test_latex_has_booktabs_two_level_headers_labels_bold_best_and_fits_the_width(tmp_path):
    import re
    import shutil
    import subprocess

    tex = to_latex(build_sections(_latex_rows()))
    assert tex.count("\\begin{table}") == tex.count("\\end{table}") > 0
    assert tex.count("\\begin{tabular}") == tex.count("\\end{tabular}")
    labels = re.findall(r"\\label\{([^}]+)\}", tex)
    assert len(labels) == tex.count("\\begin{table}") == len(set(labels))
    main = tex.split("\\end{table}")[0]
    assert "\\multicolumn{2}{c}{undefended}" in main and "\\cmidrule(lr){2-3}" in main
    assert "\\resizebox{\\textwidth}{!}{%" in main  # 25 columns
    assert "Attack & ACC & ASR & ACC & ASR" in main
    # every row has as many cells as the header
    for line in main.splitlines():
        if line.startswith(("BadNet", "Blend", "Average")):
            assert line.count(" & ") == 24
    # the best (lowest) defended ASR is bold: D10's (17.0), the last column
    assert re.search(r"\\textbf\{17\.0\$\\pm\$0\.0 \(n=2\)\} \\\\$", main.splitlines()[[
        i for i, l in enumerate(main.splitlines()) if l.startswith("BadNet")][0]])
    if shutil.which("pdflatex"):
        doc = "\\documentclass{article}\\usepackage{booktabs,graphicx}\\begin{document}\n" + tex + "\\end{document}\n"
        (tmp_path / "t.tex").write_text(doc)
        r = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "t.tex"], cwd=tmp_path,
                           text=True, capture_output=True, timeout=120)
        assert r.returncode == 0, r.stdout[-2000:]


def test_an_average_over_fewer_attacks_says_so_and_bold_is_explained():
    rows = [_row(a, d, 0.9, asr) for a, d, asr in [("BadNet", "No Defense", 0.9), ("Blend", "No Defense", 0.8),
                                                    ("BadNet", "ABL", 0.1), ("Blend", "ABL", 0.5),
                                                    ("BadNet", "NONE", 0.2)]]  # NONE's Blend cell is missing
    main = build_sections(rows)[0].tables[0]
    assert main.rows[-1] == ["Average", "90.0", "85.0", "90.0", "30.0", "90.0 (1 of 2)", "20.0 (1 of 2)"]
    assert "Average (k of n)" in main.note and "bold: the lowest ASR" in main.note
    complete = build_sections(rows[:4])[0].tables[0]
    assert "(k of n)" not in complete.note and "of 2" not in " ".join(complete.rows[-1])


def test_round_table_follows_the_enhancement_round_by_round():
    def obs(t, acc, asr, tpr=None, fpr=None, share=None, auroc=None):
        out = [{"tag": f"round{t}", "acc": acc, "asr": asr}]
        if tpr is not None:
            out.append({"tag": f"identify{t}", "kind": "flags", "tpr": tpr, "fpr": fpr, "precision": 0.5, "flagged": 9})
        if share is not None:
            out.append({"tag": f"dc{t}", "kind": "flags", "tpr": 0.0, "fpr": 0.1, "precision": share, "flagged": 4})
        if auroc is not None:
            out.append({"tag": f"score{t}", "kind": "scores", "auroc": auroc})
        return out

    course = obs(0, 0.9, 0.95, 1.0, 0.9) + obs(1, 0.6, 0.97, 0.99, 0.55, 0.0, 0.81) + obs(2, 0.3, 0.98, 0.98, 0.2, 0.025, 0.74)
    rows = [_row("BadNet", "AdvrBD", 0.8, 0.02, observations=course),
            _row("BadNet", "No Defense", 0.9, 0.95),
            # a defense with two observed models but no per-round identification has no rows here
            _row("BadNet", "NONE", 0.9, 0.05, observations=[{"tag": "round0", "acc": 0.9, "asr": 0.9},
                                                             {"tag": "round1", "acc": 0.9, "asr": 0.1}])]
    [section] = build_sections(rows)
    table = next(t for t in section.tables if "per round" in t.caption)
    assert table.rows == [["BadNet", "AdvrBD", "0", "0", "90.0", "95.0", "100.0", "90.0", "–", "–"],
                          ["BadNet", "AdvrBD", "0", "1", "60.0", "97.0", "99.0", "55.0", "0.0", "0.81"],
                          ["BadNet", "AdvrBD", "0", "2", "30.0", "98.0", "98.0", "20.0", "2.5", "0.74"]]
    assert not any("per round" in t.caption for t in build_sections(rows[1:])[0].tables)
