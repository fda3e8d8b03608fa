"""The command line of the book's tooling: ``python -m tqslite.book build|run|strip``.

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
import sys
from pathlib import Path

from .notebooks import (CELL_TIMEOUT, REPO_ROOT, NotebookError, display_path, execute_notebook, find_notebook,
                        strip_outputs)
from .site import SITE_DIR, BookBuildError, build_site


def parse_value(text: str):
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
    parser = argparse.ArgumentParser(prog="python -m tqslite.book", description="Execute the book's notebooks with papermill and build the site with jupyter-book.")
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build", help="execute every notebook and build the site")
    build.add_argument("--smoke", action="store_true", help="run the notebooks' quick versions")
    build.add_argument("--out", type=Path, default=SITE_DIR, help=f"site folder (default: {display_path(SITE_DIR)})")
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
            parameters = {name: parse_value(value) for name, value in args.parameter}
            executed = execute_notebook(src, out, parameters=parameters, smoke=args.smoke, timeout=args.timeout)
            print(f"Executed {display_path(src)} -> {display_path(executed)}")
    except (NotebookError, BookBuildError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0

