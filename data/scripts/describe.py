"""Print the numbers that data/README.md (and the README's data section) quote, from the shipped files.

Run from the repository root (any environment that reads netCDF with xarray; a few seconds)::

    python data/scripts/describe.py

Each line is ``name = value``, the value formatted as the README quotes it, so that
``tests/test_data.py`` can check every quoted number against this output. The script
reads only the shipped files in ``data/`` (their sizes, encodings, global attributes and
values); numbers that only a regeneration can produce (the error-doubling time) come from the
saved output of that run, ``data/scripts/output/``, not from here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import xarray as xr

DATA = Path(__file__).resolve().parent.parent
FILES = ["held_suarez_t21.nc", "held_suarez_t21_heldout.nc", "irish_wind.nc", "clemson_temps.nc",
         "ncep_air_small.nc"]


def sig(x: float, digits: int = 4) -> str:
    """``x`` rounded to ``digits`` significant digits, with thousands separators and a true minus sign."""
    x = float(x)
    decimals = digits - 1 - int(np.floor(np.log10(abs(x)))) if x else 0
    return f"{round(x, decimals):,.{max(decimals, 0)}f}".replace("-", "−")


def fixed(x: float, decimals: int) -> str:
    """``x`` with ``decimals`` decimals and a true minus sign (as the README prints them)."""
    return f"{float(x):,.{decimals}f}".replace("-", "−")


def day(t) -> str:
    return str(np.datetime_as_string(np.datetime64(t, "m"))).replace("T", " ")


def jet_maxima(ds: xr.Dataset, var: str) -> dict[str, tuple[float, float, float, float]]:
    """Maximum of the zonal- and time-mean ``var`` in each hemisphere.

    Returns ``{"south"|"north": (grid maximum, its latitude, parabolic peak, its latitude)}``:
    the parabola goes through the grid maximum and its two neighbours (degrees, m/s).
    """
    zm = ds[var].mean(("time", "lon")).values.astype(np.float64)
    lat = ds["lat"].values.astype(np.float64)
    out = {}
    for name, sel in (("south", lat < 0), ("north", lat > 0)):
        z, la = zm[sel], lat[sel]
        i = int(np.argmax(z))
        c = np.polyfit(la[i - 1:i + 2], z[i - 1:i + 2], 2)
        at = -c[1] / (2 * c[0])
        out[name] = (z[i], la[i], float(np.polyval(c, at)), at)
    return out


def area_weights(lat) -> np.ndarray:
    w = np.cos(np.deg2rad(np.asarray(lat, dtype=np.float64)))
    return w / w.mean()


def files() -> dict[str, str]:
    out = {}
    total = 0
    for f in FILES:
        size = (DATA / f).stat().st_size
        total += size
        out[f"{f}.bytes"] = f"{size:,}"
    out["files.count"] = str(len(FILES))
    out["files.total_mb"] = f"{total / 1e6:.0f}"
    return out


def held_suarez(f: str, key: str) -> dict[str, str]:
    out = {}
    with xr.open_dataset(DATA / f) as ds:
        ds = ds.load()
        a = ds.attrs
        n = ds.sizes
        out[f"{key}.dims"] = f"time {n['time']}, lat {n['lat']}, lon {n['lon']}"
        out[f"{key}.steps"] = str(n["time"])
        out[f"{key}.days"] = f"{n['time'] / 4:g}"
        out[f"{key}.seed"] = str(int(a["seed"]))
        out[f"{key}.spinup_days"] = str(int(a["spinup_days"]))
        out[f"{key}.time"] = f"{day(ds.time.values[0])} … {day(ds.time.values[-1])}"
        out[f"{key}.history"] = a["history"]
        if key != "hs":
            return out
        for name in ("resolution", "time_step", "filter", "initial_condition", "output_interval"):
            out[f"hs.{name}"] = a[name]
        levels = int(a["resolution"].split(" equidistant sigma levels")[0].split()[-1])
        centres = (np.arange(levels) + 0.5) / levels              # equidistant layers: their centres
        out["hs.sigma_centres"] = f"{centres[0]:.2f} … {centres[-1]:.2f}"
        out["hs.lat"] = f"{fixed(ds.lat.min(), 2)} … {fixed(ds.lat.max(), 2)}"
        out["hs.lat_ascending"] = str(bool(np.all(np.diff(ds.lat.values) > 0)))
        out["hs.lon"] = f"{ds.lon.values[0]:g} … {ds.lon.values[-1]:g}, step {np.diff(ds.lon.values).mean():g}"
        for v in ds.data_vars:
            e = ds[v].encoding
            out[f"hs.{v}.packing"] = f"{e['scale_factor']:g} / {e['add_offset']:g}"
            out[f"hs.{v}.storage"] = (f"{e['dtype']}, _FillValue {e['_FillValue']}, shuffle {e['shuffle']}, "
                                      f"zlib level {e['complevel']}, chunks of {e['chunksizes'][0]} time steps")
            out[f"hs.{v}.missing"] = str(int(ds[v].isnull().sum()))
        g = ds["z500"].attrs["long_name"].split("divide by ")[1].split(" ")[0]
        out["hs.gravity"] = g
        out["hs.z500.range"] = f"{sig(ds.z500.min())} … {sig(ds.z500.max())}"
        out["hs.t850.range"] = f"{sig(ds.t850.min())} … {sig(ds.t850.max())}"
        out["hs.u250.range"] = f"{fixed(ds.u250.min(), 1)} … {fixed(ds.u250.max(), 1)}"
        out["hs.ps.range"] = f"{sig(ds.ps.min())} … {sig(ds.ps.max())}"
        out["hs.ps.mean"] = sig(ds.ps.astype("float64").mean(), 6)
        out["hs.t850.mean"] = fixed(ds.t850.astype("float64").mean(), 2)
        # 850 hPa lies below the lowest layer centre (sigma 0.95) where ps < 850 / 0.95 hPa
        limit = 850 / 0.95 * 100
        out["hs.extrapolation_ps_hpa"] = f"{limit / 100:.1f}"
        out["hs.extrapolated_points"] = str(int((ds.ps < limit).sum()))
        # typical changes: area-weighted RMS over 24 hours (4 steps), and between unrelated states
        w = area_weights(ds.lat)[:, None]
        for v, unit in (("z500", 0), ("t850", 2)):
            d = ds[v].values[4:].astype(np.float64) - ds[v].values[:-4]
            out[f"hs.{v}.rms_24h"] = fixed(np.sqrt((d ** 2 * w).mean()), unit)
        z = ds["z500"].values.astype(np.float64)
        anom = z - z.mean(axis=(0, 2), keepdims=True)           # remove the time-zonal mean
        out["hs.z500.rms_unrelated"] = fixed(np.sqrt(2 * (anom ** 2 * w).mean()), 0)
        for var in ("u250", "u850"):
            for side, (grid, lat, peak, at) in jet_maxima(ds, var).items():
                out[f"hs.{var}.jet_{side}"] = f"{grid:.2f} m s⁻¹ at {fixed(lat, 2)}°"
                out[f"hs.{var}.jet_{side}_parabolic"] = f"{peak:.2f} m s⁻¹ at {fixed(at, 1)}°"
    return out


def held_suarez_heldout_jets() -> dict[str, str]:
    with xr.open_dataset(DATA / "held_suarez_t21_heldout.nc") as ds:
        jets = jet_maxima(ds[["u250"]].load(), "u250")
    return {f"hs_heldout.u250.jet_{side}_parabolic": f"{peak:.1f} m s⁻¹ at {fixed(at, 1)}°"
            for side, (_, _, peak, at) in jets.items()}


def irish_wind() -> dict[str, str]:
    with xr.open_dataset(DATA / "irish_wind.nc") as ds:
        ds = ds.load()
    w = ds["wind_speed"]
    return {
        "wind.dims": f"time {ds.sizes['time']}, station {ds.sizes['station']}",
        "wind.days": f"{ds.sizes['time']}",
        "wind.station_count": str(ds.sizes["station"]),
        "wind.stations": " ".join(ds.station.values),
        "wind.names": ", ".join(ds.station_name.values),
        "wind.time": f"{str(ds.time.values[0])[:10]} … {str(ds.time.values[-1])[:10]}",
        "wind.years": f"{str(ds.time.values[0])[:4]}–{str(ds.time.values[-1])[:4]}",
        "wind.consecutive": str(bool((np.diff(ds.time.values) == np.timedelta64(1, "D")).all())),
        "wind.missing": str(int(w.isnull().sum())),
        "wind.units": w.attrs["units"],
        "wind.mean": f"{float(w.astype('float64').mean()):.3f}",
        "wind.VAL.latitude": f"{float(ds.latitude.sel(station='VAL')):.4f}",
    }


def clemson() -> dict[str, str]:
    with xr.open_dataset(DATA / "clemson_temps.nc") as ds:
        ds = ds.load()
    tmin_max_day = str(ds.time.values[int(np.nanargmax(ds.tmin.values))])[:10]
    return {
        "clemson.dims": f"time {ds.sizes['time']}",
        "clemson.days": f"{ds.sizes['time']:,}",
        "clemson.time": f"{str(ds.time.values[0])[:10]} … {str(ds.time.values[-1])[:10]}",
        "clemson.years": f"{str(ds.time.values[0])[:4]}–{str(ds.time.values[-1])[:4]}",
        "clemson.missing_tmax": str(int(ds.tmax.isnull().sum())),
        "clemson.missing_tmin": str(int(ds.tmin.isnull().sum())),
        "clemson.missing_both": str(int((ds.tmax.isnull() & ds.tmin.isnull()).sum())),
        # days with neither value: the calendar days absent from the source (its rows are the others)
        "clemson.source_rows": f"{int((ds.tmax.notnull() | ds.tmin.notnull()).sum()):,}",
        "clemson.tmax.range": f"{fixed(ds.tmax.min(), 2)} … {fixed(ds.tmax.max(), 2)}",
        "clemson.tmin.range": f"{fixed(ds.tmin.min(), 2)} … {fixed(ds.tmin.max(), 2)}",
        "clemson.tmin.max_day": tmin_max_day,
        "clemson.tmin_above_tmax": str(int((ds.tmin > ds.tmax).sum())),
        "clemson.units": ds.tmax.attrs["units"],
        "clemson.missing_data": ds.attrs["missing_data"],
        "clemson.quality_control": ds.attrs["quality_control"],
    }


def ncep() -> dict[str, str]:
    with xr.open_dataset(DATA / "ncep_air_small.nc") as ds:
        ds = ds.load()
    sums = dict(line.split()[::-1] for line in (DATA / "SHA256SUMS").read_text().splitlines() if line.strip())
    digest = sums["ncep_air_small.nc"]
    lat, lon = ds.lat.values, ds.lon.values
    return {
        "ncep.dims": f"time {ds.sizes['time']}, lat {ds.sizes['lat']}, lon {ds.sizes['lon']}",
        "ncep.steps": str(ds.sizes["time"]),
        "ncep.time": f"{day(ds.time.values[0])} … {day(ds.time.values[-1])}",
        "ncep.lat": f"{lat[0]:g} … {lat[-1]:g}",
        "ncep.lat_descending": str(bool(np.all(np.diff(lat) < 0))),
        "ncep.lon": f"{lon[0]:g} … {lon[-1]:g}",
        "ncep.grid_step": f"{abs(np.diff(lat)).mean():g}",
        "ncep.range": f"{ds.air.min():.2f} … {ds.air.max():.2f}",
        "ncep.scale_factor": f"{ds.air.encoding['scale_factor']:g}",
        "ncep.stored": str(ds.air.encoding["dtype"]),
        "ncep.decoded": str(ds.air.dtype),
        "ncep.sha256": f"{digest[:8]}…{digest[-4:]}",
        "ncep.sigma": f"{float(ds.attrs['description'].split(' sigma')[0].split()[-1]):g}",
    }


def describe() -> dict[str, str]:
    """Every quoted number, by name, as the README prints it."""
    return {**files(), **held_suarez("held_suarez_t21.nc", "hs"),
            **held_suarez("held_suarez_t21_heldout.nc", "hs_heldout"), **held_suarez_heldout_jets(),
            **irish_wind(), **clemson(), **ncep()}


def main() -> int:
    for name, value in describe().items():
        print(f"{name} = {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
