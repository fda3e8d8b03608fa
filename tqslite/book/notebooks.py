"""Find, execute (with papermill) and strip the book's notebooks.

Part of the book's build tooling (:mod:`tqslite.book`), which the library never imports.
:func:`execute_notebook` runs one notebook with parameters, in SMOKE mode if asked, and turns a
failure into a :class:`NotebookError` that names the notebook, the cell and the exception;
:func:`list_notebooks` and :func:`find_notebook` find the book's ``notebooks/NN_*.ipynb``;
:func:`strip_outputs` removes outputs before a commit.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

#: The repository holding the book (the tooling works in a clone, never from an installed wheel).
REPO_ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"

#: The book's notebooks: two digits, an underscore, a name. Anything else in ``notebooks/``
#: (scratch files, checkpoints) is not part of the book.
NOTEBOOK_GLOB = "[0-9][0-9]_*.ipynb"

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


def display_path(path) -> str:
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
            f"{display_path(src)} failed in {where}:\n    {reason}\n"
            f"The executed copy, with the traceback, is at {display_path(executed)}.",
            src, executed, cell_index=cell, ename=err.ename, evalue=err.evalue,
        ) from err
    except Exception as err:  # a cell timed out, the kernel died or did not start
        cell = _last_started_cell(src, executed)
        where = "before running any cell" if cell is None else f"in cell #{cell + 1} (index {cell})"
        raise NotebookError(
            f"{display_path(src)} stopped {where}: {type(err).__name__}: {err}\n"
            f"Whatever was executed is at {display_path(executed)}.",
            src, executed, cell_index=cell, ename=type(err).__name__, evalue=str(err),
        ) from err
    return executed



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

