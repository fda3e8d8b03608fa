"""``python -m tqslite.book``: the book's command line (:mod:`tqslite.book.command`)."""

import sys

from .command import main

sys.exit(main())
