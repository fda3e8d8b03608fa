"""Data loaders: checksums, layout checks, splits, training-only statistics, windows, remote files."""

import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from tqslite import data as D

NCEP = "ncep_air_small"


@pytest.fixture(scope="module")
def ncep():
    return D.load_dataset(NCEP)


def _copy_with_sums(tmp_path, name=NCEP):
    """A data folder holding one shipped file and a SHA256SUMS that lists it correctly."""
    src = D.dataset_path(name)
    shutil.copy(src, tmp_path / src.name)
    (tmp_path / "SHA256SUMS").write_text(f"{D.sha256_file(src)}  {src.name}\n")
    return tmp_path / src.name


def station_dataset(n_time=100, stations=("A", "B", "C"), seed=0) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    time = pd.date_range("2000-01-01", periods=n_time, freq="D")
    values = rng.normal(10, 3, size=(n_time, len(stations))).astype("float32")
    return xr.Dataset({"wind_speed": (("time", "station"), values)}, coords={"time": time, "station": list(stations)})


# --------------------------------------------------------------------------------------------
# Checksums
# --------------------------------------------------------------------------------------------

def test_shipped_files_match_their_checksums():
    sums = D.read_checksums(D.DATA_DIR / "SHA256SUMS")
    for name, info in D.DATASETS.items():
        assert info.file in sums, f"{info.file} is not listed in data/SHA256SUMS"
    ds = D.load_dataset(NCEP)
    assert ds.attrs["sha256"] == sums["ncep_air_small.nc"]


def test_a_corrupted_file_is_refused_with_its_name_and_the_regeneration_command(tmp_path):
    path = _copy_with_sums(tmp_path)
    assert D.load_dataset(NCEP, data_dir=tmp_path).sizes["time"] == 20   # the pristine copy loads
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF                                            # flip one byte
    path.write_bytes(bytes(raw))
    with pytest.raises(D.ChecksumError) as err:
        D.load_dataset(NCEP, data_dir=tmp_path)
    assert "ncep_air_small.nc" in str(err.value)
    assert "python data/scripts/extract_ncep_small.py" in str(err.value)
    assert D.load_dataset(NCEP, data_dir=tmp_path, verify=False).sizes["time"] == 20  # opt-out exists


def test_a_missing_file_or_checksum_entry_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="extract_ncep_small.py"):
        D.load_dataset(NCEP, data_dir=tmp_path)
    _copy_with_sums(tmp_path)
    (tmp_path / "SHA256SUMS").write_text("")
    with pytest.raises(D.ChecksumError, match="no entry"):
        D.load_dataset(NCEP, data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown dataset"):
        D.load_dataset("era5")


# --------------------------------------------------------------------------------------------
# Finding the data folder
# --------------------------------------------------------------------------------------------

def test_tqslite_data_points_the_loaders_at_another_folder(tmp_path, monkeypatch):
    _copy_with_sums(tmp_path)
    monkeypatch.setenv("TQSLITE_DATA", str(tmp_path))
    assert D.find_data_dir() == tmp_path
    assert D.dataset_path(NCEP) == tmp_path / "ncep_air_small.nc"
    assert D.load_dataset(NCEP).sizes["time"] == 20
    monkeypatch.setenv("TQSLITE_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(D.DataNotFoundError, match="TQSLITE_DATA=.*nowhere has no SHA256SUMS"):
        D.load_dataset(NCEP)
    monkeypatch.delenv("TQSLITE_DATA")
    assert D.find_data_dir() == D.REPOSITORY_DATA == Path(__file__).resolve().parent.parent / "data"


NOT_EDITABLE = """
import sys
from tqslite import data, models
for load in (lambda: data.load_dataset("ncep_air_small"), lambda: models.load("timesfm_lite")):
    try:
        print("loaded", load().__class__.__name__)
    except data.DataNotFoundError as err:
        print("DataNotFoundError:", err)
"""


def test_an_install_without_the_repository_says_how_to_get_the_data(tmp_path):
    """The package copied alone into a site folder, as ``pip install .`` puts it: no data/ beside it."""
    site = tmp_path / "site-packages"
    shutil.copytree(Path(D.__file__).parent, site / "tqslite", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in ("TQSLITE_DATA", "PYTHONPATH")}
    run = functools.partial(subprocess.run, [sys.executable, "-c", NOT_EDITABLE], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    out = run(env={**env, "PYTHONPATH": str(site)})
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.strip().splitlines()
    assert first.startswith("DataNotFoundError: tqslite's shipped data were not found") and "TQSLITE_DATA" in first
    assert "pip install -e ." in first
    assert second.startswith("DataNotFoundError:") and "checkpoints does not exist" in second
    out = run(env={**env, "PYTHONPATH": str(site), "TQSLITE_DATA": str(D.REPOSITORY_DATA)})
    assert out.stdout.split() == ["loaded", "Dataset", "loaded", "tuple"], out.stderr


# --------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------

def test_missing_variable_and_dimension_are_named(ncep):
    with pytest.raises(ValueError, match=r"variable\(s\) \['z500'\] missing"):
        D.validate_layout(ncep, ["air", "z500"], ("time", "lat", "lon"))
    with pytest.raises(ValueError, match=r"dimension\(s\) \['station'\] missing"):
        D.validate_layout(ncep, ["air"], ("time", "station"))
    with pytest.raises(ValueError, match="lon"):
        D.stack_grid(ncep.rename(lon="x"))
    assert D.validate_layout(ncep, ["air"], ("time", "lat", "lon")) is ncep


def test_stack_grid_gives_time_channel_lat_lon(ncep):
    two = ncep.assign(air2=ncep["air"] * 2)
    state = D.stack_grid(two, ["air2", "air"])
    assert state.dims == ("time", "channel", "lat", "lon")
    assert state.shape == (20, 2, 25, 53) and state.dtype == np.float32
    assert list(state["channel"].values) == ["air2", "air"]
    np.testing.assert_allclose(state.values[:, 0], 2 * state.values[:, 1], rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Splits and statistics
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [dict(fractions=(0.5, 0.25, 0.25)), dict(fractions=(0.6, 0.2, 0.2), gap=1),
                                    dict(dates=("2014-02-26T18:00", "2014-02-27T18:00"))])
def test_splits_are_in_time_order_and_do_not_overlap(ncep, kwargs):
    splits = D.split_time(ncep, **kwargs)
    times = [s["time"].values for s in splits]
    for t in times:
        assert len(t) > 0 and np.all(np.diff(t) > np.timedelta64(0))
    assert times[0][-1] < times[1][0] and times[1][-1] < times[2][0]
    assert not set(times[0]) & set(times[1]) and not set(times[1]) & set(times[2])
    if "dates" in kwargs:
        assert times[0][-1] == np.datetime64("2014-02-26T18:00")
    if kwargs.get("gap"):
        steps = list(ncep["time"].values)
        assert steps.index(times[1][0]) - steps.index(times[0][-1]) == 2


def test_bad_splits_are_refused(ncep):
    with pytest.raises(ValueError, match="sum"):
        D.split_time(ncep, (0.8, 0.3, 0.1))
    with pytest.raises(ValueError, match="empty"):
        D.split_time(ncep, (1.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="increasing"):
        D.split_time(ncep.isel(time=slice(None, None, -1)))


def test_normalisation_statistics_come_from_the_training_period_only(ncep):
    before = D.normalization_stats(D.split_time(ncep).train)
    changed = ncep.copy(deep=True)
    changed["air"][-1, 0, 0] = 1e6               # a wild value in the test period
    changed["air"][15, 3, 3] = -1e6              # and one in the validation period (steps 14-16)
    after = D.normalization_stats(D.split_time(changed).train)
    xr.testing.assert_identical(before, after)
    n_train = D.split_time(ncep).train.sizes["time"]
    np.testing.assert_allclose(float(before["air"].sel(stat="mean")), ncep["air"].values[:n_train].mean(), rtol=1e-12)
    np.testing.assert_allclose(float(before["air"].sel(stat="std")), ncep["air"].values[:n_train].std(), rtol=1e-12)
    # ... whereas statistics of the whole record do move
    assert float(D.normalization_stats(changed)["air"].sel(stat="std")) > 1e3


def test_normalise_then_denormalise_is_the_identity_and_stats_survive_json(ncep):
    stats = D.normalization_stats(D.split_time(ncep).train)
    z = D.normalize(ncep, stats)
    assert abs(float(z["air"].isel(time=slice(0, 14)).mean())) < 1e-9
    xr.testing.assert_allclose(D.denormalize(z, stats), ncep[["air"]])
    import json
    xr.testing.assert_identical(D.stats_from_dict(json.loads(json.dumps(stats.to_dict()))), stats)


def test_per_station_statistics():
    ds = station_dataset()
    stats = D.normalization_stats(D.split_time(ds).train, over="time")
    assert stats["wind_speed"].dims == ("stat", "station")
    z = D.normalize(ds, stats).isel(time=slice(0, 70))
    np.testing.assert_allclose(z["wind_speed"].mean("time"), 0, atol=1e-6)
    with pytest.raises(ValueError, match="spread"):
        D.normalization_stats(ds.assign(wind_speed=ds["wind_speed"] * 0))


# --------------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------------

def test_time_windows_and_initial_states_have_the_right_shapes(ncep):
    state = D.stack_grid(ncep)
    win = D.time_windows(state, length=5, n=4)
    assert win.dims == ("window", "step", "channel", "lat", "lon") and win.shape == (4, 5, 1, 25, 53)
    assert list(win["start"].values) == [0, 5, 10, 15]          # evenly spaced, last start = 20 - 5
    np.testing.assert_array_equal(win.values[2, 3], state.values[13])
    x0 = D.initial_states(state, 6, horizon=4, method="random", seed=3)
    assert x0.shape == (6, 1, 25, 53) and x0["start"].max() <= 15
    again = D.initial_states(state, 6, horizon=4, method="random", seed=3)
    np.testing.assert_array_equal(x0["start"], again["start"])      # seeded
    assert len(D.time_windows(state, 3)["window"]) == 18              # every start
    with pytest.raises(ValueError, match="fit"):
        D.initial_states(state, 17, horizon=4)


def test_series_windows_cover_every_station_and_skip_missing_values():
    ds = station_dataset(n_time=30)
    ds["wind_speed"][10, 1] = np.nan
    series = D.stack_series(ds, "wind_speed")
    win = D.series_windows(series, length=8)
    assert win.dims == ("window", "step") and win.shape[1] == 8
    # 23 starts x 3 stations, minus the 8 windows of station B that contain day 10
    assert len(win.window) == 23 * 3 - 8 and np.isfinite(win.values).all()
    w0 = win.isel(window=5)
    col = list(series["station"].values).index(str(w0["station"].values))
    np.testing.assert_array_equal(w0.values, series.values[int(w0["start"]):int(w0["start"]) + 8, col])
    assert D.series_windows(series, 8, n=10, method="random", seed=1).shape == (10, 8)
    single = D.stack_series(xr.Dataset({"tmax": ("time", np.arange(20.0))},
                                       coords={"time": pd.date_range("2000", periods=20)}), "tmax")
    assert single.dims == ("time", "station") and single.shape == (20, 1)


def test_annual_cycle_fit_recovers_a_seasonal_signal():
    time = pd.date_range("1990-01-01", "1999-12-31", freq="D")
    phase = 2 * np.pi * (time - pd.Timestamp("2000-01-01")).days.values / 365.2425
    truth = 3 + 2 * np.cos(phase) - 0.5 * np.sin(2 * phase)
    noise = np.random.default_rng(0).normal(0, 0.1, len(time))
    series = xr.DataArray((truth + noise)[:, None], dims=("time", "station"), coords={"time": time, "station": ["X"]})
    fit = D.annual_cycle(D.annual_cycle_fit(series), time).values[:, 0]
    assert np.abs(fit - truth).max() < 0.02


# --------------------------------------------------------------------------------------------
# Remote files
# --------------------------------------------------------------------------------------------

def test_open_remote_fails_at_once_when_the_server_cannot_be_reached(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(ConnectionError, match="download the file by other means"):
        D.open_remote("http://127.0.0.1:9/air.nc", "0" * 64, cache_dir=tmp_path, timeout=2)  # nothing listens
    assert time.perf_counter() - t0 < 5
    assert not list(tmp_path.iterdir())                              # no partial file left


def test_open_remote_refuses_a_local_path_or_a_malformed_checksum(tmp_path):
    with pytest.raises(ValueError, match="xarray.open_dataset"):
        D.open_remote(D.dataset_path(NCEP).as_uri(), D.sha256_file(D.dataset_path(NCEP)), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="64 hex digits"):
        D.open_remote("http://127.0.0.1:9/air.nc", "e56e75ae", cache_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_open_remote_downloads_checks_and_caches(tmp_path, ncep):
    served = tmp_path / "served"
    served.mkdir()
    path = _copy_with_sums(served)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{path.name}"
        cache = tmp_path / "cache"
        got = D.open_remote(url, D.sha256_file(path), cache_dir=cache, timeout=5)
        xr.testing.assert_identical(got["air"], ncep["air"])
        with pytest.raises(D.ChecksumError, match="nothing was kept"):
            D.open_remote(url, "f" * 64, cache_dir=cache, timeout=5)
    finally:
        server.shutdown()
        server.server_close()
    # the good file stays cached: opening it again needs no server
    assert D.open_remote(url, D.sha256_file(path), cache_dir=cache, timeout=1).sizes["time"] == 20


# --------------------------------------------------------------------------------------------
# data/README.md quotes what data/scripts/describe.py prints
# --------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent

#: Sentences of data/README.md with the printed values in place of ``{name}`` (line breaks and
#: list indents of the README read as single spaces): each value is bound to its quantity.
README_QUOTES = [
    "Total size about {files.total_mb} MB",
    "| {hs.dims} | {held_suarez_t21.nc.bytes} |",
    "| {hs_heldout.dims} | {held_suarez_t21_heldout.nc.bytes} |",
    "| {wind.dims} | {irish_wind.nc.bytes} |",
    "| {clemson.dims} | {clemson_temps.nc.bytes} |",
    "| {ncep.dims} | {ncep_air_small.nc.bytes} |",
    "Spin-up {hs.spinup_days} days",
    "Main run: seed {hs.seed}, {hs.steps} snapshots ({hs.days} days)",
    "Held-out run: seed {hs_heldout.seed}, its own {hs_heldout.spinup_days}-day spin-up, "
    "{hs_heldout.steps} snapshots ({hs_heldout.days} days)",
    "divide by {hs.gravity} m s⁻²",
    "| m² s⁻² | {hs.z500.packing} (", "| K | {hs.t850.packing} (", "| Pa | {hs.ps.packing} (",
    "RMS 24-hour change is {hs.z500.rms_24h} m² s⁻² for z500 and {hs.t850.rms_24h} K for t850",
    "zonal-mean, is {hs.z500.rms_unrelated} m² s⁻²",
    "centres (σ = {hs.sigma_centres})",
    "p_s < {hs.extrapolation_ps_hpa} hPa: {hs.extrapolated_points} grid points of the main file",
    "**ascending** ({hs.lat}, degrees_north)",
    "main run {hs.time}; held-out run {hs_heldout.time}.",
    "u250 maxima (main file): {hs.u250.jet_south} (grid maximum; parabolic peak "
    "{hs.u250.jet_south_parabolic}) and {hs.u250.jet_north} (parabolic peak {hs.u250.jet_north_parabolic})",
    "The u850 maxima are {hs.u850.jet_south} and {hs.u850.jet_north}.",
    "Held-out file: u250 peaks {hs_heldout.u250.jet_south_parabolic} and {hs_heldout.u250.jet_north_parabolic}.",
    "z500 {hs.z500.range} m² s⁻²; t850 {hs.t850.range} K; u250 {hs.u250.range} m s⁻¹; ps {hs.ps.range} Pa; "
    "area-unweighted means ps {hs.ps.mean} Pa, t850 {hs.t850.mean} K",
    "{wind.time}: **{wind.days} days** × 12 stations",
    "column order: {wind.stations})",
    "Mean over all stations and days: {wind.mean} knots.",
    "→ {wind.VAL.latitude})",
    "{clemson.time}, on a complete daily axis of **{clemson.days} days**",
    "The source has {clemson.source_rows} rows",
    "Total NaN in the file: tmax {clemson.missing_tmax}, tmin {clemson.missing_tmin}.",
    "Remaining ranges: tmax {clemson.tmax.range} °F, tmin {clemson.tmin.range} °F",
    "on {clemson.tmin.max_day} looks doubtful",
    "{ncep.time} ({ncep.steps} steps)",
    "**descending** {ncep.lat} °N, 53 longitudes {ncep.lon} °E. Range {ncep.range} K.",
    "sha256 `{ncep.sha256}`",
]

#: Numbers of data/README.md that describe no shipped file, each with why it is there (what is
#: checked: :func:`checked_paragraphs`).
NOT_DATA = {
    "1994": "year of Held & Suarez's paper",
    "850": "a pressure level (hPa) in a variable's description", "24": "the interval of the RMS change (hours)",
    "0.2": "the z500 packing step in geopotential metres: 2 / 9.80616", "0.44": "timing at regeneration (said so)",
    "5.5": "timing at regeneration (said so)", "2.5": "timing at regeneration (said so)",
    "33": "rounded from the parabolic peaks quoted before it", "34": "rounded from the parabolic peaks",
    "35": "the jet latitude expected from HS94 runs", "40": "the jet latitude expected / the doubling run's 40 days",
    "30": "start of the third doubling pair (day 30)", "0.010938": "dinosaur's default filter setting",
    "18": "dinosaur's default filter setting", "0.514444": "the definition of a knot in m/s",
    "0.5418": "the typo quoted from gstat's help page",
}

NUMBER = re.compile(r"(?<![\w.\-−/])[-−]?\d[\d,]*(?:\.\d+)?(?!\w)")


def numbers(text: str) -> list[str]:
    return [n.replace("−", "-").rstrip(",") for n in NUMBER.findall(text)]


def checked_paragraphs(readme: str) -> list[str]:
    """Paragraphs of the README that describe the shipped files.

    The text before the first section (the table of files) and the sections whose heading names
    a file that ``describe.py`` reads; within them, not code, nor the provenance and licence
    paragraphs (citations). Other sections (the environment used, data that are not shipped)
    are left to their own checks.
    """
    shipped = re.findall(r'"(\w+\.nc)"', (REPO / "data" / "scripts" / "describe.py").read_text())
    sections = re.split(r"\n(?=## )", re.sub(r"```.*?```", " ", readme, flags=re.S))
    kept = [sections[0]] + [s for s in sections[1:] if any(f in s.splitlines()[0] for f in shipped)]
    paragraphs = re.split(r"\n\s*\n", re.sub(r"`[^`]*`", " ", "\n\n".join(kept)))
    return [p for p in paragraphs if not re.match(r"\s*(#|\*\*(Provenance|Licence))", p)]


#: The same for the data section of the repository's README.md.
MAIN_README_QUOTES = [
    "Irish daily wind at {wind.station_count} stations ({wind.years}), Clemson SC daily temperatures "
    "({clemson.years}) and a {ncep.steps}-step slice of the NCEP reanalysis",
]


@pytest.fixture(scope="module")
def described() -> dict[str, str]:
    out = subprocess.run([sys.executable, str(REPO / "data" / "scripts" / "describe.py")],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr
    return dict(line.split(" = ", 1) for line in out.stdout.splitlines())


def test_data_readme_quotes_what_describe_prints(described):
    readme = " ".join((REPO / "data" / "README.md").read_text().split())
    for template in README_QUOTES:
        quote = re.sub(r"\{([\w.]+)\}", lambda m: described[m.group(1)], template)
        assert quote in readme, f"data/README.md should say {quote!r} (python data/scripts/describe.py)"
    readme = " ".join((REPO / "README.md").read_text().split())
    for template in MAIN_README_QUOTES:
        quote = re.sub(r"\{([\w.]+)\}", lambda m: described[m.group(1)], template)
        assert quote in readme, f"README.md should say {quote!r} (python data/scripts/describe.py)"


def test_every_number_in_the_data_readme_is_printed_or_explained(described):
    printed = set(numbers(" ".join(described.values())))
    readme = (REPO / "data" / "README.md").read_text()
    unsourced = [(n, p.strip()[:50]) for p in checked_paragraphs(readme) for n in numbers(p)
                 if n not in printed and n not in NOT_DATA]
    assert not unsourced, ("numbers in data/README.md that data/scripts/describe.py does not print: "
                           f"{unsourced}; print them there, or list them in NOT_DATA with the reason")
