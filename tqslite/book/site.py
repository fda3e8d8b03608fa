"""Build the book's HTML site: stage ``book/``, execute every notebook, run jupyter-book.

Part of the book's build tooling (:mod:`tqslite.book`), which the library never imports.
:func:`build_site` takes four steps:

1. copy ``book/`` into a staging folder (``_build/stage/``), so the sources are never touched;
2. execute every notebook with papermill into ``stage/notebooks/``, passing the parameters
   ``output_dir`` (a folder inside the stage for its results) and ``smoke``;
3. write the staged ``_toc.yml``: its "Notebooks" part gets one entry per notebook, in file-name
   order, so adding a notebook needs no edit of the table of contents;
4. run ``jupyter-book build`` on the stage with warnings as errors (``-W --keep-going``), check
   that every page of the table of contents was written, and copy the site to
   ``book/_build/html``.

jupyter-book never executes anything itself (``execute_notebooks: "off"`` in ``_config.yml``):
the site shows the outputs papermill stored.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .notebooks import (CELL_TIMEOUT, NOTEBOOKS_DIR, REPO_ROOT, NotebookError, display_path, execute_notebook,
                        list_notebooks)

BOOK_DIR = REPO_ROOT / "book"
STAGE_DIR = REPO_ROOT / "_build" / "stage"
SITE_DIR = BOOK_DIR / "_build" / "html"

#: Caption of the part of ``_toc.yml`` that :func:`build_site` fills with the notebooks.
NOTEBOOKS_PART = "Notebooks"


class BookBuildError(RuntimeError):
    """The site could not be built: failing notebooks, Sphinx errors or a missing page."""


def _write_toc(stage: Path, notebooks: list[Path]) -> list[str]:
    """Fill the "Notebooks" part of the staged ``_toc.yml``; return every page of the toc.

    The part gets one ``file:`` entry per notebook; it is dropped when there are none, since
    jupyter-book refuses an empty part.
    """
    import yaml

    toc_path = stage / "_toc.yml"
    toc = yaml.safe_load(toc_path.read_text())
    for part in toc.get("parts", []):
        if part.get("caption") == NOTEBOOKS_PART:
            part["chapters"] = [{"file": f"notebooks/{nb.stem}"} for nb in notebooks]
    toc["parts"] = [part for part in toc.get("parts", []) if part.get("chapters")]
    header = "# Written by tqslite/book/site.py from book/_toc.yml and the notebooks it executed.\n"
    toc_path.write_text(header + yaml.safe_dump(toc, sort_keys=False))

    pages = [toc["root"]]
    for part in toc["parts"]:
        pages += [chapter["file"] for chapter in part["chapters"]]
    return pages


def _mark_smoke(stage: Path) -> None:
    """Add a banner to every page of a site built in SMOKE mode."""
    import yaml

    config_path = stage / "_config.yml"
    config = yaml.safe_load(config_path.read_text())
    config.setdefault("html", {})["announcement"] = (
        "Built in SMOKE mode: the notebooks ran their quick versions, so the numbers are not final."
    )
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))


def build_site(smoke=False, out=SITE_DIR, stage=STAGE_DIR, notebooks_dir=NOTEBOOKS_DIR,
               book_dir=BOOK_DIR, timeout=CELL_TIMEOUT) -> Path:
    """Execute every notebook and build the HTML site of the book.

    Parameters
    ----------
    smoke : bool
        Execute the notebooks in SMOKE mode (quick versions) and say so in a banner on every page.
    out : path-like
        Where the site goes (default ``book/_build/html``); replaced if it exists.
    stage : path-like
        Scratch folder for the staged book (default ``_build/stage``); replaced if it exists.
        After a build it holds the executed notebooks, their results under ``outputs/``, and,
        after a failure, the executed copy of every failing notebook.
    notebooks_dir : path-like
        Folder of the ``NN_*.ipynb`` notebooks (default: the repository's ``notebooks/``).
    book_dir : path-like
        Folder of the configuration and pages (default: the repository's ``book/``).
    timeout : float
        Seconds one cell may run.

    Returns
    -------
    pathlib.Path
        The site folder, holding ``index.html``.

    Raises
    ------
    BookBuildError
        If a notebook fails (all notebooks are run first; the message lists every failure), if
        jupyter-book reports an error or a warning, or if a page of the table of contents is
        missing from the site.
    """
    out, stage = Path(out).absolute(), Path(stage).absolute()
    notebooks = list_notebooks(notebooks_dir)
    print(f"Building the book: {len(notebooks)} notebook(s){' in SMOKE mode' if smoke else ''}.", flush=True)

    # 1. Stage the book's configuration and pages.
    if stage.exists():
        shutil.rmtree(stage)
    shutil.copytree(book_dir, stage, ignore=shutil.ignore_patterns("_build", ".ipynb_checkpoints"))
    if smoke:
        _mark_smoke(stage)

    # 2. Execute the notebooks into the stage. Run them all, then report every failure.
    failures = []
    for i, nb in enumerate(notebooks, start=1):
        print(f"[{i}/{len(notebooks)}] executing {nb.name} ...", end=" ", flush=True)
        start = time.perf_counter()
        try:
            execute_notebook(nb, stage / "notebooks", smoke=smoke, timeout=timeout, cwd=stage / "notebooks",
                             parameters={"output_dir": str(stage / "outputs" / nb.stem)})
            print(f"{time.perf_counter() - start:.1f} s", flush=True)
        except NotebookError as err:
            print("FAILED", flush=True)
            failures.append(str(err))
    if failures:
        raise BookBuildError(f"{len(failures)} notebook(s) failed, so the site was not built:\n\n"
                             + "\n\n".join(failures))

    # 3. The table of contents lists the notebooks that were executed.
    pages = _write_toc(stage, notebooks)

    # 4. Build the site with Sphinx, warnings being errors. jupyter-book runs in a subprocess of
    #    this interpreter, with this checkout first on PYTHONPATH so that the API reference
    #    documents it. Warnings (stderr) show as they come; its progress log (stdout) is shown
    #    only if it fails, as its closing banner points to the stage rather than to `out`.
    print("Running jupyter-book (warnings are errors) ...", flush=True)
    command = [sys.executable, "-c", "from jupyter_book.cli.main import main; main()",
               "build", str(stage), "--builder", "html", "-W", "--keep-going", "--all"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True)
    html = stage / "_build" / "html"
    if result.returncode != 0:
        print(result.stdout, flush=True)
        raise BookBuildError(
            f"jupyter-book failed (exit code {result.returncode}): its warnings and errors are "
            f"printed above; fix each one (warnings count as errors). They name files in the "
            f"stage {display_path(stage)}: a page there is a copy of the one in book/, and "
            f"notebooks/NN_*.ipynb there is the executed copy of the notebook of that name."
        )
    missing = [page for page in pages if not (html / f"{page}.html").is_file()]
    if not (html / "index.html").is_file() or missing:
        raise BookBuildError(
            f"The site in {display_path(html)} is incomplete: index.html "
            f"{'exists' if (html / 'index.html').is_file() else 'is missing'}; "
            f"missing pages: {', '.join(missing) or 'none'}."
        )

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(html, out)
    print(f"The site is in {display_path(out)} ({len(pages)} pages); open {display_path(out / 'index.html')}.", flush=True)
    return out

