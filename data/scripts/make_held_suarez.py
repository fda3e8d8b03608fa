"""Generate the Held-Suarez simulated-atmosphere datasets shipped in ``data/``.

What this is
------------
A dry, idealised global atmosphere (Held & Suarez 1994, BAMS 75, 1825-1830)
integrated with ``dinosaur`` (Google's spectral dynamical core that sits under
NeuralGCM) on CPU with JAX.  Settings:

* T21 spectral truncation, 32 x 64 Gaussian grid, 10 equidistant sigma levels;
* IMEX SIL3 Runge-Kutta time stepping with a 20-minute step;
* exponential step filter with tau=0.0087504 (nondimensional, = 1/10 of the
  20-minute step), order=1.5, cutoff=0.8 (the values of dinosaur's own
  Held-Suarez example notebook);
* start from an isothermal (288 K) atmosphere at rest with the notebook's
  seeded surface-pressure bump (p1 = 50 hPa, position drawn from the seed) plus
  seeded random noise of 0.1 K grid-point RMS (white noise truncated to T21)
  on the temperature field, so that the zonal
  symmetry is broken reproducibly;
* ``--spinup-days`` (default 250) of spin-up, then ``--steps`` six-hourly
  snapshots, the first one being the spun-up state itself.

Saved fields (interpolated from sigma to pressure levels, linearly in
log-pressure, linear extrapolation where a level lies outside the model's
layer centres, which happens only for 850 hPa under deep lows):
z500 (geopotential, m2 s-2), t850 (K), u250, v250, u850, v850 (m s-1) and
surface pressure ps (Pa).  Dims ``(time, lat, lon)``; lat ascending
(south to north, Gaussian latitudes), lon 0..354.375 degrees_east.
Every variable is packed as int16 with a fixed scale_factor/add_offset
(see ``PACKING``: steps 2 m2 s-2, 0.01 K, 0.02 m s-1, 2 Pa), shuffle + zlib
level 4 in chunks of 100 time steps; xarray decodes them to float32.

How to run (from the repository root, in an environment with
``data/scripts/requirements-data.txt`` installed)::

    # main training period (shipped file), also prints the error-doubling time
    python data/scripts/make_held_suarez.py --measure-doubling
    # independent held-out period
    python data/scripts/make_held_suarez.py --seed 1 --steps 400 \
        --output data/held_suarez_t21_heldout.nc
    # only the error-doubling measurement, writes no file
    python data/scripts/make_held_suarez.py --measure-doubling --no-save

Runs are bit-identical when repeated on the same machine and software, but
floating-point results differ across CPU types / XLA versions (and chaos
amplifies such differences), so the shipped file is the reference.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

# Fixed int16 packing per variable: (scale_factor, add_offset).
# Representable range = add_offset +/- 32767 * scale_factor (-32768 is the
# fill value).  The quantisation step is scale_factor (error <= step / 2).
PACKING = {
    "z500": (2.0, 52000.0),   # m2 s-2: step 2 m2/s2 (~0.2 gpm); range -13534..117534
    "t850": (0.01, 260.0),    # K: step 0.01 K; range -67.7..587.7 K
    "u250": (0.02, 0.0),      # m/s: step 0.02 m/s; range -655..655
    "v250": (0.02, 0.0),
    "u850": (0.02, 0.0),
    "v850": (0.02, 0.0),
    "ps": (2.0, 100000.0),    # Pa: step 2 Pa (0.02 hPa); range 34466..165534 Pa
}

VAR_ATTRS = {
    "z500": dict(standard_name="geopotential", units="m2 s-2",
                 long_name="geopotential at 500 hPa (divide by 9.80616 m s-2, "
                           "the model's gravity, for geopotential height in m)"),
    "t850": dict(standard_name="air_temperature", units="K",
                 long_name="air temperature at 850 hPa"),
    "u250": dict(standard_name="eastward_wind", units="m s-1",
                 long_name="eastward wind at 250 hPa"),
    "v250": dict(standard_name="northward_wind", units="m s-1",
                 long_name="northward wind at 250 hPa"),
    "u850": dict(standard_name="eastward_wind", units="m s-1",
                 long_name="eastward wind at 850 hPa"),
    "v850": dict(standard_name="northward_wind", units="m s-1",
                 long_name="northward wind at 850 hPa"),
    "ps": dict(standard_name="surface_air_pressure", units="Pa",
               long_name="surface pressure"),
}
PRESSURE_HPA = {"z500": 500, "t850": 850, "u250": 250, "v250": 250,
                "u850": 850, "v850": 850}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the initial perturbation (0 = shipped main run)")
    p.add_argument("--spinup-days", type=int, default=250)
    p.add_argument("--steps", type=int, default=2000,
                   help="number of saved snapshots (first = end of spin-up)")
    p.add_argument("--save-every-hours", type=int, default=6)
    p.add_argument("--dt-minutes", type=float, default=20.0)
    p.add_argument("--truncation", type=int, default=21)
    p.add_argument("--gaussian-nodes", type=int, default=16,
                   help="latitudes per hemisphere (16 -> 32 x 64 grid)")
    p.add_argument("--layers", type=int, default=10)
    p.add_argument("--noise-kelvin", type=float, default=0.1,
                   help="grid-point RMS (K) of the seeded initial temperature noise")
    p.add_argument("--filter-tau", type=float, default=0.0087504,
                   help="exponential filter time scale (dinosaur's nondimensional "
                        "units; 0.0087504 = 2 minutes) as in dinosaur's HS notebook")
    p.add_argument("--filter-order", type=float, default=1.5)
    p.add_argument("--filter-cutoff", type=float, default=0.8)
    p.add_argument("--chunk", type=int, default=100,
                   help="snapshots per compiled call (no effect on results)")
    p.add_argument("--output", default=os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "held_suarez_t21.nc"))
    p.add_argument("--no-save", action="store_true",
                   help="do not write the dataset (e.g. with --measure-doubling)")
    p.add_argument("--measure-doubling", action="store_true",
                   help="after spin-up, measure the error-doubling time")
    p.add_argument("--doubling-pairs", type=int, default=4)
    p.add_argument("--doubling-days", type=int, default=40)
    p.add_argument("--doubling-spacing-days", type=int, default=10,
                   help="days between the start states of successive pairs")
    p.add_argument("--doubling-perturbation", type=float, default=1e-3,
                   help="RMS temperature difference (K) between twin runs")
    p.add_argument("--fit-start-day", type=float, default=10.0,
                   help="skip the initial transient in which the grid-scale noise "
                        "organises into growing large-scale structures")
    p.add_argument("--fit-max-fraction", type=float, default=0.25,
                   help="fit window ends when the mean error reaches this "
                        "fraction of its saturation level")
    return p.parse_args(argv)


class Model:
    """dinosaur Held-Suarez model plus jitted diagnostics."""

    def __init__(self, args):
        import jax
        import jax.numpy as jnp
        import dinosaur
        from dinosaur import (coordinate_systems, held_suarez, primitive_equations,
                              primitive_equations_states, scales, sigma_coordinates,
                              spherical_harmonic, time_integration, xarray_utils)
        self.jax, self.jnp = jax, jnp
        units = scales.units
        self.args = args
        grid = spherical_harmonic.Grid.construct(
            max_wavenumber=args.truncation, gaussian_nodes=args.gaussian_nodes)
        coords = coordinate_systems.CoordinateSystem(
            horizontal=grid,
            vertical=sigma_coordinates.SigmaCoordinates.equidistant(args.layers))
        specs = primitive_equations.PrimitiveEquationsSpecs.from_si()
        self.coords, self.specs = coords, specs
        p0 = 1e5 * units.pascal
        p1 = 5e3 * units.pascal
        init_fn, aux = primitive_equations_states.isothermal_rest_atmosphere(
            coords=coords, physics_specs=specs, p0=p0, p1=p1)
        ref_temps = aux[xarray_utils.REF_TEMP_KEY]
        orography = primitive_equations.truncated_modal_orography(
            aux[xarray_utils.OROGRAPHY], coords)
        self.ref_temps = np.asarray(ref_temps)
        self.init_fn = init_fn

        dt = specs.nondimensionalize(args.dt_minutes * units.minute)
        primitive = primitive_equations.PrimitiveEquations(
            ref_temps, orography, coords, specs)
        forcing = held_suarez.HeldSuarezForcingSigma(
            coords=coords, physics_specs=specs, reference_temperature=ref_temps,
            p0=p0)
        eq = time_integration.compose_equations([primitive, forcing])
        step = time_integration.imex_rk_sil3(eq, dt)
        filters = [time_integration.exponential_step_filter(
            grid, dt, tau=args.filter_tau, order=args.filter_order,
            cutoff=args.filter_cutoff)]
        self.step_fn = time_integration.step_with_filters(step, filters)

        minutes_per_save = args.save_every_hours * 60
        if minutes_per_save % args.dt_minutes:
            raise ValueError("save interval must be a multiple of the time step")
        self.inner_steps = int(round(minutes_per_save / args.dt_minutes))
        self.steps_per_day = int(round(24 * 60 / args.dt_minutes))

        # dimensional scale factors (model units -> SI)
        dim = lambda u: float(specs.dimensionalize(1.0, u).magnitude)
        self.K = dim(units.degK)
        self.ms = dim(units.meter / units.second)
        self.Pa = dim(units.pascal)
        self.gpot = dim(units.meter ** 2 / units.second ** 2)
        self.g_si = float(scales.GRAVITY_ACCELERATION.magnitude)

        log_sigma = np.log(coords.vertical.centers)
        zero_orog = np.zeros(grid.nodal_shape, np.float32)

        def interp_logp(field, log_target):
            """Linear interpolation in log(sigma) per column, linear extrapolation."""
            n = log_sigma.shape[0]
            i = jnp.clip(jnp.searchsorted(jnp.asarray(log_sigma), log_target), 1, n - 1)
            x0 = jnp.asarray(log_sigma)[i - 1]
            x1 = jnp.asarray(log_sigma)[i]
            w = (log_target - x0) / (x1 - x0)
            f0 = jnp.take_along_axis(field, (i - 1)[None], axis=0)[0]
            f1 = jnp.take_along_axis(field, i[None], axis=0)[0]
            return f0 + w * (f1 - f0)

        def nodal_temperature(state):
            return (grid.to_nodal(state.temperature_variation)
                    + jnp.asarray(self.ref_temps)[:, None, None])

        def diagnostics(state):
            temp = nodal_temperature(state)
            u, v = spherical_harmonic.vor_div_to_uv_nodal(
                grid, state.vorticity, state.divergence)
            ps = jnp.exp(grid.to_nodal(state.log_surface_pressure))[0]
            phi = primitive_equations.get_geopotential_on_sigma(
                temp, nodal_orography=zero_orog, sigma=coords.vertical,
                gravity_acceleration=specs.g, ideal_gas_constant=specs.R)
            ps_pa = ps * self.Pa
            fields = {"z500": phi * self.gpot, "t850": temp * self.K,
                      "u250": u * self.ms, "v250": v * self.ms,
                      "u850": u * self.ms, "v850": v * self.ms}
            out = {}
            for name, f in fields.items():
                log_target = jnp.log(PRESSURE_HPA[name] * 100.0 / ps_pa)
                out[name] = interp_logp(f, log_target)
            out["ps"] = ps_pa
            return out

        self.diagnostics = jax.jit(diagnostics)
        self.nodal_temperature = jax.jit(nodal_temperature)
        self.advance_day = jax.jit(
            time_integration.repeated(self.step_fn, self.steps_per_day))
        self._traj = {}
        self.grid = grid
        self.diagnostics_fn = diagnostics

    def trajectory(self, n):
        """Jitted fn: state -> (final, diagnostics at [state, +6h, ...]) (n frames)."""
        if n not in self._traj:
            from dinosaur import time_integration
            f = time_integration.trajectory_from_step(
                self.step_fn, outer_steps=n, inner_steps=self.inner_steps,
                start_with_input=True, post_process_fn=self.diagnostics_fn)
            self._traj[n] = self.jax.jit(f)
        return self._traj[n]

    def initial_state(self, seed):
        jax, jnp = self.jax, self.jnp
        state = self.init_fn(jax.random.PRNGKey(seed))
        t_var = state.temperature_variation + self.noise(seed, self.args.noise_kelvin)
        return _replace(state, temperature_variation=t_var)

    def noise(self, seed, rms_kelvin):
        """Seeded random temperature field (modal) whose grid-point RMS after
        spectral truncation is `rms_kelvin`."""
        rng = np.random.default_rng(seed)
        white = rng.standard_normal(self.coords.nodal_shape).astype(np.float32)
        modal = self.grid.to_modal(self.jnp.asarray(white))
        rms = float(np.sqrt(np.mean(np.asarray(self.grid.to_nodal(modal)) ** 2)))
        return modal * np.float32(rms_kelvin / self.K / rms)

    def perturb(self, state, seed, rms_kelvin):
        t_var = state.temperature_variation + self.noise(seed, rms_kelvin)
        return _replace(state, temperature_variation=t_var)


def _replace(state, **kw):
    import dataclasses
    return dataclasses.replace(state, **kw)


def spin_up(model, seed, days):
    state = model.initial_state(seed)
    t0 = time.time()
    for day in range(days):
        state = model.advance_day(state)
        if (day + 1) % 50 == 0 or day + 1 == days:
            model.jax.block_until_ready(state)
            print(f"  spin-up day {day + 1}/{days}  ({time.time() - t0:.0f} s)",
                  flush=True)
    return state


def measure_doubling(model, state, args):
    """Twin experiments: growth of RMS z500 / temperature differences."""
    jax = model.jax
    spd = model.steps_per_day
    n_frames = args.doubling_days * 4 + 1  # 6-hourly (inner_steps = 6 h)
    assert model.inner_steps * 4 == spd, "doubling measurement assumes 6-h saves"
    traj = model.trajectory(n_frames)
    temp_traj = jax.jit(lambda s: model.nodal_temperature(s))
    weights = np.cos(np.asarray(model.grid.latitudes))[None, :]  # (lon, lat) area weight
    weights = weights / weights.mean()
    z_err, t_err, z_sat = [], [], []
    t0 = time.time()
    for k in range(args.doubling_pairs):
        if k > 0:
            for _ in range(args.doubling_spacing_days):
                state = model.advance_day(state)
        twin = model.perturb(state, 1000 + 7919 * args.seed + k, args.doubling_perturbation)
        t_diff0 = np.asarray(temp_traj(twin) - temp_traj(state)) * model.K
        _, d_ctl = traj(state)
        _, d_pert = traj(twin)
        z_c, z_p = np.asarray(d_ctl["z500"], np.float64), np.asarray(d_pert["z500"], np.float64)
        t_c, t_p = np.asarray(d_ctl["t850"], np.float64), np.asarray(d_pert["t850"], np.float64)
        z_err.append(np.sqrt(((z_p - z_c) ** 2 * weights).mean(axis=(1, 2))))
        t_err.append(np.sqrt(((t_p - t_c) ** 2 * weights).mean(axis=(1, 2))))
        # saturation: RMS difference of two independent states ~ sqrt(2) * std
        anom = z_c - z_c.mean(axis=(0, 1), keepdims=True)  # remove time-zonal mean
        z_sat.append(np.sqrt(2 * (anom ** 2 * weights).mean()))
        print(f"  pair {k}: initial RMS T diff {np.sqrt((t_diff0**2).mean()):.2e} K, "
              f"z500 RMS diff every 10 days: "
              + " ".join(f"{z_err[-1][4*d]:.3g}" for d in range(0, args.doubling_days + 1, 10)
                         if 4 * d < n_frames)
              + f" m2/s2 ({time.time() - t0:.0f} s)", flush=True)
    days = np.arange(n_frames) / 4.0
    z_err, t_err = np.array(z_err), np.array(t_err)
    sat = float(np.mean(z_sat))
    log_z = np.log(np.maximum(z_err, 1e-30)).mean(axis=0)
    log_t = np.log(np.maximum(t_err, 1e-30)).mean(axis=0)
    gm_z = np.exp(log_z)
    end_candidates = np.nonzero(gm_z > args.fit_max_fraction * sat)[0]
    end = end_candidates[0] if len(end_candidates) else n_frames
    start = int(round(args.fit_start_day * 4))
    sel = slice(start, end)
    slope_z = np.polyfit(days[sel], log_z[sel], 1)[0]
    slope_t = np.polyfit(days[sel], log_t[sel], 1)[0]
    print("  day  geo-mean RMS dz500 [m2/s2]  geo-mean RMS dT850 [K]")
    for d in range(0, args.doubling_days + 1, 2):
        print(f"  {d:4d}  {gm_z[4*d]:12.4g}  {np.exp(log_t[4*d]):12.4g}")
    print("  local doubling time of RMS dz500 over 5-day blocks:")
    for d in range(0, args.doubling_days - 4, 5):
        rate = (log_z[4 * (d + 5)] - log_z[4 * d]) / 5.0
        print(f"    days {d:2d}-{d + 5:2d}: {np.log(2) / rate:6.2f} days")
    print(f"  saturation estimate for RMS dz500 (sqrt(2)*std): {sat:.4g} m2/s2")
    print(f"  fit window: day {days[start]:.2f} to day {days[end-1]:.2f}"
          f" ({end - start} six-hourly points, {args.doubling_pairs} pairs)")
    print(f"ERROR-DOUBLING TIME from z500: {np.log(2) / slope_z:.2f} days "
          f"(growth rate {slope_z:.3f} /day)")
    print(f"ERROR-DOUBLING TIME from t850: {np.log(2) / slope_t:.2f} days "
          f"(growth rate {slope_t:.3f} /day)")
    return np.log(2) / slope_z


def run(args, argv):
    import jax
    import dinosaur
    import xarray as xr
    print(f"jax {jax.__version__} ({jax.default_backend()}), "
          f"dinosaur {dinosaur.__version__ if hasattr(dinosaur, '__version__') else '?'}",
          flush=True)
    model = Model(args)
    t_start = time.time()
    print(f"spin-up {args.spinup_days} days, seed {args.seed}", flush=True)
    state = spin_up(model, args.seed, args.spinup_days)
    t_spin = time.time() - t_start

    if args.measure_doubling:
        print("measuring error-doubling time", flush=True)
        measure_doubling(model, state, args)

    if args.no_save:
        return

    print(f"saving {args.steps} snapshots every {args.save_every_hours} h", flush=True)
    t0 = time.time()
    chunks = {k: [] for k in PACKING}
    done = 0
    while done < args.steps:
        n = min(args.chunk, args.steps - done)
        # trajectory with start_with_input: frames [s, s+6h, ...]; final = s + n*6h
        state, diag = model.trajectory(n)(state)
        for k in PACKING:
            chunks[k].append(np.asarray(diag[k], np.float32))
        done += n
        print(f"  {done}/{args.steps} snapshots ({time.time() - t0:.0f} s)", flush=True)
    t_save = time.time() - t0
    sim_days = args.spinup_days + args.steps * args.save_every_hours / 24
    print(f"wall time: spin-up {t_spin:.0f} s, saving {t_save:.0f} s; "
          f"{(t_spin + t_save) / sim_days:.3f} s per simulated day", flush=True)

    lat = np.rad2deg(np.asarray(model.grid.latitudes))
    lon = np.rad2deg(np.asarray(model.grid.longitudes))
    assert np.all(np.diff(lat) > 0)
    hours = np.arange(args.steps, dtype=np.int64) * args.save_every_hours
    times = np.datetime64("2000-01-01T00:00:00", "ns") + hours.astype("timedelta64[h]")
    data_vars = {}
    encoding = {}
    for k, (scale, offset) in PACKING.items():
        arr = np.concatenate(chunks[k], axis=0).transpose(0, 2, 1)  # (time, lat, lon)
        if not np.all(np.isfinite(arr)):
            raise RuntimeError(f"{k} has non-finite values")
        lo, hi = offset - 32767 * scale, offset + 32767 * scale
        if arr.min() < lo or arr.max() > hi:
            raise RuntimeError(f"{k} range {arr.min()}..{arr.max()} outside packing "
                               f"range {lo}..{hi}")
        attrs = dict(VAR_ATTRS[k])
        if k in PRESSURE_HPA:
            attrs["pressure_level"] = f"{PRESSURE_HPA[k]} hPa"
        attrs["packing"] = (f"int16, scale_factor {scale}, add_offset {offset}: "
                            f"quantisation step {scale} {attrs['units']}")
        data_vars[k] = xr.DataArray(arr, dims=("time", "lat", "lon"), attrs=attrs)
        encoding[k] = dict(dtype="int16", scale_factor=np.float32(scale),
                           add_offset=np.float32(offset), _FillValue=np.int16(-32768),
                           zlib=True, complevel=4, shuffle=True,
                           chunksizes=(min(args.steps, 100), len(lat), len(lon)))
    ds = xr.Dataset(
        data_vars,
        coords=dict(
            time=("time", times, dict(
                standard_name="time", long_name="time",
                comment=(f"time 0 = end of the {args.spinup_days}-day spin-up; the "
                         "Held-Suarez model has no seasons, day cycle or calendar, "
                         "so the dates are nominal labels on a model time axis"))),
            lat=("lat", lat.astype(np.float64), dict(
                standard_name="latitude", units="degrees_north", long_name="latitude",
                comment="Gaussian latitudes, ascending (south to north)")),
            lon=("lon", lon.astype(np.float64), dict(
                standard_name="longitude", units="degrees_east", long_name="longitude")),
        ),
        attrs=dict(
            title="Held-Suarez (1994) idealised dry atmosphere, T21, 6-hourly",
            institution="tqslite project (generated data)",
            source=(f"dinosaur {_version('dinosaur')} dynamical core (Google, Apache-2.0) "
                    f"with jax {_version('jax')} / jaxlib {_version('jaxlib')} on CPU, "
                    f"xarray {_version('xarray')}, netCDF4 {_version('netCDF4')}, "
                    f"numpy {_version('numpy')}"),
            references=("Held, I. M. and M. J. Suarez, 1994: A proposal for the "
                        "intercomparison of the dynamical cores of atmospheric general "
                        "circulation models. Bull. Amer. Meteor. Soc., 75, 1825-1830."),
            resolution=(f"T{args.truncation} spectral truncation, {len(lat)} x {len(lon)} "
                        f"Gaussian grid, {args.layers} equidistant sigma levels"),
            time_step=f"{args.dt_minutes:g} minutes (IMEX SIL3 Runge-Kutta)",
            filter=(f"dinosaur exponential_step_filter(tau={args.filter_tau:g}, "
                    f"order={args.filter_order:g}, cutoff={args.filter_cutoff:g})"),
            spinup_days=np.int32(args.spinup_days),
            output_interval=f"{args.save_every_hours} hours",
            seed=np.int32(args.seed),
            initial_condition=(
                "isothermal 288 K atmosphere at rest, p0 = 1000 hPa, seeded "
                f"surface-pressure bump p1 = 50 hPa (dinosaur isothermal_rest_atmosphere), "
                f"plus seeded random temperature noise (white noise truncated at "
                f"T{args.truncation}, {args.noise_kelvin} K grid-point RMS)"),
            vertical_interpolation=("sigma to pressure: linear in log(pressure), linear "
                                    "extrapolation outside the layer centres"),
            Conventions="CF-1.8",
            license="generated data, distributed with tqslite under the project licence (MIT); see data/README.md",
            history=" ".join(["python data/scripts/make_held_suarez.py", *argv]),
        ),
    )
    out = os.path.abspath(args.output)
    ds.to_netcdf(out, encoding={**encoding,
                                "time": dict(units="hours since 2000-01-01 00:00:00",
                                             calendar="proleptic_gregorian",
                                             dtype="int32")},
                 format="NETCDF4")
    print(f"wrote {out} ({os.path.getsize(out) / 1e6:.2f} MB)", flush=True)
    check(out)


def check(path):
    """Print summary statistics, including the zonal-mean jets at 250 hPa."""
    import xarray as xr
    with xr.open_dataset(path) as ds:
        print(ds)
        for k in ds.data_vars:
            a = ds[k]
            print(f"  {k}: dtype {a.dtype}, min {float(a.min()):.4g}, "
                  f"max {float(a.max()):.4g}, mean {float(a.mean()):.6g}")
        lat = ds.lat.values
        for var in ("u250", "u850"):
            zm = ds[var].mean(("time", "lon")).values.astype(np.float64)
            for name, sel in (("south", lat < 0), ("north", lat > 0)):
                zz, la = zm[sel], lat[sel]
                i = int(np.argmax(zz))
                peak = ""
                if 0 < i < len(zz) - 1:  # parabola through the maximum and neighbours
                    c = np.polyfit(la[i - 1:i + 2], zz[i - 1:i + 2], 2)
                    peak = (f"; parabolic peak {np.polyval(c, -c[1] / (2 * c[0])):.2f} m/s "
                            f"at {-c[1] / (2 * c[0]):.1f} deg")
                print(f"  zonal-time-mean {var} max, {name}ern hemisphere: "
                      f"{zz[i]:.2f} m/s at grid latitude {la[i]:.2f} deg{peak}")


def _version(pkg):
    from importlib.metadata import version
    try:
        return version(pkg)
    except Exception:
        return "unknown"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    run(args, argv)


if __name__ == "__main__":
    main()
