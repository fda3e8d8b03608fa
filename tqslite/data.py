"""Data: the shipped datasets as xarray objects, checked, split, normalised and cut into windows.

Everything here works on any ``xarray.Dataset`` of the same layout, so a reader with a real
reanalysis opens it with ``xarray.open_dataset`` and passes it to the same functions:

* :func:`find_data_dir` finds the folder of the shipped files: the environment variable
  ``TQSLITE_DATA``, else the ``data/`` folder of the repository the package sits in (an
  editable install, ``pip install -e .``); otherwise it says how to get the data.
* :func:`load_dataset` opens a file shipped in ``data/`` after checking its SHA-256 against
  ``data/SHA256SUMS`` (checkpoints: ``data/checkpoints/SHA256SUMS``); a mismatch is refused with
  the file's name and the command that regenerates it (:class:`ChecksumError`).
* :func:`validate_layout` says which variable or dimension a Dataset lacks.
* :func:`split_time` cuts the time axis into train / validation / test periods, in time order and
  without overlap, by fractions or by dates.
* :func:`normalization_stats` computes mean and standard deviation per variable on the
  **training period only** (pass the training split); :func:`normalize` and :func:`denormalize`
  apply them.
* :func:`stack_grid` turns gridded variables into a state array ``(time, channel, lat, lon)``;
  :func:`stack_series` turns station records into ``(time, station)``.
* :func:`time_windows`, :func:`series_windows` and :func:`initial_states` cut windows of
  consecutive steps (evenly spaced or seeded random) for training, probes and evaluation.
* :func:`open_remote` fetches a file from a URL with a SHA-256; offline it fails at once with a
  message saying what to do instead, and never hangs.

Layouts. *Grid*: dims ``time``, ``lat``, ``lon`` (any latitude order), one variable per field.
*Stations*: dims ``time`` and ``station``. *Series*: dim ``time`` only.

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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import xarray as xr

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


# --------------------------------------------------------------------------------------------
# Layout checks and splits
# --------------------------------------------------------------------------------------------

def validate_layout(ds: xr.Dataset, variables: Iterable[str] = (), dims: Iterable[str] = ("time",)) -> xr.Dataset:
    """Check that ``ds`` has the ``variables`` and ``dims`` asked for; return it unchanged.

    Raises
    ------
    ValueError
        Naming every missing variable and dimension, and what the Dataset has instead.
    """
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"expected an xarray.Dataset, got {type(ds).__name__}.")
    missing_vars = [v for v in variables if v not in ds.data_vars]
    missing_dims = [d for d in dims if d not in ds.dims]
    if missing_vars or missing_dims:
        parts = []
        if missing_vars:
            parts.append(f"variable(s) {missing_vars} missing (it has {sorted(ds.data_vars)})")
        if missing_dims:
            parts.append(f"dimension(s) {missing_dims} missing (it has {sorted(ds.dims)})")
        raise ValueError("the Dataset does not have the expected layout: " + "; ".join(parts) + ".")
    for v in variables:
        absent = [d for d in dims if d not in ds[v].dims]
        if absent:
            raise ValueError(f"variable {v!r} lacks dimension(s) {absent}: its dims are {ds[v].dims}.")
    return ds


class Splits(NamedTuple):
    """Three consecutive, non-overlapping periods of one Dataset, in time order."""

    train: xr.Dataset
    validation: xr.Dataset
    test: xr.Dataset


def split_time(ds: xr.Dataset, fractions: Sequence[float] = (0.7, 0.15, 0.15), dates=None,
               gap: int = 0) -> Splits:
    """Cut ``ds`` along ``time`` into train, validation and test periods.

    Parameters
    ----------
    ds : xarray.Dataset
        With a ``time`` dimension in increasing order.
    fractions : three floats
        Shares of the time steps for train, validation and test (they must sum to at most 1;
        whatever is left at the end is not used). Ignored when ``dates`` is given.
    dates : (str, str), optional
        The last time stamp of the training period and of the validation period (inclusive),
        e.g. ``("1972-12-31", "1975-12-31")``; the test period is the rest.
    gap : int
        Time steps dropped after the training and after the validation period, so that windows
        cut near a boundary do not see the next period.

    Returns
    -------
    Splits
        ``(train, validation, test)``; each keeps ``time`` in order, and no time stamp is in two.
    """
    validate_layout(ds)
    times = ds["time"].values
    n = len(times)
    if n > 1 and not np.all(times[1:] > times[:-1]):
        raise ValueError("time must be strictly increasing to split by period; sort the Dataset first (ds.sortby('time')).")
    if dates is not None:
        if len(dates) != 2:
            raise ValueError(f"dates={dates!r}: give (end of training, end of validation).")
        ends = [int(np.searchsorted(times, np.datetime64(d), side="right")) for d in dates]
        if ends[1] < ends[0]:
            raise ValueError(f"dates={dates!r}: the validation period must end after the training period.")
        bounds = [(0, ends[0]), (ends[0] + gap, ends[1]), (ends[1] + gap, n)]
    else:
        f = [float(x) for x in fractions]
        if len(f) != 3 or min(f) < 0 or sum(f) > 1 + 1e-9:
            raise ValueError(f"fractions={fractions!r}: give three non-negative shares summing to at most 1.")
        e1, e2, e3 = (int(round(c * n)) for c in np.cumsum(f))
        bounds = [(0, e1), (e1 + gap, e2), (e2 + gap, e3)]
    parts = [ds.isel(time=slice(a, max(a, b))) for a, b in bounds]
    empty = [name for name, p in zip(Splits._fields, parts) if p.sizes["time"] == 0]
    if empty:
        raise ValueError(f"the {' and '.join(empty)} period(s) would be empty ({n} time steps, "
                         f"fractions={fractions}, dates={dates}, gap={gap}).")
    return Splits(*parts)


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------

def normalization_stats(train: xr.Dataset, variables: Iterable[str] | None = None, over=None) -> xr.Dataset:
    """Mean and standard deviation of each variable, computed on the training period you pass.

    Parameters
    ----------
    train : xarray.Dataset
        The **training split** (``split_time(ds).train``): statistics must not see the periods
        that are evaluated.
    variables : list of str, optional
        Which data variables (default all).
    over : str or list of str, optional
        Dimensions to reduce (default: all of each variable's dims, one number per variable).
        ``over="time"`` keeps the other dims, e.g. one mean and std per station.

    Returns
    -------
    xarray.Dataset
        The same variables with a leading dimension ``stat = ["mean", "std"]`` (NaNs skipped);
        ``stats.to_dict()`` / ``xarray.Dataset.from_dict`` round-trip it through JSON.
    """
    variables = list(variables or train.data_vars)
    validate_layout(train, variables)
    over = [over] if isinstance(over, str) else over
    out = {}
    for v in variables:
        da = train[v].astype("float64")
        dims = list(over) if over is not None else list(da.dims)
        mean, std = da.mean(dims, skipna=True), da.std(dims, skipna=True)
        bad = ~(np.isfinite(std) & (std > 0))
        if bool(bad.any()):
            raise ValueError(f"variable {v!r} has zero or undefined spread over {dims} in the training period; "
                             "it cannot be normalised (drop it, or reduce over more dimensions).")
        out[v] = xr.concat([mean, std], dim="stat").drop_vars([c for c in mean.coords if c not in mean.dims])
    return xr.Dataset(out).assign_coords(stat=["mean", "std"])


def normalize(ds: xr.Dataset, stats: xr.Dataset) -> xr.Dataset:
    """``(ds - mean) / std`` for every variable in ``stats`` (others are dropped); float32 kept."""
    validate_layout(ds, list(stats.data_vars))
    out = {v: ((ds[v] - stats[v].sel(stat="mean", drop=True)) / stats[v].sel(stat="std", drop=True)).astype(ds[v].dtype)
           for v in stats.data_vars}
    return xr.Dataset(out, attrs=ds.attrs)


def denormalize(ds: xr.Dataset, stats: xr.Dataset) -> xr.Dataset:
    """Inverse of :func:`normalize`: ``ds * std + mean``, back to physical units."""
    validate_layout(ds, list(stats.data_vars))
    out = {v: (ds[v] * stats[v].sel(stat="std", drop=True) + stats[v].sel(stat="mean", drop=True)).astype(ds[v].dtype)
           for v in stats.data_vars}
    return xr.Dataset(out, attrs=ds.attrs)


def stats_from_dict(d: dict) -> xr.Dataset:
    """Rebuild statistics saved with ``stats.to_dict()`` (for example from a checkpoint's JSON)."""
    return xr.Dataset.from_dict(d)


# --------------------------------------------------------------------------------------------
# State arrays
# --------------------------------------------------------------------------------------------

def stack_grid(ds: xr.Dataset, variables: Sequence[str] | None = None, dtype="float32") -> xr.DataArray:
    """Stack gridded variables into the state array ``(time, channel, lat, lon)``.

    ``channel`` is labelled by the variable names, in the order given (default: the Dataset's).
    """
    variables = list(variables or ds.data_vars)
    validate_layout(ds, variables, ("time", "lat", "lon"))
    da = ds[variables].to_array("channel").transpose("time", "channel", "lat", "lon")
    return da.astype(dtype).rename("state")


def stack_series(ds: xr.Dataset, variable: str, dtype="float32") -> xr.DataArray:
    """One variable of a station Dataset as ``(time, station)`` (a single series gets ``station`` of size 1)."""
    validate_layout(ds, [variable])
    da = ds[variable]
    if "station" not in da.dims:
        da = da.expand_dims(station=[variable])
    return da.transpose("time", "station").astype(dtype)


def lat_weights(lat) -> np.ndarray:
    """Latitude weights ``cos(lat) / mean(cos(lat))`` (mean 1), for area-weighted RMSE.

    ``lat`` in degrees (array or DataArray); returns float64 of the same length.
    """
    w = np.cos(np.deg2rad(np.asarray(lat, dtype=np.float64)))
    return w / w.mean()


# --------------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------------

def window_starts(n_time: int, length: int, n: int | None = None, method: str = "even", seed: int = 0,
                  stride: int = 1) -> np.ndarray:
    """Start indices of windows of ``length`` consecutive steps inside ``n_time`` steps.

    ``n=None`` gives every start ``0, stride, 2 stride, ...``; otherwise ``n`` starts, evenly
    spaced over the whole period (``method="even"``, first and last possible start included)
    or drawn without replacement by a generator seeded with ``seed`` (``"random"``), sorted.
    """
    last = n_time - length
    if length < 1 or last < 0:
        raise ValueError(f"a window of {length} steps does not fit in {n_time} time steps.")
    if n is None:
        return np.arange(0, last + 1, stride)
    if n < 1 or n > last + 1:
        raise ValueError(f"n={n} windows of {length} steps: between 1 and {last + 1} fit in {n_time} steps.")
    if method == "even":
        starts = np.unique(np.round(np.linspace(0, last, n)).astype(np.int64))
        if len(starts) < n:  # only when n is close to last + 1
            starts = np.arange(n)
        return starts
    if method == "random":
        return np.sort(np.random.default_rng(seed).choice(last + 1, size=n, replace=False))
    raise ValueError(f"method={method!r}: use 'even' or 'random'.")


def time_windows(state: xr.DataArray, length: int, n: int | None = None, method: str = "even", seed: int = 0,
                 stride: int = 1) -> xr.DataArray:
    """Cut ``state`` ``(time, *S)`` into windows ``(window, step, *S)`` of ``length`` consecutive steps.

    For an evaluation with ``horizon`` leads, use ``length = 1 + horizon``: ``w[:, 0]`` are the
    initial states and ``w[:, 1:]`` the truth at leads ``1..horizon``. Coordinates:
    ``start(window)`` (index into ``time``) and ``init_time(window)``.
    """
    starts = window_starts(state.sizes["time"], length, n, method, seed, stride)
    values = state.values
    idx = starts[:, None] + np.arange(length)[None, :]
    other = [d for d in state.dims if d != "time"]
    out = xr.DataArray(values[idx], dims=("window", "step", *other),
                       coords={d: state[d] for d in other if d in state.coords})
    return out.assign_coords(window=np.arange(len(starts)), step=np.arange(length), start=("window", starts),
                             init_time=("window", state["time"].values[starts]))


def initial_states(state: xr.DataArray, n: int, horizon: int = 0, method: str = "even", seed: int = 0) -> xr.DataArray:
    """``n`` initial states ``(window, *S)`` from ``state`` ``(time, *S)`` for probes and evaluation.

    Starts leave room for ``horizon`` further steps of truth; ``start`` and ``init_time`` say
    where each came from. Pass the split the states must come from (e.g. the test period).
    """
    return time_windows(state, 1 + horizon, n, method, seed).isel(step=0, drop=True)


def series_windows(series: xr.DataArray, length: int, n: int | None = None, method: str = "even", seed: int = 0,
                   stride: int = 1) -> xr.DataArray:
    """Windows ``(window, step)`` of ``length`` consecutive values from every station of ``(time, station)``.

    All ``(start, station)`` pairs with no missing value are candidates (``stride`` apart in
    time); ``n=None`` keeps them all, else ``n`` are taken evenly spaced through the list (ordered
    by start, then station) or drawn at random with ``seed``. Coordinates ``station(window)``,
    ``start(window)`` and ``init_time(window)``.
    """
    if series.dims != ("time", "station"):
        raise ValueError(f"series must have dims ('time', 'station'), got {series.dims}; use stack_series first.")
    starts = window_starts(series.sizes["time"], length, None, stride=stride)
    vals = series.values
    idx = starts[:, None] + np.arange(length)[None, :]
    win = vals[idx]                                   # (start, step, station)
    win = np.moveaxis(win, 2, 1).reshape(-1, length)  # (start * station, step)
    st = np.repeat(starts, series.sizes["station"])
    sta = np.tile(np.arange(series.sizes["station"]), len(starts))
    ok = np.isfinite(win).all(axis=1)
    win, st, sta = win[ok], st[ok], sta[ok]
    if n is not None:
        pick = window_starts(len(win), 1, n, method, seed)
        win, st, sta = win[pick], st[pick], sta[pick]
    return xr.DataArray(win, dims=("window", "step"), name=series.name).assign_coords(
        window=np.arange(len(win)), step=np.arange(length), start=("window", st),
        station=("window", series["station"].values[sta]), init_time=("window", series["time"].values[st]))


# --------------------------------------------------------------------------------------------
# Climatologies (the "no skill" reference forecasts)
# --------------------------------------------------------------------------------------------

def _harmonic_terms(time, harmonics: int) -> np.ndarray:
    """Design matrix ``(time, 1 + 2 * harmonics)``: 1, cos and sin of the annual phase and overtones."""
    t = np.asarray(time, dtype="datetime64[ns]")
    years = (t - np.datetime64("2000-01-01")) / np.timedelta64(1, "D") / 365.2425
    cols = [np.ones_like(years)]
    for k in range(1, harmonics + 1):
        cols += [np.cos(2 * np.pi * k * years), np.sin(2 * np.pi * k * years)]
    return np.stack(cols, axis=1)


def annual_cycle_fit(series: xr.DataArray, harmonics: int = 2) -> xr.DataArray:
    """Fit a smooth mean annual cycle to each station of ``series`` ``(time, station)``.

    Least squares on the mean plus ``harmonics`` annual harmonics (NaNs skipped). Pass the
    training period. Returns the coefficients ``(station, term)``; evaluate them with
    :func:`annual_cycle`.
    """
    x = _harmonic_terms(series["time"].values, harmonics)
    coefs = []
    for s in range(series.sizes["station"]):
        y = series.values[:, s].astype(np.float64)
        ok = np.isfinite(y)
        coefs.append(np.linalg.lstsq(x[ok], y[ok], rcond=None)[0])
    return xr.DataArray(np.asarray(coefs), dims=("station", "term"),
                        coords={"station": series["station"].values}, attrs={"harmonics": harmonics})


def annual_cycle(coefs: xr.DataArray, time) -> xr.DataArray:
    """The fitted annual cycle at the given times: ``(time, station)`` float64."""
    x = _harmonic_terms(time, int(coefs.attrs["harmonics"]))
    return xr.DataArray(x @ coefs.values.T, dims=("time", "station"),
                        coords={"time": np.asarray(time, dtype="datetime64[ns]"), "station": coefs["station"].values})
