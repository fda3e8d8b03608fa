"""The book's build tooling: execute the notebooks with papermill, build the site with jupyter-book.

This subpackage is not part of the library: no module of :mod:`tqslite` imports it (the
``tqslite book`` and ``tqslite run-notebook`` commands of :mod:`tqslite.cli` hand over to it),
and it works only in a clone of the repository, whose ``notebooks/`` and ``book/`` it builds.
Its parts:

* :mod:`tqslite.book.notebooks` -- find, execute and strip the notebooks (:func:`execute_notebook`);
* :mod:`tqslite.book.site` -- stage ``book/``, execute every notebook, run jupyter-book
  (:func:`build_site`);
* :mod:`tqslite.book.command` -- the command line, run as ``python -m tqslite.book``::

    python -m tqslite.book build [--smoke] [--out DIR] [--timeout SECONDS]
    python -m tqslite.book run NOTEBOOK [-p NAME VALUE ...] [--out DIR] [--smoke]
    python -m tqslite.book strip NOTEBOOK [NOTEBOOK ...]

``NOTEBOOK`` is a number (``06``), a name prefix (``06_alloc``) or a path to a notebook. In SMOKE
mode every notebook runs its quick version: it gets the parameter ``smoke=True`` and the
environment variable ``TQSLITE_SMOKE=1``.
"""

from .command import main, parse_value
from .notebooks import (CELL_TIMEOUT, KERNEL_NAME, NOTEBOOK_GLOB, NOTEBOOKS_DIR, REPO_ROOT, NotebookError,
                        execute_notebook, find_notebook, list_notebooks, strip_outputs)
from .site import BOOK_DIR, NOTEBOOKS_PART, SITE_DIR, STAGE_DIR, BookBuildError, build_site

__all__ = ["BookBuildError", "NotebookError", "build_site", "execute_notebook", "find_notebook",
           "list_notebooks", "main", "parse_value", "strip_outputs"]
