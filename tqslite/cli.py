"""The ``tqslite`` command line.

``tqslite run-notebook 06 -p bits 3 -p horizon 40 --out runs/pangu-b3`` executes one notebook of
the book with parameters (the source is never touched; the executed copy and its results land in
``--out``). ``tqslite book [--smoke]`` builds the whole site, like ``make book``.
"""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    """Entry point of the ``tqslite`` command; returns the exit status."""
    from . import book

    argv = list(sys.argv[1:] if argv is None else argv)
    usage = ("usage: tqslite run-notebook NOTEBOOK [-p NAME VALUE ...] [--out DIR] [--smoke]\n"
             "       tqslite book [--smoke] [--out DIR]")
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\n" + usage)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "run-notebook":
        return book.main(["run", *rest])
    if command == "book":
        return book.main(["build", *rest])
    print(f"tqslite: unknown command {command!r}\n{usage}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
