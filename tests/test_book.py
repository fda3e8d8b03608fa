"""Tests of the book pipeline, tqslite/book/: executing notebooks and building the site.

The site is built once per module (fixture ``site``) from the real pages in book/ and two tiny
notebooks written here, so these tests take well under two minutes however long the real
notebooks run (those are executed by ``make book`` and by their own tests).
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat
import pytest
import yaml

import tqslite
import tqslite.book.site as site_tooling
from tqslite import book
from tqslite.book import BookBuildError, NotebookError, build_site, execute_notebook, find_notebook

# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def write_notebook(path: Path, cells) -> Path:
    """Write a notebook made of ``("md" | "code" | "params", source)`` cells; return its path."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for kind, source in cells:
        if kind == "md":
            nb.cells.append(nbformat.v4.new_markdown_cell(source))
        else:
            cell = nbformat.v4.new_code_cell(source)
            if kind == "params":
                cell.metadata["tags"] = ["parameters"]
            nb.cells.append(cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def cell_text(cell) -> str:
    """Everything a code cell printed or displayed as text."""
    parts = []
    for output in cell.get("outputs", []):
        parts.append(output.get("text", ""))
        parts.append(output.get("data", {}).get("text/plain", ""))
    return "".join(parts)


# Two tiny notebooks for the site: parameters, the SMOKE switch, a file written to output_dir,
# a matplotlib figure and some math.
ALPHA = [
    ("md", "# Alpha notebook\n\nThe growth rate $\\gamma = \\Lambda(T) / T$."),
    ("params", 'output_dir = "."\nsmoke = False'),
    ("code", "import os\nfrom pathlib import Path\n"
             "print('smoke parameter:', smoke, '| TQSLITE_SMOKE:', os.environ.get('TQSLITE_SMOKE'))\n"
             "Path(output_dir, 'result.txt').write_text('42')"),
    ("code", "import matplotlib\nmatplotlib.use('agg')\nimport matplotlib.pyplot as plt\n"
             "%matplotlib inline\nplt.plot([0, 1, 4, 9]); plt.title('squares'); plt.show()"),
]
BETA = [("md", "# Beta notebook\n\nSecond chapter."), ("code", "print(2 + 2)")]


# ----------------------------------------------------------------------------------------------
# (a) The site
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Build the book once, into a temporary folder, in SMOKE mode."""
    root = tmp_path_factory.mktemp("book")
    notebooks = root / "notebooks"
    sources = [write_notebook(notebooks / "01_alpha.ipynb", ALPHA),
               write_notebook(notebooks / "02_beta.ipynb", BETA)]
    before = {nb: nb.read_bytes() for nb in sources}
    html = build_site(smoke=True, out=root / "html", stage=root / "stage", notebooks_dir=notebooks)
    return {"html": html, "stage": root / "stage", "sources": before}


def test_site_has_every_toc_page(site):
    toc = yaml.safe_load((site["stage"] / "_toc.yml").read_text())
    pages = [toc["root"]] + [ch["file"] for part in toc["parts"] for ch in part["chapters"]]
    assert pages[:3] == ["intro", "notebooks/01_alpha", "notebooks/02_beta"], "notebooks come right after the intro, in order"
    assert {"data_models", "api", "references"} <= set(pages)
    assert (site["html"] / "index.html").is_file()
    for page in pages:
        assert (site["html"] / f"{page}.html").is_file(), f"{page} is in the toc but has no HTML page"


def test_notebooks_ran_with_parameters_and_smoke_environment(site):
    page = (site["html"] / "notebooks" / "01_alpha.html").read_text()
    assert "smoke parameter: True | TQSLITE_SMOKE: 1" in page
    assert "<img" in page, "the matplotlib figure is on the page"
    assert (site["stage"] / "outputs" / "01_alpha" / "result.txt").read_text() == "42"
    assert "4" in (site["html"] / "notebooks" / "02_beta.html").read_text()
    assert "SMOKE mode" in (site["html"] / "intro.html").read_text(), "a SMOKE build says so"


def test_build_never_modifies_the_sources(site):
    for nb, content in site["sources"].items():
        assert nb.read_bytes() == content, f"{nb.name} was modified by the build"


def test_api_page_documents_the_library(site):
    api = (site["html"] / "api.html").read_text()
    # The names the book's readers look up first, wherever they already exist.
    expected = {"quantization": "rtn_quantize", "probe": "probe", "allocation": "allocate"}
    present = [module for module in expected if importlib.util.find_spec(f"tqslite.{module}")]
    assert "quantization" in present, "tqslite.quantization is the first module of the library"
    for module in present:
        assert f'id="tqslite.{module}.{expected[module]}"' in api, f"api.html lacks tqslite.{module}.{expected[module]}"
    # Every public function and class of every documented module has an entry.
    for module_name in re.findall(r'<section id="module-(tqslite\.\w+)"', api):
        module = importlib.import_module(module_name)
        for name, obj in vars(module).items():
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            if obj.__module__ == module_name:
                assert f'id="{module_name}.{name}"' in api, f"api.html lacks {module_name}.{name}"


def test_api_md_lists_every_module():
    """A new module of tqslite needs an automodule entry in book/api.md."""
    api_md = (book.BOOK_DIR / "api.md").read_text()
    package = Path(tqslite.__file__).parent
    for path in sorted(package.glob("*.py")):
        if path.stem.startswith("_"):
            continue
        assert f".. automodule:: tqslite.{path.stem}" in api_md, f"book/api.md does not document tqslite.{path.stem}"


def test_site_loads_nothing_from_the_network(site):
    pages = list(site["html"].rglob("*.html"))
    assert len(pages) >= 6
    for page in pages:
        text = page.read_text()
        assert "cdn.jsdelivr" not in text, f"{page.name} references a CDN"
        assert not re.search(r"https?://[^\"' ]*mathjax", text, re.I), f"{page.name} loads MathJax from the internet"
        remote = re.findall(r'<(?:script|link|img)\b[^>]*(?:src|href)="(https?:[^"]*)"', text)
        assert not remote, f"{page.name} loads {remote} from the internet"
    intro = (site["html"] / "intro.html").read_text()
    assert 'src="_static/mathjax/tex-chtml.js"' in intro, "MathJax is served by the site itself"
    assert (site["html"] / "_static" / "mathjax" / "tex-chtml.js").is_file()


def test_incomplete_site_is_an_error(tmp_path, monkeypatch):
    """If jupyter-book 'succeeds' without writing the pages, the build says which are missing."""
    monkeypatch.setattr(site_tooling.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, ""))
    with pytest.raises(BookBuildError, match=r"index.html is missing.*intro"):
        build_site(out=tmp_path / "html", stage=tmp_path / "stage", notebooks_dir=tmp_path / "none")


def test_failing_notebook_fails_the_build(tmp_path):
    write_notebook(tmp_path / "nb" / "01_ok.ipynb", BETA)
    write_notebook(tmp_path / "nb" / "02_bad.ipynb", [("code", "x = 1"), ("code", "raise KeyError('oops')")])
    with pytest.raises(BookBuildError) as info:
        build_site(out=tmp_path / "html", stage=tmp_path / "stage", notebooks_dir=tmp_path / "nb")
    message = str(info.value)
    assert "1 notebook(s) failed" in message and "02_bad.ipynb" in message and "KeyError" in message
    assert "01_ok" not in message
    assert (tmp_path / "stage" / "notebooks" / "02_bad.ipynb").is_file(), "the failed executed copy is kept"
    assert not (tmp_path / "html").exists()


# ----------------------------------------------------------------------------------------------
# (b) A failing cell is named
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("first_code", ["code", "params"], ids=["no-parameters-cell", "with-parameters-cell"])
def test_error_names_notebook_and_cell(tmp_path, first_code):
    src = write_notebook(tmp_path / "tiny.ipynb", [
        ("md", "# Tiny"),
        (first_code, "x = 1"),
        ("code", "raise ValueError('boom in the second code cell')"),
        ("code", "print('never reached')"),
    ])
    with pytest.raises(NotebookError) as info:
        execute_notebook(src, tmp_path / "out")
    err, message = info.value, str(info.value)
    assert "tiny.ipynb" in message
    assert "index 2" in message and err.cell_index == 2, "the cell index counts cells of the source notebook"
    assert "ValueError: boom in the second code cell" in message
    assert err.executed == tmp_path / "out" / "tiny.ipynb" and err.executed.is_file()
    assert "boom in the second code cell" in err.executed.read_text(), "the executed copy keeps the traceback"


def test_timeout_names_the_cell(tmp_path):
    src = write_notebook(tmp_path / "slow.ipynb", [("code", "x = 1"), ("code", "import time\ntime.sleep(60)")])
    with pytest.raises(NotebookError) as info:
        execute_notebook(src, tmp_path / "out", timeout=2)
    assert "slow.ipynb" in str(info.value) and "index 1" in str(info.value) and "timed out" in str(info.value)
    assert info.value.cell_index == 1


# ----------------------------------------------------------------------------------------------
# (c) Running one notebook with parameters
# ----------------------------------------------------------------------------------------------


def test_run_with_parameters(tmp_path, capsys):
    src = write_notebook(tmp_path / "src" / "07_params.ipynb", [
        ("params", "bits = 4\nlabel = 'default'\nsmoke = False\noutput_dir = '.'"),
        ("code", "import os\nprint('bits*2 =', bits * 2, '| label =', label, '| smoke =', smoke,"
                 " os.environ.get('TQSLITE_SMOKE'))\n"
                 "with open(os.path.join(output_dir, 'bits.txt'), 'w') as f:\n    f.write(str(bits))"),
    ])
    before = src.read_bytes()
    out = tmp_path / "runs" / "x"
    status = book.main(["run", str(src), "-p", "bits", "3", "-p", "label", "hello", "--out", str(out), "--smoke"])
    assert status == 0
    executed = out / "07_params.ipynb"
    assert executed.is_file()
    assert "07_params.ipynb" in capsys.readouterr().out
    nb = nbformat.read(executed, as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "bits = 3" in injected[0].source
    assert 'output_dir = "../runs/x"' in injected[0].source, "output_dir is given from the notebook's folder"
    assert "bits*2 = 6 | label = hello | smoke = True 1" in cell_text(nb.cells[-1])
    assert (out / "bits.txt").read_text() == "3", "the notebook wrote its result into --out"
    assert src.read_bytes() == before, "the source notebook is never modified"


def test_run_reports_failure_with_exit_status(tmp_path, capsys):
    src = write_notebook(tmp_path / "08_fail.ipynb", [("code", "1 / 0")])
    assert book.main(["run", str(src), "--out", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert "08_fail.ipynb" in error and "index 0" in error and "ZeroDivisionError" in error


def test_python_m_tqslite_book_is_the_command_line(tmp_path):
    """``python -m tqslite.book`` (which other tools and DEVELOPERS.md call) reaches the command line."""
    src = write_notebook(tmp_path / "09_strip.ipynb", [("params", "bits = 4"), ("code", "print(bits)")])
    nb = nbformat.read(src, as_version=4)
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", text="4\n")]
    nb.cells[1].execution_count = 1
    nbformat.write(nb, src)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(book.REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    run = [sys.executable, "-W", "error", "-m", "tqslite.book", "strip", str(src)]
    done = subprocess.run(run, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.startswith("stripped:")
    stripped = nbformat.read(src, as_version=4)
    assert stripped.cells[1].outputs == [] and stripped.cells[1].execution_count is None
    assert stripped.cells[0].metadata["tags"] == ["parameters"]
    assert subprocess.run(run, capture_output=True, text=True, env=env, timeout=120).stdout.startswith("already clean")


def test_the_library_never_imports_the_book_tooling():
    """Importing every module of tqslite (the command line aside) leaves tqslite.book unimported."""
    modules = sorted(p.stem for p in Path(tqslite.__file__).parent.glob("*.py") if p.stem not in ("__init__", "cli"))
    modules += ["baselines", "models"]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module('tqslite.' + m)\n"
            "print(sorted(m for m in sys.modules if m.startswith('tqslite.book')))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(book.REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_find_notebook(tmp_path):
    for name in ["01_dynamical_systems", "06_allocation", "10_onnx", "11_baselines", "11_cost"]:
        write_notebook(tmp_path / f"{name}.ipynb", BETA)
    (tmp_path / "scratch.ipynb").write_text("{}")
    assert find_notebook("06", tmp_path).name == "06_allocation.ipynb"
    assert find_notebook("6", tmp_path).name == "06_allocation.ipynb"
    assert find_notebook(1, tmp_path).name == "01_dynamical_systems.ipynb"
    assert find_notebook("10_", tmp_path).name == "10_onnx.ipynb"
    assert find_notebook("11_c", tmp_path).name == "11_cost.ipynb"
    assert find_notebook(str(tmp_path / "scratch.ipynb")).name == "scratch.ipynb"
    with pytest.raises(FileNotFoundError, match="matches 2 notebooks"):
        find_notebook("11", tmp_path)
    with pytest.raises(FileNotFoundError, match="No notebook matches.*06_allocation.ipynb"):
        find_notebook("07", tmp_path)
    assert [nb.name for nb in book.list_notebooks(tmp_path)][:2] == ["01_dynamical_systems.ipynb", "06_allocation.ipynb"]


def test_parameter_values_are_python_literals():
    assert book.parse_value("3") == 3
    assert book.parse_value("0.5") == 0.5
    assert book.parse_value("True") is True
    assert book.parse_value("[2, 4]") == [2, 4]
    assert book.parse_value("runs/x") == "runs/x"


# ----------------------------------------------------------------------------------------------
# (d) The landing page renders in a real browser, offline
# ----------------------------------------------------------------------------------------------


def chromium(*args, timeout=60) -> subprocess.CompletedProcess:
    """Run headless chromium with no network: any request to the internet fails."""
    exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("chromium is not installed: `apt-get install chromium` (Debian) to run the screenshot test")
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run", "--disable-sync", f"--user-data-dir={profile}",
             "--proxy-server=127.0.0.1:9", "--virtual-time-budget=10000", *args],
            capture_output=True, text=True, timeout=timeout,
        )


def test_landing_page_screenshot(site, tmp_path):
    import matplotlib.image
    import numpy as np

    landing = (site["html"] / "index.html").as_uri()
    shot = tmp_path / "landing.png"
    result = chromium("--window-size=1280,900", f"--screenshot={shot}", landing)
    assert shot.is_file(), f"chromium wrote no screenshot:\n{result.stderr[-2000:]}"
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (900, 1280)
    assert pixels[..., :3].var() > 1e-4, "the screenshot is blank"

    dom = chromium("--dump-dom", landing).stdout
    assert "tqslite: quantizing forecasters as dynamical systems" in dom, "the book title is on the landing page"
    assert "TQS in one page" in dom
    assert "<mjx-container" in dom, "MathJax rendered the formulas with the network cut off"
