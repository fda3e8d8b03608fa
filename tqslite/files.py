"""Writing a file safely: into a temporary file beside it, renamed over it only once complete.

Every file tqslite writes (plans, packed checkpoints, ONNX graphs, sweep files, trained
checkpoints, the command line's outputs) goes through :func:`write_atomic`. A write that fails --
an exception in the middle, a full disk, an interrupted process -- never leaves half a file in
place of a good one: the old file stays as it was, and the temporary file is removed.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomic(path, write: Callable[[Path], object]) -> Path:
    """Write ``path`` through ``write(tmp)``, a function that writes a complete file at ``tmp``.

    ``tmp`` is a new, empty file in ``path``'s folder (created if missing), so the final rename
    is atomic on any POSIX file system. Once ``write`` returns, the file is flushed to disk, made
    readable by everyone (mode 0644; the temporary file is created 0600), and renamed over
    ``path``. If ``write`` raises, the exception propagates, ``path`` is untouched and ``tmp`` is
    gone.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


__all__ = ["write_atomic"]
