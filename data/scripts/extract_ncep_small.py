"""Copy the tiny NCEP/NCAR reanalysis slice shipped in ``data/ncep_air_small.nc``.

The file is ``air_temperature_small.nc`` from the PyPI package
``hvsampledata`` (HoloViz sample data): NCEP/NCAR Reanalysis 1 air
temperature at sigma 0.995 (K), 6-hourly, 2014-02-24 00:00 .. 2014-02-28 18:00
(20 steps), on a 2.5 degree grid over North America (25 lat x 53 lon,
lat descending 75..15 N, lon 200..330 E).  It lies inside the installed
package; nothing is downloaded at run time (install the package with pip).

The file is copied byte for byte, after checking its SHA-256 against the
hash recorded in the wheel's RECORD file, so its provenance can be checked.

How to run (from the repository root)::

    pip install hvsampledata==0.1.5
    python data/scripts/extract_ncep_small.py
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import os
import shutil
import sys
from importlib import metadata

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.normpath(os.path.join(HERE, ".."))
NAME = "air_temperature_small.nc"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output", default=os.path.join(DATA, "ncep_air_small.nc"))
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    dist = metadata.distribution("hvsampledata")
    # locate the file through the wheel's RECORD (path + sha256)
    rel, record_hash = None, None
    for row in csv.reader((dist.read_text("RECORD") or "").splitlines()):
        if row and row[0].endswith("/" + NAME):
            rel, record_hash = row[0], row[1]
    if rel is None:
        raise FileNotFoundError(f"{NAME} not found in hvsampledata {dist.version} RECORD")
    src = str(dist.locate_file(rel))
    with open(src, "rb") as f:
        raw = f.read()
    digest = hashlib.sha256(raw).digest()
    algo, _, b64 = record_hash.partition("=")
    want = base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4))
    if algo != "sha256" or digest != want:
        raise RuntimeError(f"{src}: SHA-256 does not match the wheel RECORD")
    shutil.copyfile(src, args.output)
    print(f"hvsampledata {dist.version}: {src}")
    print(f"  sha256 {hashlib.sha256(raw).hexdigest()} (matches wheel RECORD)")
    print(f"wrote {args.output} ({len(raw)} bytes)")

    import xarray as xr
    with xr.open_dataset(args.output) as ds:
        print(f"  dims {dict(ds.sizes)}; air {ds.air.dtype} {ds.air.attrs.get('units')}, "
              f"range {float(ds.air.min()):.2f}..{float(ds.air.max()):.2f}; time "
              f"{str(ds.time.values[0])[:16]} .. {str(ds.time.values[-1])[:16]}; "
              f"lat {float(ds.lat[0])}..{float(ds.lat[-1])}, "
              f"lon {float(ds.lon[0])}..{float(ds.lon[-1])}")


if __name__ == "__main__":
    main(sys.argv[1:])
