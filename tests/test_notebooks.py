"""The book's real notebooks: their skeleton, and a SMOKE-mode build of the whole site from them.

Static checks read the committed sources (skeleton, parameters cell, no outputs). The site is
then built once (fixture ``smoke_site`` in ``conftest.py``, which ``test_rendered_pages.py``
shares): papermill executes every notebook in SMOKE mode with a per-cell timeout,
jupyter-book renders the executed copies with warnings as errors, and each notebook's page must
exist with its figures, and its results must land in its ``output_dir``.
"""

from __future__ import annotations

import ast
import re

import nbformat
import pytest
from conftest import SMOKE_BUILD_TIMEOUT

from tqslite.book import list_notebooks

NOTEBOOKS = list_notebooks()
IDS = [nb.stem for nb in NOTEBOOKS]
SKELETON = ["Overview", "Prerequisites", "Imports", "Summary", "What's next", "References"]

pytestmark = pytest.mark.skipif(not NOTEBOOKS, reason="no notebooks in notebooks/ yet")


def headings(nb) -> list[tuple[int, str]]:
    out = []
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        in_code = False
        for line in cell.source.splitlines():
            if line.startswith("```"):
                in_code = not in_code
            m = re.match(r"^(#+)\s+(.*)", line)
            if m and not in_code:
                out.append((len(m.group(1)), m.group(2).strip()))
    return out


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_skeleton(path):
    nb = nbformat.read(path, as_version=4)
    hs = headings(nb)
    assert [level for level, _ in hs].count(1) == 1 and hs[0][0] == 1, "one H1 title, first"
    h2 = [text for level, text in hs if level == 2]
    for section in SKELETON:
        assert section in h2, f"missing section '## {section}'"
    order = [h2.index(s) for s in SKELETON]
    assert order[:3] == sorted(order[:3]) and order[3:] == sorted(order[3:]), "sections out of order"
    assert h2[-3:] == SKELETON[3:], "the notebook must end with Summary, What's next, References"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_parameters_cell_and_smoke_switch(path):
    nb = nbformat.read(path, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    tree = ast.parse(tagged[0].source)
    names = set()
    for node in tree.body:
        assert isinstance(node, ast.Assign), f"only assignments in the parameters cell: {ast.unparse(node)}"
        ast.literal_eval(node.value)  # plain literals only (raises otherwise)
        names |= {t.id for t in node.targets}
    assert {"smoke", "output_dir", "seed"} <= names
    after = nb.cells[nb.cells.index(tagged[0]) + 1].source
    assert "TQSLITE_SMOKE" in after, "the cell after the parameters reads TQSLITE_SMOKE"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, "strip outputs before committing"


@pytest.mark.timeout(SMOKE_BUILD_TIMEOUT)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs_in_smoke_mode_and_renders_with_figures(smoke_site, path):
    site, stage = smoke_site
    executed = nbformat.read(stage / "notebooks" / path.name, as_version=4)
    errors = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    page = (site / "notebooks" / f"{path.stem}.html").read_text()
    assert "<img" in page, "the page shows at least one figure"
    title = headings(nbformat.read(path, as_version=4))[0][1]
    assert title.split("`")[0].strip()[:20] in page
    results = list((stage / "outputs" / path.stem).rglob("*"))
    assert any(p.suffix in (".nc", ".json") for p in results), "results are written to output_dir"


@pytest.mark.timeout(SMOKE_BUILD_TIMEOUT)
def test_case_study_page_screenshot(smoke_site, tmp_path):
    """A case study renders in headless Chromium, offline, with its title and its figures."""
    import matplotlib.image
    from test_book import chromium

    cases = [nb for nb in NOTEBOOKS if "_case_" in nb.stem]
    if not cases:
        pytest.skip("no case-study notebook yet")
    site, _ = smoke_site
    page = (site / "notebooks" / f"{cases[0].stem}.html").as_uri()
    shot = tmp_path / "case.png"
    chromium("--window-size=1280,1400", f"--screenshot={shot}", page)
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (1400, 1280) and pixels[..., :3].var() > 1e-4, "the screenshot is blank"
    dom = chromium("--dump-dom", page).stdout
    title = headings(nbformat.read(cases[0], as_version=4))[0][1]
    assert f"<h1>{title.split('`')[0].strip()[:20]}" in dom or title.split("`")[0].strip()[:20] in dom
    assert dom.count("<img") >= 2, "the rendered case study shows its figures"
