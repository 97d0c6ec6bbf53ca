"""The report as a reader gets it: ``report.html`` rendered by headless Chromium at 1,400 px, and
``tables.tex`` compiled by pdflatex.  ``.ci/run`` installs both (Debian's ``chromium`` and
``texlive-latex-recommended``); where they are missing these tests are skipped."""
import json
import shutil
import struct
import subprocess

import pytest
import yaml

from bench.cli import main
from conftest import matrix_dict

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
#: the flags a root process in a closed network needs (no sandbox, no background connections)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]
WIDTH = 1400

#: run in the page after it loads: every table's overflow, every figure's decoded size
PROBE = """<script>
window.addEventListener('load', () => {
  const tables = [...document.querySelectorAll('table')].map(t => {
    const box = t.closest('.scroll') || t.parentElement;
    const first = [...t.querySelectorAll('td:first-child')].map(td => ({text: td.textContent,
                                                                     fits: td.scrollWidth <= td.clientWidth}));
    return {caption: (t.caption || {}).textContent || '', width: t.scrollWidth, visible: box.clientWidth,
            right: t.getBoundingClientRect().right, scrolls: getComputedStyle(box).overflowX, first_column: first};
  });
  const images = [...document.images].map(i => ({alt: i.alt, complete: i.complete, w: i.naturalWidth,
                                                 shown: i.getBoundingClientRect().width}));
  const out = document.createElement('pre');
  out.id = 'probe';
  out.textContent = JSON.stringify({tables, images, viewport: document.documentElement.clientWidth});
  document.body.appendChild(out);
});
</script>"""


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A real report: a small run with two attacks, the baseline, a fine-tuning and AdvrBD (its
    score figure), through the CLI."""
    tmp = tmp_path_factory.mktemp("rendered")
    m = tmp / "m.yaml"
    m.write_text(yaml.safe_dump(matrix_dict(
        attacks=["badnet", "blend"], reserve_ratio=0.1, description=DESCRIPTION,
        defenses=["undefended", {"name": "finetuning", "epochs": 1},
                  {"name": "advrbd", "rounds": 1, "pgd_steps": 1, "relearn_epochs": 1, "unlearn_passes": 1}])))
    assert main(["run", str(m), "--output", str(tmp / "runs"), "--report-dir", str(tmp / "rep"),
                 "--threads", "1"]) == 0
    return tmp / "rep" / "t"


#: a matrix description as YAML's folded text gives it: what a reader should know of the numbers
DESCRIPTION = "A first look, not a verdict.\nAdvrBD here depends on the draw & the thread count."


@pytest.mark.slow
def test_the_matrix_description_heads_the_report(report):
    """The description (a matrix's place to say what its numbers can and cannot tell) is the first
    paragraph of tables.md and of report.html, on one line, escaped in HTML."""
    one_line = " ".join(DESCRIPTION.split())
    assert (report / "tables.md").read_text().split("\n\n")[1] == one_line
    page = (report / "report.html").read_text().replace("\n", "")
    assert f"<h1>Results: t</h1><p>{one_line.replace('&', '&amp;')}</p><p>ACC and ASR" in page


def _png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def _chromium(tmp_path) -> list[str]:
    return [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={WIDTH},900",
            "--virtual-time-budget=5000"]


def _probe(page: str, tmp_path) -> dict:
    """What the page looks like in Chromium at WIDTH px: its tables' widths and its images."""
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    dom = subprocess.run([*_chromium(tmp_path), "--dump-dom", probe.as_uri()], capture_output=True, text=True,
                         timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    return json.loads(dom.stdout.split("<pre id=\"probe\">")[1].split("</pre>")[0].replace("&quot;", '"')
                      .replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (.ci/run installs Debian's chromium)")
def test_the_widest_table_of_the_quick_matrix_fits_1400_px(tmp_path):
    """8 attacks (with parameters in their labels) x 12 defense entries, as the quick matrix has:
    the ACC/ASR table is read without scrolling, and no cell wraps its warning mark."""
    from bench.report import build_sections, to_html
    from test_report import _row

    attacks = ["BadNet", "Blend", "SIG(delta=0.6)", "WaNet(poison_ratio=0.1, s=2.0)", "PhysicalBA", "TaCT",
               "AdaptiveBlend", "AdaptivePatch(poison_ratio=0.1)"]
    defenses = ["No Defense", "AdvrBD", "AdvrBD-conf0.9", "NONE", "FineTuning", "FinePruning", "FinePruning-L2",
                "CutMix", "CLP", "DBR", "SCAnFT", "ABL"]
    # the widest numbers there are (100.0) and a warning mark on a whole column
    rows = [_row(a, d, 0.888, 1.0, warnings=["w"] if d == "AdvrBD" else []) for a in attacks for d in defenses]
    found = _probe(to_html("quick", "intro", build_sections(rows), []), tmp_path)
    main = next(t for t in found["tables"] if t["caption"].startswith("ACC / ASR"))
    assert main["width"] <= main["visible"] and main["right"] <= found["viewport"], main
    assert all(c["fits"] for c in main["first_column"]), main["first_column"]  # labels wrap, never spill


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (.ci/run installs Debian's chromium)")
def test_report_html_in_chromium_has_every_table_visible_and_every_figure_loaded(report, tmp_path):
    page = (report / "report.html").read_text()
    found = _probe(page, tmp_path)
    run = _chromium(tmp_path)
    captions = [t["caption"] for t in found["tables"]]
    assert sum("ACC / ASR" in c for c in captions) == 1 and len(captions) == page.count("<table>")
    for t in found["tables"]:  # nothing is cut off: a table fits, or its box scrolls and stays in the window
        assert t["width"] <= t["visible"] or t["scrolls"] in ("auto", "scroll"), t
        assert t["right"] <= found["viewport"] or t["scrolls"] in ("auto", "scroll"), t
    assert found["images"] and page.count("<img") == len(found["images"])
    for img in found["images"]:
        assert img["complete"] and img["w"] > 0 and 0 < img["shown"] <= found["viewport"], img
    shot = tmp_path / "report.png"
    r = subprocess.run([*run, f"--screenshot={shot}", (report / "report.html").as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    assert _png_size(shot)[0] == WIDTH


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="no pdflatex here (.ci/run installs TeX Live)")
def test_report_tables_tex_compiles(report, tmp_path):
    tex = (report / "tables.tex").read_text()
    doc = "\\documentclass{article}\\usepackage{booktabs,graphicx}\\begin{document}\n" + tex + "\\end{document}\n"
    (tmp_path / "doc.tex").write_text(doc)
    r = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:]
    assert (tmp_path / "doc.pdf").stat().st_size > 1000
    assert "Overfull \\hbox" not in r.stdout, "a table runs into the margin"
