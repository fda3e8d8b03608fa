"""Long sweeps over units: a netCDF file of the finished units, and tasks on any executor.

A probe over hundreds of units of a large model runs for hours. Two things make that safe:

* :class:`SweepFile` -- the finished units of a sweep in a netCDF file, rewritten as they finish
  (each time to a temporary file that is then renamed over the old one, so an interruption
  never leaves half a file), together with the sweep's identity: fingerprints of the model's
  weights and of the initial states, and every setting that changes a unit's numbers. A sweep
  started again with the same file computes only the units it lacks; a file written by another
  model or with other settings is refused, naming what differs.
* :func:`run_tasks` -- runs the tasks of a sweep (chunks of units) in this process, on any
  ``concurrent.futures`` executor, or on a dask cluster through a ``distributed.Client``. Each
  task's result is handed back as soon as it is finished, in whatever order the tasks finish, so
  it can be written to the file before anything else happens. On a dask cluster the shared
  arguments (the model, the states) go to every worker once (``Client.scatter``), and a worker
  that dies takes only its running task with it: dask runs that task again on another worker,
  and every finished one is already here. Start the workers with :data:`WORKER_ENV` in their
  environment from the start (:data:`WORKER_CONFIG` does that for clusters started from Python;
  a warning says so when they lack it): with dask's default allocator settings tensor code ran
  2-3x slower in them.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import uuid
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from .files import write_atomic

#: Written into every sweep file; a file with another value is refused.
FORMAT = "tqslite-sweep-1"

#: Environment for dask worker processes, which must hold when the process starts (glibc reads
#: it then): ``MALLOC_MMAP_THRESHOLD_=33554432 dask worker ...`` from a shell, or
#: :data:`WORKER_CONFIG` from Python. dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_``
#: set, which makes glibc map and unmap every allocation above 128 kB afresh; a rollout of
#: ``pangu_lite`` ran 1.8x (an earlier machine: 3x) slower in such a worker than in this process.
#: A fixed mmap threshold of 32 MiB (glibc's largest) restores the speed. ``LocalCluster(...,
#: env=WORKER_ENV)`` is too late: dask sets ``env`` inside the worker once it runs.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432"}

#: dask configuration that puts :data:`WORKER_ENV` in the environment of every worker process a
#: nanny spawns from this process, before it starts (dask's ``pre-spawn-environ``):
#: ``with dask.config.set(WORKER_CONFIG): cluster = LocalCluster(...)``. A nanny keeps the
#: setting for the workers it restarts.
WORKER_CONFIG = {f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in WORKER_ENV.items()}


def weights_fingerprint(system) -> str:
    """SHA-256 of a system's parameters: names, shapes, dtypes and values, in model order."""
    h = hashlib.sha256()
    for name in system.parameter_names():
        w = system.get_parameter(name).detach()
        h.update(f"{name}:{w.dtype}:{tuple(w.shape)};".encode())
        h.update(w.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _shown(value) -> str:
    value = str(value)
    return value if len(value) <= 40 else value[:37] + "..."


def _differences(there: dict, here: dict, prefix: str = "") -> list:
    """``[(key, value there, value here)]`` for the keys that differ; JSON objects are compared key by key."""
    out = []
    for key in dict.fromkeys([*here, *there]):
        a, b = there.get(key), here.get(key)
        if str(a) == str(b):
            continue
        try:
            a_obj, b_obj = json.loads(a), json.loads(b)
        except (TypeError, ValueError):
            a_obj = b_obj = None
        if isinstance(a_obj, dict) and isinstance(b_obj, dict):
            out += _differences({k: json.dumps(v) for k, v in a_obj.items()},
                                {k: json.dumps(v) for k, v in b_obj.items()}, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", a, b))
    return out


class SweepFile:
    """The finished units of a sweep, kept in a netCDF file as they finish.

    Parameters
    ----------
    path : path-like
        The file. If it exists it must have been written by the same sweep: same
        ``identity``; its units are then already finished.
    identity : dict of str to str
        What makes the numbers of a unit what they are (model and states fingerprints, every
        setting), stored as attributes of the file and compared on resume.

    Attributes
    ----------
    done : xarray.Dataset or None
        The finished units along dim ``unit``, as :meth:`add` received them.
    """

    def __init__(self, path, identity: dict):
        self.path = Path(path)
        self.identity = {k: str(v) for k, v in identity.items()}
        self.done = None
        if self.path.exists():
            try:
                ds = xr.load_dataset(self.path)
            except Exception as e:  # noqa: BLE001 -- whatever the reader says, the file is not ours
                raise ValueError(f"{self.path} cannot be read as a sweep file ({type(e).__name__}: {e}); delete it "
                                 "or give another checkpoint path.") from e
            if ds.attrs.get("format") != FORMAT:
                raise ValueError(f"{self.path} is not a tqslite sweep file (format {ds.attrs.get('format')!r}, "
                                 f"expected {FORMAT!r}); give another checkpoint path.")
            differ = _differences({k: ds.attrs.get(k) for k in self.identity}, self.identity)
            if differ:
                what = "; ".join(f"{k} is {_shown(there)} there, {_shown(here)} here" for k, there, here in differ)
                raise ValueError(f"{self.path} was written by another sweep ({what}). Resume only with the same model, "
                                 "initial states and settings; delete the file or give another checkpoint path to "
                                 "start afresh.")
            self.done = ds if ds.sizes.get("unit", 0) else None

    @property
    def finished(self) -> list[str]:
        """Labels of the finished units, in the order they finished."""
        return [] if self.done is None else [str(u) for u in self.done["unit"].values]

    def add(self, ds: xr.Dataset) -> None:
        """Add finished units (a Dataset along dim ``unit``) and rewrite the file atomically."""
        self.done = ds if self.done is None else xr.concat([self.done, ds], "unit")
        out = self.done.assign_attrs(format=FORMAT, **self.identity)
        write_atomic(self.path, out.to_netcdf)


# --------------------------------------------------------------------------------------------
# Running the tasks
# --------------------------------------------------------------------------------------------

def is_dask_client(executor) -> bool:
    """Whether ``executor`` is a ``distributed.Client`` (duck-typed: no import of dask)."""
    return type(executor).__module__.split(".")[0] == "distributed" and hasattr(executor, "scatter") \
        and hasattr(executor, "gather")


def run_tasks(fn: Callable, shared: tuple, tasks: Sequence[tuple], executor=None,
              on_result: Callable | None = None, name: str = "tqslite-task") -> None:
    """Call ``fn(*shared, *task)`` for every task; ``on_result(i, result)`` as each one finishes.

    Parameters
    ----------
    fn : callable
        A module-level function (executors pickle it).
    shared : tuple
        Arguments every task receives first (e.g. the model and the states).
    tasks : sequence of tuple
        Each task's own arguments.
    executor : None, concurrent.futures.Executor or distributed.Client
        ``None`` runs the tasks here, in order. An executor gets one ``submit`` per task
        (``shared`` is pickled with each). A ``distributed.Client`` gets ``shared`` once, scattered
        to every worker, then one task per ``submit``; dask re-runs the tasks of a worker that
        dies on the others.
    on_result : callable, optional
        Called in this process as each task finishes, in the order they finish.
    name : str
        Prefix of the dask task keys (what the dashboard shows).

    If a task fails, the tasks not yet started are cancelled and the error is raised; the
    results already handed to ``on_result`` stay wherever it put them.
    """
    on_result = on_result or (lambda i, r: None)
    if executor is None:
        for i, task in enumerate(tasks):
            on_result(i, fn(*shared, *task))
        return
    if is_dask_client(executor):
        from distributed import as_completed

        slow = slow_allocation_workers(executor)
        if slow:
            warnings.warn(f"{len(slow)} dask worker(s) run with MALLOC_TRIM_THRESHOLD_ set and no "
                          "MALLOC_MMAP_THRESHOLD_: every large tensor is a fresh memory map there, and rollouts ran "
                          "2-3x slower in such workers. Start them with MALLOC_MMAP_THRESHOLD_=33554432 in their environment "
                          "(from Python: with dask.config.set(tqslite.sweep.WORKER_CONFIG): LocalCluster(...)).",
                          stacklevel=3)
        token = uuid.uuid4().hex[:8]
        remote = executor.scatter(list(shared), broadcast=True, hash=False)
        futures = {executor.submit(fn, *remote, *task, key=f"{name}-{token}-{i}", pure=False): i
                   for i, task in enumerate(tasks)}
        handled = set()
        try:
            for future in as_completed(futures):
                # A task whose result was lost with its worker after it finished is run again, and
                # as_completed can report it a second time: its result was already handled.
                if futures[future] in handled:
                    continue
                on_result(futures[future], future.result())
                handled.add(futures[future])
                future.release()
        finally:
            executor.cancel([f for f in futures if not f.done()])
            for f in remote:
                f.release()
        return
    futures = {executor.submit(fn, *shared, *task): i for i, task in enumerate(tasks)}
    try:
        for future in concurrent.futures.as_completed(futures):
            on_result(futures[future], future.result())
    finally:
        for future in futures:
            future.cancel()


def _allocation_env():
    """``(MALLOC_TRIM_THRESHOLD_, MALLOC_MMAP_THRESHOLD_)`` as this process started with them, which
    is what glibc read: ``/proc/self/environ`` on Linux (later changes to ``os.environ`` do not
    show there), else ``os.environ``."""
    try:
        with open("/proc/self/environ", "rb") as f:
            pairs = [item.decode(errors="replace").split("=", 1) for item in f.read().split(b"\0") if b"=" in item]
        env = dict(pairs)
    except OSError:
        env = os.environ
    return env.get("MALLOC_TRIM_THRESHOLD_"), env.get("MALLOC_MMAP_THRESHOLD_")


def slow_allocation_workers(client) -> list[str]:
    """Addresses of the dask workers whose allocator settings slow tensor code down (see :data:`WORKER_ENV`):
    started with ``MALLOC_TRIM_THRESHOLD_`` and without ``MALLOC_MMAP_THRESHOLD_``."""
    return [addr for addr, (trim, mmap) in client.run(_allocation_env).items() if trim is not None and mmap is None]


def as_json(value) -> str:
    """A setting as a canonical JSON string (for :class:`SweepFile` identities)."""
    def default(v):
        if isinstance(v, (np.integer, np.floating)):
            return v.item()
        return repr(v)

    return json.dumps(value, sort_keys=True, default=default)


__all__ = ["FORMAT", "WORKER_CONFIG", "WORKER_ENV", "SweepFile", "as_json", "is_dask_client", "run_tasks",
           "slow_allocation_workers", "weights_fingerprint"]
