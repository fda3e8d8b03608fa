"""The built book as a reader sees it: every HTML page is scanned for four kinds of defect.

1. **Raw LaTeX**: a ``$...$`` pair, or a LaTeX command such as ``\\rho``, in the text of a page
   outside a math element. MathJax renders only the math elements that Sphinx writes
   (``<span class="math">``, ``<div class="math">``); anything else is shown as typed.
2. **Python warning blocks** in a cell's output: ``UserWarning: ...``, ``RuntimeWarning``, a
   ``warnings.warn(`` line. A warning the reader should see is printed as a sentence instead.
3. **Paths of the build machine**: the repository's absolute path, ``/tmp/``, ``/root/``, home
   folders, ``site-packages``.
4. **numpy reprs** where a plain value was meant: ``np.float64(0.5)``, ``np.str_('a')``,
   ``array([...])`` in an output or in the prose.

The code of the notebooks (their input cells) is not scanned for 1, 2 and 4: code may contain
``$`` (matplotlib labels), ``warnings`` and ``np.float64(``. It is scanned for machine paths.

The scanner is tested on small pages with known defects first (cheap, always run); then every
page of the real SMOKE site, the one ``tests/test_notebooks.py`` builds (fixture ``smoke_site`` in
``conftest.py``, built once per test session), is scanned. Set ``TQSLITE_SITE`` to the folder of
a site that is already built (``book/_build/html``) to scan that one instead of building.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from bs4 import BeautifulSoup
from conftest import SMOKE_BUILD_TIMEOUT

from tqslite.book import REPO_ROOT

# ----------------------------------------------------------------------------------------------
# The scanner
# ----------------------------------------------------------------------------------------------

#: Two dollar signs around something on one line, or a double dollar: math that was not parsed.
RAW_DOLLAR = re.compile(r"\$\$|\$[^$\n]+\$")
#: A LaTeX command left in the text: a backslash and letters (``\rho``, ``\varepsilon``), or a
#: MathJax delimiter ``\(`` that no math element wraps.
RAW_COMMAND = re.compile(r"\\[A-Za-z]{2,}|\\[()\[\]]")
#: A Python warning in an output: ``UserWarning: ...``, ``warnings.warn(``.
WARNING = re.compile(r"\b[A-Z][A-Za-z]*Warning\b|\bwarnings\.warn\(")
#: numpy scalar and array reprs: ``np.float64(``, ``np.str_(``, ``np.int64(``, ``array(``.
NUMPY_REPR = re.compile(r"\bnp\.(?:float|int|uint|bool|str|complex|datetime|timedelta)\w*\(|(?<![\w.])array\(")


def machine_paths(repo_root: Path = REPO_ROOT) -> re.Pattern:
    """The paths of the build machine that must not appear on a page."""
    parts = [re.escape(str(repo_root)), r"/tmp/", r"/root/", r"/home/\w", r"/Users/\w", r"site-packages",
             r"[A-Z]:\\\\"]
    return re.compile("|".join(parts))


def _text(node) -> str:
    return node.get_text(" ", strip=False)


def _snippet(text: str, match: re.Match, width: int = 50) -> str:
    start, end = max(0, match.start() - width), min(len(text), match.end() + width)
    return " ".join(text[start:end].split())


def page_defects(html: str, paths: re.Pattern | None = None) -> list[str]:
    """Return every defect on one page, each as ``"kind: ...context..."``; empty if none.

    Parameters
    ----------
    html : str
        The page, as written by Sphinx.
    paths : re.Pattern, optional
        What counts as a path of the build machine (default :func:`machine_paths`).

    Returns
    -------
    list of str
        One line per defect: its kind (``raw LaTeX``, ``Python warning``, ``machine path``,
        ``numpy repr``) and the text around it.
    """
    paths = paths or machine_paths()
    soup = BeautifulSoup(html, "html.parser")
    body = soup.body or soup
    for tag in body.find_all(["script", "style", "noscript", "mjx-container"]):
        tag.decompose()
    found = []

    # 3. Paths: anywhere in the body, code included, and in the links and images.
    text = _text(body)
    found += [f"machine path: {_snippet(text, m)}" for m in paths.finditer(text)]
    for tag in body.find_all(src=True) + body.find_all(href=True):
        for attr in ("src", "href"):
            value = tag.get(attr) or ""
            if paths.search(value) or value.startswith("file:"):
                found.append(f"machine path: <{tag.name} {attr}={value!r}>")

    # The notebooks' code, the math, and the headerlink anchors are not prose.
    for tag in body.select("div.cell_input, span.math, div.math, a.headerlink"):
        tag.decompose()

    # 2 and 4: in the cells' outputs.
    for output in body.select("div.cell_output"):
        out_text = _text(output)
        found += [f"Python warning: {_snippet(out_text, m)}" for m in WARNING.finditer(out_text)]

    # 1 and 4: in everything that is left (prose, tables, outputs), except inline code, which
    # shows code as typed on purpose (`$x$` in a sentence about code).
    for tag in body.select("code, pre, div.highlight"):
        if not tag.find_parent("div", class_="cell_output"):
            tag.decompose()
    text = _text(body)
    found += [f"raw LaTeX: {_snippet(text, m)}" for m in RAW_DOLLAR.finditer(text)]
    rest = RAW_DOLLAR.sub(" ", text)  # a command inside a dollar pair is the same defect
    found += [f"raw LaTeX: {_snippet(rest, m)}" for m in RAW_COMMAND.finditer(rest)]
    found += [f"numpy repr: {_snippet(text, m)}" for m in NUMPY_REPR.finditer(text)]
    return found


def site_defects(site: Path) -> dict[str, list[str]]:
    """Scan every HTML page of a built site; return ``{page: defects}`` for the pages that have some."""
    site = Path(site)
    pages = sorted(p for p in site.rglob("*.html") if "_static" not in p.parts and "_sources" not in p.parts)
    if not pages:
        raise FileNotFoundError(f"no HTML page under {site}: build the site first")
    report = {}
    for page in pages:
        defects = page_defects(page.read_text(encoding="utf-8"))
        if defects:
            report[str(page.relative_to(site))] = defects
    return report


# ----------------------------------------------------------------------------------------------
# The scanner on pages with known defects
# ----------------------------------------------------------------------------------------------


def page(body: str) -> str:
    return f"<html><head><title>t</title><script>var x = '$a$ /tmp/x';</script></head><body>{body}</body></html>"


def output(inner: str) -> str:
    return f'<div class="cell_output docutils container"><div class="output text_markdown">{inner}</div></div>'


CODE_CELL = ('<div class="cell_input docutils container"><div class="highlight"><pre>'
             'ax.set_xlabel("$\\lambda_1$"); import warnings; np.float64(1)</pre></div></div>')
MATH = '<p>A rate <span class="math notranslate nohighlight">\\(\\lambda_1 = 0.9\\)</span> per step.</p>'


@pytest.mark.parametrize("body, kind", [
    (output("<p>the score $\\rho = 0.96$ at lead 1</p>"), "raw LaTeX"),
    (output("<p>a typical divergence of $e^{c},\\varepsilon_u$</p>"), "raw LaTeX"),
    ("<p>escaped delimiters (\\rho) are raw too</p>", "raw LaTeX"),
    ("<p>doubled ones \\(\\rho\\) outside a math element as well</p>", "raw LaTeX"),
    ("<li>a display $$x = y$$ not parsed</li>", "raw LaTeX"),
    (output('<div class="output stderr"><pre>/x/y.py:12: UserWarning: scale below float16</pre></div>'),
     "Python warning"),
    (output("<pre>RuntimeWarning: divide by zero encountered in log</pre>"), "Python warning"),
    (output("<pre>  warnings.warn(message)</pre>"), "Python warning"),
    (output("<pre>results are written to /tmp/book/stage/outputs/01</pre>"), "machine path"),
    (f"<p>DATA_DIR = PosixPath('{REPO_ROOT}/data')</p>", "machine path"),
    (output("<pre>/usr/lib/python3/site-packages/torch/nn.py:3</pre>"), "machine path"),
    ('<img src="file:///root/figure.png"/>', "machine path"),
    (output("<p>flagged [np.str_('blocks.0.norm.bias'), np.str_('blocks.1.fc1.bias')]</p>"), "numpy repr"),
    (output("<p>gamma np.float64(0.123) at lead np.int64(3)</p>"), "numpy repr"),
    (output("<pre>rho = array([0.96, 0.5])</pre>"), "numpy repr"),
    ("<td>np.int64(3)</td>", "numpy repr"),
], ids=["dollar-in-output", "dollar-with-eaten-backslash", "escaped-paren", "doubled-paren", "double-dollar",
        "UserWarning", "RuntimeWarning", "warnings.warn", "tmp-path", "repo-path", "site-packages",
        "file-uri", "np-str", "np-float-int", "array", "np-in-table"])
def test_scanner_finds_the_defect(body, kind):
    defects = page_defects(page(MATH + CODE_CELL + body))
    assert defects, f"missed a {kind} in {body!r}"
    assert all(d.startswith(kind) for d in defects), defects


@pytest.mark.parametrize("body", [
    MATH,
    CODE_CELL,
    '<div class="math notranslate nohighlight">\\[\\Lambda_u(t) = \\frac{1}{N}\\]</div>',
    "<p>Type <code>$x$</code> in a markdown cell, or <code>warnings.warn(msg)</code>.</p>",
    output("<p>tqslite warned: scales below float16's smallest normal number were rounded up.</p>"),
    output("<pre>results are written to ../outputs/01_dynamical_systems</pre>"),
    "<p>The prose may name a DeprecationWarning or a numpy array (the word) safely.</p>",
    output("<pre>gamma 0.123, best unit blocks.0, rho [0.96, 0.5]</pre>"),
    '<a class="headerlink" href="#the-score" title="Link">#</a><p>a cost of 5 dollars</p>',
], ids=["math-span", "code-cell", "math-div", "inline-code", "warning-as-sentence", "relative-path",
        "warning-named-in-prose", "plain-values", "headerlink"])
def test_scanner_passes_clean_pages(body):
    assert page_defects(page(body)) == []


def test_scanner_reads_a_site(tmp_path):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "index.html").write_text(page(MATH))
    (tmp_path / "notebooks" / "03.html").write_text(page(output("<p>$\\rho$</p>")))
    (tmp_path / "_static").mkdir()
    (tmp_path / "_static" / "ignored.html").write_text(page("<p>$\\rho$</p>"))
    report = site_defects(tmp_path)
    assert list(report) == [str(Path("notebooks") / "03.html")]
    with pytest.raises(FileNotFoundError, match="no HTML page"):
        site_defects(tmp_path / "_static" / "nothing")


# ----------------------------------------------------------------------------------------------
# The real book
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def book_site(request) -> Path:
    """The built SMOKE site of the real book: ``TQSLITE_SITE`` if set, else the session's build."""
    given = os.environ.get("TQSLITE_SITE")
    if given:
        return Path(given)
    site, _ = request.getfixturevalue("smoke_site")
    return site


@pytest.mark.timeout(SMOKE_BUILD_TIMEOUT)
def test_no_page_shows_raw_latex_warnings_paths_or_numpy_reprs(book_site):
    report = site_defects(book_site)
    lines = [f"{page}: {defect}" for page, defects in report.items() for defect in defects]
    assert not lines, (f"{len(lines)} defect(s) on {len(report)} page(s) of {book_site}:\n"
                       + "\n".join(lines))
