"""Data: the shipped datasets, found, checked against their SHA-256 and opened as xarray objects.

What to do with a Dataset once it is open (split it in time, normalise it, cut it into windows)
is :mod:`tqslite.preparation`'s job; its functions work on any ``xarray.Dataset`` of the same
layout, so a reader with a real reanalysis opens it with ``xarray.open_dataset`` and passes it
on. Code written before the two were separated imports them from here too (``data.split_time``
and the like).

* :func:`find_data_dir` finds the folder of the shipped files: the environment variable
  ``TQSLITE_DATA``, else the ``data/`` folder of the repository the package sits in (an
  editable install, ``pip install -e .``); otherwise it says how to get the data.
* :func:`load_dataset` opens a file shipped in ``data/`` after checking its SHA-256 against
  ``data/SHA256SUMS`` (checkpoints: ``data/checkpoints/SHA256SUMS``); a mismatch is refused with
  the file's name and the command that regenerates it (:class:`ChecksumError`); the layout is
  checked with :func:`tqslite.preparation.validate_layout`.
* :func:`open_remote` fetches a file from a URL with a SHA-256; offline it fails at once with a
  message saying what to do instead, and never hangs.

Layouts (:data:`DATASETS`): *grid*, dims ``time``, ``lat``, ``lon``; *stations*, dims ``time``
and ``station``; *series*, dim ``time`` only.

Why not ``pooch``: the checksums of the shipped files stay in ``sha256sum`` format (``cd data &&
sha256sum -c SHA256SUMS`` checks them without Python), and a ``pooch`` registry answers a changed
file by downloading it again, while these files have no server (what a reader needs is the
command that rebuilds the file). For :func:`open_remote`, ``pooch.retrieve`` would replace
about fifteen lines of the standard library with as many lines of argument and error translation
plus a runtime dependency (``pooch`` and ``requests``), so the standard library stays.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import xarray as xr

# validate_layout checks what load_dataset opens; the other names are kept importable from here
# for code written before preparation was a module of its own.
from .preparation import (Splits, annual_cycle, annual_cycle_fit, denormalize, initial_states,  # noqa: F401
                          lat_weights, normalization_stats, normalize, series_windows, split_time, stack_grid,
                          stack_series, stats_from_dict, time_windows, validate_layout, window_starts)

#: Where the data folder is in a clone of the repository: ``data/`` beside the package.
REPOSITORY_DATA = Path(__file__).resolve().parent.parent / "data"


class DataNotFoundError(FileNotFoundError):
    """The folder of the shipped data cannot be found (see :func:`find_data_dir`)."""


GET_THE_DATA = ("The shipped data live in the data/ folder of the tqslite repository: clone it and either "
                "install the package from the clone with `pip install -e .`, or set the environment variable "
                "TQSLITE_DATA to the clone's data/ folder before importing tqslite. Data of your own need "
                "neither: open them with xarray.open_dataset and pass the Dataset to these functions.")


def find_data_dir() -> Path:
    """The folder of the shipped data files and their ``SHA256SUMS``.

    Looked for in this order: the environment variable ``TQSLITE_DATA``; the ``data/`` folder
    of the repository the package was installed from in editable mode (``pip install -e .``).
    A folder counts only if it holds ``SHA256SUMS``.

    Returns
    -------
    pathlib.Path

    Raises
    ------
    DataNotFoundError
        Neither holds the data; the message says how to get it and point ``TQSLITE_DATA`` at it.
    """
    env = os.environ.get("TQSLITE_DATA")
    if env:
        folder = Path(env).expanduser()
        if not (folder / "SHA256SUMS").is_file():
            raise DataNotFoundError(
                f"TQSLITE_DATA={env} has no SHA256SUMS: point it at the data/ folder of a clone of the "
                "tqslite repository (the folder holding held_suarez_t21.nc and SHA256SUMS). " + GET_THE_DATA)
        return folder
    if (REPOSITORY_DATA / "SHA256SUMS").is_file():
        return REPOSITORY_DATA
    raise DataNotFoundError(f"tqslite's shipped data were not found: TQSLITE_DATA is not set and the package is "
                            f"installed without its repository (no {REPOSITORY_DATA}). {GET_THE_DATA}")


#: The data folder when ``tqslite.data`` was imported: ``TQSLITE_DATA`` if set, else the
#: repository's ``data/``. The loaders check that it exists when they open a file, and say how to
#: get the data when it does not (:class:`DataNotFoundError`).
DATA_DIR = Path(os.environ["TQSLITE_DATA"]).expanduser() if os.environ.get("TQSLITE_DATA") else REPOSITORY_DATA


@dataclass(frozen=True)
class DatasetInfo:
    """What :func:`load_dataset` knows about one shipped file.

    Attributes
    ----------
    file : str
        File name inside the data folder.
    layout : str
        ``"grid"`` (time, lat, lon), ``"stations"`` (time, station) or ``"series"`` (time).
    variables : tuple of str
        The data variables the file must hold.
    regenerate : str
        The command, run from the repository root, that rebuilds the file (from ``data/README.md``).
    """

    file: str
    layout: str
    variables: tuple[str, ...]
    regenerate: str


_HS_VARS = ("z500", "t850", "u250", "v250", "u850", "v850", "ps")

#: The shipped datasets, by the name :func:`load_dataset` takes.
DATASETS: dict[str, DatasetInfo] = {
    "held_suarez": DatasetInfo(
        "held_suarez_t21.nc", "grid", _HS_VARS,
        "python data/scripts/make_held_suarez.py --measure-doubling"),
    "held_suarez_heldout": DatasetInfo(
        "held_suarez_t21_heldout.nc", "grid", _HS_VARS,
        "python data/scripts/make_held_suarez.py --seed 1 --steps 400 --output data/held_suarez_t21_heldout.nc"),
    "irish_wind": DatasetInfo(
        "irish_wind.nc", "stations", ("wind_speed",), "python data/scripts/extract_stations.py --only wind"),
    "clemson": DatasetInfo(
        "clemson_temps.nc", "series", ("tmax", "tmin"), "python data/scripts/extract_stations.py --only clemson"),
    "ncep_air_small": DatasetInfo(
        "ncep_air_small.nc", "grid", ("air",), "python data/scripts/extract_ncep_small.py"),
}

_LAYOUT_DIMS = {"grid": ("time", "lat", "lon"), "stations": ("time", "station"), "series": ("time",)}


# --------------------------------------------------------------------------------------------
# Checksums
# --------------------------------------------------------------------------------------------

class ChecksumError(ValueError):
    """A file's SHA-256 is not the one listed for it (or no checksum is listed)."""


def sha256_file(path) -> str:
    """The SHA-256 of a file, as 64 lowercase hex digits (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_checksums(sums_file) -> dict[str, str]:
    """Parse a ``sha256sum`` file: ``{file name: hex digest}`` (paths as written, ``*`` stripped)."""
    sums = {}
    for line in Path(sums_file).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        digest, _, name = line.partition(" ")
        sums[name.strip().lstrip("*")] = digest.lower()
    return sums


def verify_file(path, sums_file, regenerate: str) -> str:
    """Check ``path`` against its entry in ``sums_file``; return the digest, or raise.

    Parameters
    ----------
    path : path-like
        The file to check; it is listed in ``sums_file`` by its name relative to the folder of
        ``sums_file`` (the ``sha256sum -c`` convention).
    sums_file : path-like
        A ``sha256sum``-format list.
    regenerate : str
        The command that rebuilds the file, quoted in the error message.

    Raises
    ------
    DataNotFoundError
        The file's folder does not exist (the message says how to get the data).
    FileNotFoundError
        The file is missing (the message gives the command that builds it).
    ChecksumError
        No checksum is listed, or the file's SHA-256 differs from the listed one.
    """
    path, sums_file = Path(path), Path(sums_file)
    if not path.exists() and not path.parent.is_dir():
        raise DataNotFoundError(f"{path.parent} does not exist, so {path.name} cannot be read. {GET_THE_DATA}")
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; build it with `{regenerate}` (from the repository root).")
    if not sums_file.exists():
        raise ChecksumError(f"cannot verify {path.name}: the checksum list {sums_file} is missing. "
                            f"Rebuild the file with `{regenerate}` and list it there, or pass verify=False.")
    try:
        key = str(path.resolve().relative_to(sums_file.resolve().parent))
    except ValueError:
        key = path.name
    listed = read_checksums(sums_file)
    expected = listed.get(key, listed.get(path.name))
    if expected is None:
        raise ChecksumError(f"{path.name} has no entry in {sums_file}; rebuild it with `{regenerate}` "
                            "and update the list, or pass verify=False.")
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumError(
            f"{path.name} does not match its SHA-256 in {sums_file} (expected {expected[:12]}..., got "
            f"{actual[:12]}...): the file is corrupted or was changed. Regenerate it with `{regenerate}` "
            "(from the repository root), or restore it with `git checkout`.")
    return actual


# --------------------------------------------------------------------------------------------
# Opening files
# --------------------------------------------------------------------------------------------

def dataset_path(name: str, data_dir=None) -> Path:
    """Path of the shipped dataset ``name`` (a key of :data:`DATASETS`) in ``data_dir``.

    ``data_dir`` defaults to :func:`find_data_dir`, which raises :class:`DataNotFoundError`
    with instructions when the package is installed without its data.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; shipped ones are {sorted(DATASETS)}. "
                         "For another file, open it with xarray.open_dataset and pass the Dataset on.")
    return Path(data_dir or find_data_dir()) / DATASETS[name].file


def load_dataset(name: str, data_dir=None, verify: bool = True) -> xr.Dataset:
    """Open a shipped dataset, checked against ``data/SHA256SUMS``, fully loaded into memory.

    Parameters
    ----------
    name : str
        ``"held_suarez"``, ``"held_suarez_heldout"``, ``"irish_wind"``, ``"clemson"`` or
        ``"ncep_air_small"`` (see :data:`DATASETS`).
    data_dir : path-like, optional
        Folder holding the file and its ``SHA256SUMS`` (default: :func:`find_data_dir`).
    verify : bool
        Check the SHA-256 first (default). A mismatch raises :class:`ChecksumError` naming the
        file and the command that regenerates it.

    Returns
    -------
    xarray.Dataset
        Decoded values (packed int16 become float32/float64), layout checked with
        :func:`validate_layout`; the attribute ``sha256`` holds the file's digest.
    """
    info = DATASETS.get(name)
    path = dataset_path(name, data_dir)
    digest = verify_file(path, path.parent / "SHA256SUMS", info.regenerate) if verify else None
    with xr.open_dataset(path) as ds:
        ds = ds.load()
    validate_layout(ds, info.variables, _LAYOUT_DIMS[info.layout])
    ds.attrs["sha256"] = digest or sha256_file(path)
    ds.attrs["tqslite_name"] = name
    return ds


def open_remote(url: str, sha256: str, cache_dir=None, timeout: float = 10.0) -> xr.Dataset:
    """Download a netCDF file once (checked against ``sha256``), cache it, and open it.

    Meant for a reader with internet who wants to run the book on a real reanalysis; nothing in
    tqslite calls it. Without a connection it fails at once (within ``timeout`` seconds) with a
    :class:`ConnectionError` that says what to do instead: download the file by other means and
    pass ``xarray.open_dataset(path)`` to the same functions.

    Parameters
    ----------
    url : str
        ``http(s)://`` address of a netCDF file (a local file needs no download: open it with
        ``xarray.open_dataset``).
    sha256 : str
        Its expected SHA-256 (hex); a download that does not match is deleted and refused.
    cache_dir : path-like, optional
        Where downloads are kept (default ``~/.cache/tqslite``). A cached file with the right
        digest is used without touching the network.
    timeout : float
        Seconds to wait for the server before giving up.

    Returns
    -------
    xarray.Dataset
        Loaded into memory.
    """
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https"):
        raise ValueError(f"open_remote downloads http(s):// addresses, not {url!r}; "
                         "open a local file with xarray.open_dataset(path).")
    sha256 = sha256.lower()
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ValueError(f"sha256={sha256!r} is not a SHA-256 (64 hex digits); `sha256sum FILE` prints one.")
    cache = Path(cache_dir or Path.home() / ".cache" / "tqslite")
    path = cache / f"{sha256[:16]}-{Path(parsed.path).name or 'download.nc'}"
    if not (path.exists() and sha256_file(path) == sha256):
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                shutil.copyfileobj(resp, out)
        except (urllib.error.URLError, OSError, ValueError) as err:
            os.unlink(tmp)
            raise ConnectionError(
                f"could not download {url} ({err}). tqslite needs no network for its own data; for "
                "this one, download the file by other means, then pass xarray.open_dataset(path) to "
                "the tqslite.data functions.") from None
        got = sha256_file(tmp)
        if got != sha256:
            os.unlink(tmp)
            raise ChecksumError(f"{url} downloaded, but its SHA-256 is {got[:12]}..., not {sha256[:12]}...: "
                                "the file changed on the server or the checksum is wrong; nothing was kept.")
        os.replace(tmp, path)
    with xr.open_dataset(path) as ds:
        return ds.load()
