"""Execute the book's notebooks with papermill and build the site with jupyter-book.

The tutorial book is made of the numbered notebooks ``notebooks/NN_*.ipynb`` and the pages and
configuration in ``book/``. Building it takes four steps, done by :func:`build_site`:

1. copy ``book/`` into a staging folder (``_build/stage/``), so the sources are never touched;
2. execute every notebook with papermill into ``stage/notebooks/``, passing the parameters
   ``output_dir`` (a folder inside the stage for its results) and ``smoke``;
3. write the staged ``_toc.yml``: its "Notebooks" part gets one entry per notebook, in file-name
   order, so adding a notebook needs no edit of the table of contents;
4. run ``jupyter-book build`` on the stage with warnings as errors (``-W --keep-going``), check
   that every page of the table of contents was written, and copy the site to
   ``book/_build/html``.

jupyter-book never executes anything itself (``execute_notebooks: "off"`` in ``_config.yml``):
the site shows the outputs papermill stored. :func:`execute_notebook` runs one notebook, and is
what ``python -m tqslite.book run`` calls.

Command line::

    python -m tqslite.book build [--smoke] [--out DIR] [--timeout SECONDS]
    python -m tqslite.book run NOTEBOOK [-p NAME VALUE ...] [--out DIR] [--smoke]
    python -m tqslite.book strip NOTEBOOK [NOTEBOOK ...]

``NOTEBOOK`` is a number (``06``), a name prefix (``06_alloc``) or a path to a notebook.
In SMOKE mode every notebook runs its quick version: it gets the parameter ``smoke=True`` and
the environment variable ``TQSLITE_SMOKE=1`` (which is what notebooks read when run by a tool
that cannot pass parameters, such as nbmake).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
BOOK_DIR = REPO_ROOT / "book"
STAGE_DIR = REPO_ROOT / "_build" / "stage"
SITE_DIR = BOOK_DIR / "_build" / "html"

#: The book's notebooks: two digits, an underscore, a name. Anything else in ``notebooks/``
#: (scratch files, checkpoints) is not part of the book.
NOTEBOOK_GLOB = "[0-9][0-9]_*.ipynb"

#: Caption of the part of ``_toc.yml`` that :func:`build_site` fills with the notebooks.
NOTEBOOKS_PART = "Notebooks"

#: Kernel that executes the notebooks. jupyter_client starts the ``python3`` kernel with the
#: interpreter that is running this code (``sys.executable``), so a build started from the
#: project's ``.venv`` executes the notebooks in the ``.venv`` too.
KERNEL_NAME = "python3"

#: Seconds one cell may run before its notebook is stopped and reported as failed.
CELL_TIMEOUT = 1200


class NotebookError(RuntimeError):
    """A notebook failed to execute.

    Attributes
    ----------
    notebook : pathlib.Path
        The source notebook.
    executed : pathlib.Path
        The executed copy, kept with the outputs up to the failure and the traceback.
    cell_index : int or None
        Index (counting from 0, markdown cells included) of the failing cell in the source
        notebook; ``None`` when the failure is not tied to a cell (the kernel did not start).
    ename, evalue : str or None
        The Python exception's name and message, as the kernel reported them.
    """

    def __init__(self, message, notebook, executed, cell_index=None, ename=None, evalue=None):
        super().__init__(message)
        self.notebook = Path(notebook)
        self.executed = Path(executed)
        self.cell_index = cell_index
        self.ename = ename
        self.evalue = evalue


class BookBuildError(RuntimeError):
    """The site could not be built: failing notebooks, Sphinx errors or a missing page."""


# ----------------------------------------------------------------------------------------------
# Finding notebooks
# ----------------------------------------------------------------------------------------------


def list_notebooks(notebooks_dir=NOTEBOOKS_DIR) -> list[Path]:
    """Return the book's notebooks, ``NN_*.ipynb``, sorted by file name.

    Parameters
    ----------
    notebooks_dir : path-like
        Folder holding the notebooks (default: the repository's ``notebooks/``).

    Returns
    -------
    list of pathlib.Path
        The notebooks in reading order; empty if there are none.
    """
    return sorted(Path(notebooks_dir).glob(NOTEBOOK_GLOB))


def find_notebook(key, notebooks_dir=NOTEBOOKS_DIR) -> Path:
    """Resolve a notebook number, name prefix or path to one notebook file.

    Parameters
    ----------
    key : str or path-like
        ``"06"`` or ``"6"`` (a number), ``"06_alloc"`` or ``"06_allocation.ipynb"`` (a prefix of
        the file name), or the path of an existing ``.ipynb`` file anywhere.
    notebooks_dir : path-like
        Folder searched for numbers and prefixes (default: the repository's ``notebooks/``).

    Returns
    -------
    pathlib.Path
        The notebook.

    Raises
    ------
    FileNotFoundError
        If nothing matches, or if the key matches more than one notebook; the message lists
        the notebooks that exist.
    """
    key = str(key)
    as_path = Path(key)
    if as_path.suffix == ".ipynb" and as_path.is_file():
        return as_path
    if key.isdigit():
        key = f"{int(key):02d}_"
    notebooks = list_notebooks(notebooks_dir)
    matches = [nb for nb in notebooks if nb.name.startswith(key)]
    if len(matches) == 1:
        return matches[0]
    names = ", ".join(nb.name for nb in notebooks) or "none"
    if not matches:
        raise FileNotFoundError(
            f"No notebook matches {key!r} in {notebooks_dir}. Give a number (06), a name prefix "
            f"(06_alloc) or a path to a .ipynb file. Notebooks there: {names}."
        )
    raise FileNotFoundError(
        f"{key!r} matches {len(matches)} notebooks in {notebooks_dir} "
        f"({', '.join(nb.name for nb in matches)}): give a longer prefix."
    )


# ----------------------------------------------------------------------------------------------
# Executing one notebook
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _kernel_environment(smoke: bool):
    """Set the environment variables the kernel inherits, and restore them afterwards.

    ``TQSLITE_SMOKE=1`` in SMOKE mode (removed otherwise, so a build runs in exactly the mode
    asked for), and the repository root first on ``PYTHONPATH``, so that ``import tqslite`` in a
    notebook imports this checkout.
    """
    saved = {name: os.environ.get(name) for name in ("TQSLITE_SMOKE", "PYTHONPATH")}
    if smoke:
        os.environ["TQSLITE_SMOKE"] = "1"
    else:
        os.environ.pop("TQSLITE_SMOKE", None)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), saved["PYTHONPATH"]]))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _source_cell_index(source_nb, executed_index: int) -> int | None:
    """Map a cell index of papermill's executed notebook back to the source notebook.

    papermill adds one cell, tagged ``injected-parameters``, just after the cell tagged
    ``parameters`` (or at the top when there is none); a source that already holds an injected
    cell has it replaced in place. Returns ``None`` if the failing cell is the injected one.
    """
    tags = [cell.get("metadata", {}).get("tags", []) for cell in source_nb.cells]
    if any("injected-parameters" in t for t in tags):
        return executed_index
    injected_at = next((i + 1 for i, t in enumerate(tags) if "parameters" in t), 0)
    if executed_index == injected_at:
        return None
    return executed_index - 1 if executed_index > injected_at else executed_index


def _last_started_cell(src: Path, executed: Path) -> int | None:
    """Index in the source of the last cell papermill started (the one that hung or crashed)."""
    import nbformat

    try:
        cells = nbformat.read(executed, as_version=4).cells
    except (OSError, ValueError):  # nothing was written
        return None
    started = [i for i, cell in enumerate(cells)
               if cell.get("metadata", {}).get("papermill", {}).get("start_time")]
    if not started:
        return None
    return _source_cell_index(nbformat.read(src, as_version=4), started[-1])


def _display(path: Path) -> str:
    """A path relative to the repository when it is inside it, else absolute."""
    path = Path(path).absolute()
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def _path_from(start: Path, path: Path) -> str:
    """``path`` relative to the folder ``start``, or absolute if there is no relative path."""
    try:
        return Path(os.path.relpath(path, start)).as_posix()
    except ValueError:  # on Windows, another drive
        return str(path)


def execute_notebook(src, out_dir, parameters=None, smoke=False, timeout=CELL_TIMEOUT,
                     kernel_name=KERNEL_NAME, cwd=None) -> Path:
    """Execute one notebook with papermill and write the executed copy to ``out_dir``.

    The source notebook is only read. The kernel runs in the notebook's own folder (or ``cwd``),
    so relative paths behave as in JupyterLab.

    Parameters
    ----------
    src : path-like
        The notebook to execute.
    out_dir : path-like
        Folder for the executed copy, ``out_dir / src.name``; created if needed.
    parameters : dict, optional
        Values injected after the cell tagged ``parameters``. ``output_dir`` (a folder for the
        notebook's results, created if needed) defaults to ``out_dir`` and ``smoke`` to the
        argument below; entries here override both. A relative ``output_dir`` is taken from
        the current directory, and passed to the notebook as a path from its own folder.
    smoke : bool
        Run the quick version: parameter ``smoke=True`` and environment variable
        ``TQSLITE_SMOKE=1``.
    timeout : float
        Seconds one cell may run before the notebook is stopped.
    kernel_name : str
        Jupyter kernel to use (default ``"python3"``: the interpreter running this code).
    cwd : path-like, optional
        Folder the kernel runs in (default: the notebook's own). The site build runs each
        notebook next to its executed copy, so the ``output_dir`` it sees is a path inside the
        stage and no path of the build machine reaches a page.

    Returns
    -------
    pathlib.Path
        The executed copy.

    Raises
    ------
    FileNotFoundError
        If ``src`` is not a file.
    NotebookError
        If a cell raises, a cell runs past ``timeout`` or the kernel dies. The message names the
        notebook, the failing cell (its index in the source, counting from 0, markdown cells
        included), the exception, and where the executed copy with the traceback was kept.
    """
    import nbformat
    import papermill
    from papermill.exceptions import PapermillExecutionError

    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"There is no notebook at {src}.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    executed = out_dir / src.name
    if executed.resolve() == src.resolve():
        raise ValueError(f"out_dir {out_dir} holds the source notebook itself: pick another folder.")
    executed.unlink(missing_ok=True)  # never mistake an older run's copy for this one
    params = {"output_dir": out_dir, "smoke": bool(smoke), **(parameters or {})}
    # output_dir is a path from where this is called; the kernel runs in the notebook's folder,
    # so it gets the path from there (relative, which also keeps machine paths off the site).
    output_dir = Path(params["output_dir"]).absolute()
    output_dir.mkdir(parents=True, exist_ok=True)
    cwd = Path(cwd or src.parent).absolute()
    params["output_dir"] = _path_from(cwd, output_dir)

    try:
        with _kernel_environment(smoke=bool(params["smoke"])):
            papermill.execute_notebook(
                str(src), str(executed), parameters=params, kernel_name=kernel_name,
                language="python", cwd=str(cwd), execution_timeout=timeout,
                progress_bar=False, log_output=False, request_save_on_cell_execute=True,
            )
    except PapermillExecutionError as err:
        cell = _source_cell_index(nbformat.read(src, as_version=4), err.cell_index)
        if cell is None:
            where = "the parameters cell that papermill injected (check the values passed with -p)"
        else:
            first_line = next((line for line in err.source.splitlines() if line.strip()), "")
            where = f"cell #{cell + 1} (index {cell}) `{first_line[:60]}`"
        reason = f"{err.ename}: {err.evalue}"
        if not err.evalue and err.ename == "CellExecutionError":
            reason = "the cell stopped without a Python error; its executed copy may say why"
        raise NotebookError(
            f"{_display(src)} failed in {where}:\n    {reason}\n"
            f"The executed copy, with the traceback, is at {_display(executed)}.",
            src, executed, cell_index=cell, ename=err.ename, evalue=err.evalue,
        ) from err
    except Exception as err:  # a cell timed out, the kernel died or did not start
        cell = _last_started_cell(src, executed)
        where = "before running any cell" if cell is None else f"in cell #{cell + 1} (index {cell})"
        raise NotebookError(
            f"{_display(src)} stopped {where}: {type(err).__name__}: {err}\n"
            f"Whatever was executed is at {_display(executed)}.",
            src, executed, cell_index=cell, ename=type(err).__name__, evalue=str(err),
        ) from err
    return executed


# ----------------------------------------------------------------------------------------------
# Building the site
# ----------------------------------------------------------------------------------------------


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
    header = "# Written by tqslite/book.py from book/_toc.yml and the notebooks it executed.\n"
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
            f"stage {_display(stage)}: a page there is a copy of the one in book/, and "
            f"notebooks/NN_*.ipynb there is the executed copy of the notebook of that name."
        )
    missing = [page for page in pages if not (html / f"{page}.html").is_file()]
    if not (html / "index.html").is_file() or missing:
        raise BookBuildError(
            f"The site in {_display(html)} is incomplete: index.html "
            f"{'exists' if (html / 'index.html').is_file() else 'is missing'}; "
            f"missing pages: {', '.join(missing) or 'none'}."
        )

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(html, out)
    print(f"The site is in {_display(out)} ({len(pages)} pages); open {_display(out / 'index.html')}.", flush=True)
    return out


def strip_outputs(path) -> bool:
    """Remove outputs and execution counts from a notebook in place, keeping cell tags.

    Notebooks are committed without outputs; papermill needs the ``parameters`` tag, so the
    cells' metadata (tags included) are kept. Returns ``True`` if the file changed.
    """
    import nbformat

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    before = nbformat.writes(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
    nb.metadata.pop("papermill", None)
    after = nbformat.writes(nb)
    if after != before:
        path.write_text(after)
    return after != before


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def _parse_value(text: str):
    """Read a ``-p`` value as a Python literal (``3``, ``0.5``, ``True``, ``[2, 4]``), else a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main(argv=None) -> int:
    """Run the command line: ``build`` the site or ``run`` one notebook.

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status: 0 on success, 1 if a notebook or the build failed.
    """
    parser = argparse.ArgumentParser(prog="python -m tqslite.book", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build", help="execute every notebook and build the site")
    build.add_argument("--smoke", action="store_true", help="run the notebooks' quick versions")
    build.add_argument("--out", type=Path, default=SITE_DIR, help=f"site folder (default: {_display(SITE_DIR)})")
    build.add_argument("--timeout", type=float, default=CELL_TIMEOUT, help="seconds one cell may run")

    run = commands.add_parser("run", help="execute one notebook with parameters")
    run.add_argument("notebook", help="number (06), name prefix (06_alloc) or path of a notebook")
    run.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                     help="set a parameter; VALUE is read as a Python literal if it is one, else as a string")
    run.add_argument("--out", type=Path, default=None, help="folder for the executed copy (default: runs/<notebook>)")
    run.add_argument("--smoke", action="store_true", help="run the notebook's quick version")
    run.add_argument("--timeout", type=float, default=CELL_TIMEOUT, help="seconds one cell may run")

    strip = commands.add_parser("strip", help="remove outputs from notebooks in place, keeping cell tags")
    strip.add_argument("paths", nargs="+", type=Path, help="notebooks to strip")

    args = parser.parse_args(argv)
    try:
        if args.command == "strip":
            for path in args.paths:
                print(f"{'stripped' if strip_outputs(path) else 'already clean'}: {path}")
        elif args.command == "build":
            build_site(smoke=args.smoke, out=args.out, timeout=args.timeout)
        else:
            src = find_notebook(args.notebook)
            out = args.out or REPO_ROOT / "runs" / src.stem
            parameters = {name: _parse_value(value) for name, value in args.parameter}
            executed = execute_notebook(src, out, parameters=parameters, smoke=args.smoke, timeout=args.timeout)
            print(f"Executed {_display(src)} -> {_display(executed)}")
    except (NotebookError, BookBuildError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
