"""report.html: one self-contained page with the report's tables, warnings, figures and provenance.

Read two ways: parsed here (no reference leaves the page, every image is the PNG the report wrote, every
table holds the cells of its Markdown twin and table.csv's numbers, the provenance and the warnings are
there), and opened in a headless Chromium as a reader would (tables with their rows, images decoded, no
console errors). The runs: the tiny model evaluated with a step cap that stops every local fit early; and
the committed Fashion-MNIST and digits runs (no training), whose reports add seeds and a method comparison.
"""

import base64
import html.parser
import json
import os
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from gapbench.errors import GapbenchError
from gapbench.evaluate import evaluate_run
from gapbench.report import make_report, report_is_current
from tests.browser import INSTALL_HINT, Browser, find_chromium
from tests.cli_runner import run_cli

RESULTS = Path(__file__).resolve().parent.parent.parent / "results"
FASHION = RESULTS / "cremer2018-small"
DIGITS = RESULTS / "methods-digits"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Each local fit checks every 10 steps and needs 2 checks without a new best to stop: a cap of 10 steps
# stops every one of them before the stopping rule can.
CAPPED = ["evaluate.families=[ffg]", "evaluate.local.max_steps=10", "evaluate.num_points=6",
          "evaluate.diagnostics=[active_units,per_class,generalization]"]
# Shown to two decimals from table.csv's four: the cell is within half a unit of the second decimal of it.
SHOWN = 0.005 + 0.00005


# ---------------------------------------------------------------- reading the page


class Page(html.parser.HTMLParser):
    """What a parse of the page finds: every start tag with its attributes, ids, tables and the text."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags = []  # (tag, {attr: value})
        self.ids = set()
        self.tables = {}  # id -> [(attrs of the tr, [cell texts])], the header row first
        self.text = []
        self._table = None
        self._row = None
        self._cell = None
        self.feed(text)
        self.close()
        self.text = " ".join(self.text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id", f"table-{len(self.tables)}"), [])
        elif tag == "tr" and self._table is not None:
            self._row = (attrs, [])
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row[1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        self.text.append(data)

    def rows(self, table_id):
        """The body rows of a table: (data-quantity or None, [row header, cells...])."""
        return [(attrs.get("data-quantity"), cells) for attrs, cells in self.tables[table_id][1:]]

    def header(self, table_id):
        return self.tables[table_id][0][1]


class MarkedCells(html.parser.HTMLParser):
    """(table id, data-quantity of the row, column index) of every <td class="warn">."""

    def __init__(self, text: str):
        super().__init__()
        self.cells = set()
        self._table = self._quantity = None
        self._column = 0
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = attrs.get("id")
        elif tag == "tr":
            self._quantity, self._column = attrs.get("data-quantity"), 0
        elif tag == "td":
            self._column += 1
            if "warn" in (attrs.get("class") or "").split():
                self.cells.add((self._table, self._quantity, self._column))


def markdown_rows(text: str, table: int = 0):
    """The body rows of the ``table``-th Markdown table of ``text``, each as its cells (bold marks dropped)."""
    tables, current = [], None
    for line in text.splitlines():
        if line.startswith("|"):
            if current is None:
                current = []
                tables.append(current)
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            current.append([c[2:-2] if c.startswith("**") and c.endswith("**") else c for c in cells])
        else:
            current = None
    head, _separator, *body = tables[table]
    return head, body


def _pm(text: str):
    """(mean, se) of a cell 'mean ± se'."""
    mean, se = text.split(" ± ")
    return float(mean), float(se)


# ---------------------------------------------------------------- runs and reports


def _copy(run, dest):
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("report", ".gapbench.lock", ".partial"))
    return dest


@pytest.fixture(scope="module")
def capped(trained_tiny, tmp_path_factory):
    """The tiny run evaluated (test and train split) with a step cap that stops every local fit, and its report."""
    run = _copy(trained_tiny, tmp_path_factory.mktemp("capped") / "run")
    evaluate_run(run, overrides=CAPPED, refresh_report=False)
    evaluate_run(run, overrides=CAPPED + ["evaluate.split=train"], refresh_report=False)
    out = run.parent / "report"
    written = make_report([run], out)
    return run, out, written


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    """The committed Fashion-MNIST FFG and Flow runs (every fit converged, AIS within tolerance), reported."""
    out = tmp_path_factory.mktemp("fashion") / "report"
    runs = [FASHION / "fashion_ffg", FASHION / "fashion_flow"]
    return runs, out, make_report(runs, out)


@pytest.fixture(scope="module")
def methods(tmp_path_factory):
    """The committed digits runs of vae and savae (some bounds out of order): a method comparison, reported."""
    out = tmp_path_factory.mktemp("methods") / "report"
    runs = [DIGITS / "digits_vae", DIGITS / "digits_savae"]
    return runs, out, make_report(runs, out)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """Two copies of the committed FFG run as seeds 0 and 1 of one recipe (the second's gaps shifted), reported."""
    root = tmp_path_factory.mktemp("seeds")
    runs = []
    for seed in (0, 1):
        run = _copy(FASHION / "fashion_ffg", root / f"seed_{seed}")
        recipe = yaml.safe_load((run / "recipe.yaml").read_text())
        (run / "recipe.yaml").write_text(yaml.safe_dump({**recipe, "seed": seed}))
        summary = json.loads((run / "gaps" / "test.json").read_text())
        summary["seed"] = seed
        for stat in summary["stats"].values():
            stat["mean"] += 0.3 * seed
        (run / "gaps" / "test.json").write_text(json.dumps(summary))
        runs.append(run)
    out = root / "report"
    return runs, out, make_report(runs, out)


def _page(out) -> str:
    return (Path(out) / "report.html").read_text(encoding="utf-8")


# ---------------------------------------------------------------- the page, parsed


@pytest.mark.parametrize("which", ["capped", "fashion", "methods", "seeds"])
def test_the_page_refers_to_nothing_outside_itself(which, request):
    _, out, written = request.getfixturevalue(which)
    assert out / "report.html" in written and written[-1] == out / "inputs.json"
    text = _page(out)
    page = Page(text)
    tags = {tag for tag, _ in page.tags}
    assert not tags & {"script", "link", "iframe", "object", "embed", "base", "source", "video", "audio"}
    assert "url(" not in text and "@import" not in text
    for tag, attrs in page.tags:
        for name in ("href", "src", "srcset", "action", "poster", "data"):
            value = attrs.get(name)
            if value is None:
                continue
            if name == "href":
                assert value.startswith("#") and value[1:] in page.ids, (tag, value)  # a section of this page
            else:
                assert name == "src" and tag == "img" and value.startswith("data:image/png;base64,"), (tag, name)
    # every image is the PNG the report wrote, byte for byte, in the order it wrote them
    images = [base64.b64decode(attrs["src"].split(",", 1)[1], validate=True)
              for tag, attrs in page.tags if tag == "img"]
    pngs = [p for p in written if p.suffix == ".png"]
    assert len(pngs) >= 3 and images == [p.read_bytes() for p in pngs]
    assert all(image.startswith(PNG_SIGNATURE) for image in images)
    # and nothing is left half-written
    assert not list(out.glob(".*.tmp"))


def test_the_gaps_table_shows_table_md_and_table_csv(fashion):
    runs, out, _ = fashion
    page = Page(_page(out))
    head, body = markdown_rows((out / "table.md").read_text())
    assert page.header("gaps-table") == head
    rows = page.rows("gaps-table")
    assert [cells for _, cells in rows] == body
    csv = pd.read_csv(out / "table.csv")
    assert [q for q, _ in rows] == list(dict.fromkeys(csv.quantity))
    labels = head[1:]
    for quantity, cells in rows:
        for label, cell in zip(labels, cells[1:]):
            want = csv[(csv.quantity == quantity) & (csv.run == label)].iloc[0]
            if " ± " in cell and "→" not in cell:  # an estimate: mean ± SE over datapoints
                mean, se = _pm(cell)
                assert abs(mean - want["mean"]) <= SHOWN and abs(se - want["se"]) <= SHOWN, (quantity, label)
            elif quantity == "num_finite":
                assert cell == f"{int(want['mean'])} / {int(want['n'])}"
            elif quantity in ("num_order_violations",):
                assert int(cell) == want["mean"]
    # the committed runs' table, as its README shows it
    assert rows[0][1][1:] == ["-119.94 ± 7.65", "-119.27 ± 7.60"]


def test_each_column_has_its_provenance(fashion):
    runs, out, _ = fashion
    text = _page(out)
    page = Page(text)
    for run in runs:
        summary = json.loads((run / "gaps" / "test.json").read_text())
        p = summary["provenance"]
        for value in (p["checkpoint_sha256"], p["git_commit"], p["torch_version"], p["date"],
                      p["data"]["points_sha256"], p["fingerprint"]):
            assert value in page.text, value
        total = sum(summary["stage_seconds"].values())
        assert f"{total:.1f}" in page.text and f"{summary['stage_seconds']['ais']:.1f}" in page.text
        meta = json.loads((run / "meta.json").read_text())
        assert f"{meta['train_seconds']:.1f}" in page.text
        # the recipe, as written, escaped
        assert (run / "recipe.yaml").read_text().strip() in page.text
    # the evaluation's settings, a row per key
    assert re.search(r"<th scope=\"row\">local\.max_steps</th><td>10000</td>", text)
    assert re.search(r"<th scope=\"row\">seed</th><td>0</td>", text)
    assert "No warnings" in page.text and 'class="warnings"' not in text
    # a page with every fit converged marks no cell
    assert not MarkedCells(text).cells


def test_fits_stopped_at_the_cap_are_warned_about_at_the_top_and_in_the_table(capped):
    run, out, _ = capped
    text = _page(out)
    page = Page(text)
    summary = json.loads((run / "gaps" / "test.json").read_text())
    local = summary["convergence"]["local"]["ffg"]
    assert local["at_step_cap"] == 6 and local["max_steps"] == 10  # every fit stopped by the cap
    # the evaluation's own warning, word for word, in the warnings box before the tables
    line = summary["warnings"][0]
    assert "6 of 6 local fits stopped at the step cap" in line
    box = text[text.index('<section id="warnings" class="warnings">'):text.index("</section>")]
    assert html_text(box).count(line) == 1 and text.index(box) < text.index('id="gaps-table"')
    assert "(6 at step cap)" in dict((q, c) for q, c in page.rows("gaps-table"))["converged_ffg"][1]
    assert ("gaps-table", "converged_ffg", 1) in MarkedCells(text).cells
    # the diagnostics and per-class tables are those of diagnostics.md
    md = (out / "diagnostics.md").read_text()
    head, body = markdown_rows(md, 0)
    assert [cells for _, cells in page.rows("diagnostics-table")] == body
    head, body = markdown_rows(md, 1)
    assert page.header("per-class-table-0") == head and [c for _, c in page.rows("per-class-table-0")] == body
    assert len(body) == pd.read_csv(out / "per_class.csv").shape[0]


def html_text(fragment: str) -> str:
    return Page(fragment).text


def test_the_method_comparison_and_its_warnings(methods):
    runs, out, _ = methods
    text = _page(out)
    page = Page(text)
    head, body = markdown_rows((out / "methods.md").read_text())
    assert page.header("methods-table") == head == ["", "vae", "savae"]
    assert [cells for _, cells in page.rows("methods-table")] == body
    assert ("gaps-table", "num_order_violations", 2) in MarkedCells(text).cells  # savae's column
    savae = json.loads((runs[1] / "gaps" / "test.json").read_text())
    assert f"bounds out of order at {savae['num_order_violations']} of 100 datapoints" in page.text
    assert "figure-gaps_by_method" in page.ids and "figure-validation_curves" in page.ids


def test_the_seeds_table(seeds):
    _, out, _ = seeds
    page = Page(_page(out))
    _, body = markdown_rows((out / "seeds.md").read_text())
    assert [cells for _, cells in page.rows("seeds-table")] == body
    cells = dict(page.rows("seeds-table"))["log_px"]
    mean, se = _pm(cells[1])
    assert mean == pytest.approx(-119.94 + 0.15, abs=SHOWN) and se == pytest.approx(0.15, abs=SHOWN)


def test_text_is_escaped(tmp_path):
    run = _copy(FASHION / "fashion_ffg", tmp_path / "run")
    summary = json.loads((run / "gaps" / "test.json").read_text())
    summary["run"] = 'a <b>"bold"</b> & co'
    summary["dataset"] = "<i>x</i>"
    (run / "gaps" / "test.json").write_text(json.dumps(summary))
    make_report([run], tmp_path / "report")
    text = _page(tmp_path / "report")
    assert "<b>\"bold\"</b>" not in text and "<i>x</i>" not in text
    assert "a &lt;b&gt;&quot;bold&quot;&lt;/b&gt; &amp; co" in text and "&lt;i&gt;x&lt;/i&gt; / FFG" in text


def test_a_page_that_fails_leaves_no_report(monkeypatch, tmp_path):
    import gapbench.report_html

    def broken(*args, **kwargs):
        raise GapbenchError("the page cannot be made")

    monkeypatch.setattr(gapbench.report_html, "render_report", broken)
    with pytest.raises(GapbenchError):
        make_report([FASHION / "fashion_ffg"], tmp_path / "report")
    assert not (tmp_path / "report").exists()


def test_the_cli_writes_and_names_the_page(capped, tmp_path, capsys):
    run, _, _ = capped
    out = tmp_path / "cli"
    code, stdout, err = run_cli(["report", run, "--out", out], capsys)
    assert code == 0, err
    assert f"opens offline: {out / 'report.html'}" in stdout
    assert (out / "report.html").is_file() and report_is_current([run], out)
    (out / "report.html").unlink()
    assert not report_is_current([run], out)  # a report folder without its page is made again


# ---------------------------------------------------------------- the page, in a browser

PAGE_FACTS = """(() => {
  const top = s => document.querySelector(s).getBoundingClientRect().top;
  return {
    title: document.title,
    tables: Object.fromEntries([...document.querySelectorAll('table[id]')].map(t => [t.id, t.tBodies[0].rows.length])),
    columns: document.querySelector('#gaps-table thead tr').cells.length,
    images: [...document.images].map(i => ({figure: i.closest('figure').id, complete: i.complete,
                                            width: i.naturalWidth, height: i.naturalHeight})),
    links_to_nowhere: [...document.querySelectorAll('a[href]')]
                        .filter(a => !document.querySelector(a.getAttribute('href'))).map(a => a.href),
    warnings: document.querySelector('#warnings').innerText,
    warnings_first: top('#warnings') < top('#gaps-table') && top('#warnings') < top('nav'),
    marked: [...document.querySelectorAll('td.warn')].map(td => td.parentElement.dataset.quantity),
    scripts: document.scripts.length,
  };
})()"""


@pytest.fixture(scope="module")
def chromium():
    path = find_chromium()
    if path is None:
        message = f"no Chromium on PATH for the report.html browser checks; {INSTALL_HINT}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def _open(chromium, out):
    with Browser(chromium, timeout=60) as browser:
        session = browser.open((Path(out) / "report.html").resolve().as_uri())
        facts = browser.evaluate(session, PAGE_FACTS)
        errors = browser.errors()
    return facts, errors


@pytest.mark.parametrize("which", ["capped", "methods"])
def test_a_browser_shows_the_tables_figures_and_warnings(which, chromium, request):
    runs, out, written = request.getfixturevalue(which)
    facts, errors = _open(chromium, out)
    assert errors == [], "the browser reported errors opening report.html:\n" + "\n".join(errors)
    assert facts["scripts"] == 0 and facts["links_to_nowhere"] == []
    head, body = markdown_rows((out / "table.md").read_text())
    assert facts["tables"]["gaps-table"] == len(body) and facts["columns"] == len(head)
    if (out / "diagnostics.md").is_file():
        assert facts["tables"]["diagnostics-table"] == len(markdown_rows((out / "diagnostics.md").read_text())[1])
    if (out / "methods.md").is_file():
        assert facts["tables"]["methods-table"] == len(markdown_rows((out / "methods.md").read_text())[1])
    pngs = [p.stem for p in written if p.suffix == ".png"]
    assert [i["figure"] for i in facts["images"]] == [f"figure-{name}" for name in pngs]
    for image, name in zip(facts["images"], pngs):
        assert image["complete"] and image["width"] > 0 and image["height"] > 0, f"the browser cannot draw {name}"
    assert facts["warnings_first"]
    if which == "capped":
        assert "local fits stopped at the step cap" in facts["warnings"] and "converged_ffg" in facts["marked"]
    else:
        assert "bounds out of order at" in facts["warnings"] and "num_order_violations" in facts["marked"]


def test_the_browser_check_catches_a_page_that_loads_from_outside(chromium, tmp_path):
    """The check above can fail: a page that asks for a file and a server, and has a script that errs."""
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><head><meta charset="utf-8">'
                    "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:\">"
                    '</head><body><img src="http://gapbench.invalid/x.png"><img src="missing.png">'
                    "</body></html>")
    with Browser(chromium, timeout=60) as browser:
        session = browser.open(page.as_uri())
        images = browser.evaluate(session, "[...document.images].map(i => i.naturalWidth)")
        errors = browser.errors()
    assert images == [0, 0]
    assert len(errors) == 2 and all("Content Security Policy" in e for e in errors), errors


def test_a_browser_that_does_not_answer_is_killed_with_a_clear_message(chromium):
    with Browser(chromium, timeout=1) as browser:
        browser.open("about:blank")
        with pytest.raises(AssertionError, match="waited 1 s for the event Page.neverFired from the browser"):
            browser.wait_event("Page.neverFired")
        assert browser._proc.poll() is not None  # killed, not left behind
