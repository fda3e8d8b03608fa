"""Packed checkpoints: a quantized model as a small safetensors file, and back, bit for bit.

Every quantized model in :func:`tqslite.quantize` is fake-quant: its weights are floats on the
integer grid, as large as the original. :func:`save_checkpoint` writes what is actually stored
(SPEC section 4), as a `safetensors <https://huggingface.co/docs/safetensors>`_ file that any
safetensors reader can open:

==========================  =======  ===================================================================
tensor in the file          dtype    what
==========================  =======  ===================================================================
``NAME.codes``              U8       the integer codes of ``NAME`` in tqslite's row layout
                                     (:func:`tqslite.quantization.to_rows`), offset by ``-qmin`` so they
                                     are unsigned, packed at their bit width into a little-endian bit
                                     stream (:func:`tqslite.quantization.pack_bits`):
                                     ``ceil(numel * bits / 8)`` bytes
``NAME.scale``              F16      one float16 scale per row, ``(n_scales,)``
``NAME.zero``               U8       asymmetric formats only: the zero points, packed at ``bits`` bits
``NAME``                    F16/F32  a tensor on a float configuration: float16 (``fp16``) or its own
                                     dtype (``float``, and every parameter outside the plan)
==========================  =======  ===================================================================

The file's metadata (safetensors' ``__metadata__``, strings only) holds

* ``format``: ``"tqslite.checkpoint/1"``;
* ``map``: the **quantization map**, JSON ``{NAME: {"config", "axis", "shape", "dtype",
  "method", "unit"}}`` in model order: the *resolved* configuration label of each tensor
  (``"int4/group32@0"``: the concrete granularity and channel axis, what the codes need to be
  read), the channel axis again (``null`` per tensor and for floats), shape, dtype, how it was
  quantized (``"rtn"``, ``"gptq"``, ``"float16"``, ``"outside plan"``, ...) and the plan unit
  it belongs to (left out when the unit is the tensor itself);
* ``plan``: ``{"units": {unit: configuration label}, "info": {...}}`` as the plan said it, so
  :func:`load_checkpoint` returns the :class:`~tqslite.plans.Plan` the file was made from;
* ``quantizer`` and ``info`` (yours: e.g. ``{"model": "pangu_lite"}``);
* ``sha256``: a checksum of everything else -- the data section and the header without this
  entry -- so a flipped byte anywhere, or a truncated file, is refused with the file's name.

Sizes. The data section is the plan's stored bits rounded up to whole bytes per array (at most
two bytes more per quantized tensor than :attr:`tqslite.plans.PlanSize.bytes`); the header (8
bytes of length plus the JSON) is the fixed price of the map, a few hundred bytes per tensor,
independent of the tensor's size: :func:`checkpoint_sizes` reads both from the file.

:func:`load_checkpoint` refuses a file written for another architecture (a tensor missing on
either side, another shape or dtype), naming the first mismatch, and rebuilds every weight
exactly as :func:`tqslite.quantize` computed it: ``(codes - zero) * scale`` from the same
integers and the same float16 scales, so the loaded model is bit-identical to the fake-quant
one, whatever the quantizer (RTN, MSE-clip, GPTQ). A write goes to a temporary file that
replaces the target only when complete. The design follows optimum-quanto's
``quantization_map`` + ``requantize``: a small readable map beside the tensors.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from .files import write_atomic
from .config import Float16, Int, KeepFloat, as_config, parse
from .plans import Plan, QuantizedModel
from .quantization import QuantizedTensor, pack_bits, unpack_bits
from .quantizers import QuantizedWeights
from .systems import as_system

try:  # optional: a clear message at use, not at import of tqslite
    import safetensors.numpy as st
except ImportError as err:  # pragma: no cover - exercised only without the package
    st = None
    _IMPORT_ERROR = err
else:
    _IMPORT_ERROR = None

#: The ``format`` entry of a checkpoint's metadata.
FORMAT = "tqslite.checkpoint/1"

class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: truncated, corrupted, or not a tqslite checkpoint."""


def _need_safetensors():
    if _IMPORT_ERROR is not None:
        raise ImportError(f"packed checkpoints need the package safetensors ({_IMPORT_ERROR}); install it with "
                          "`pip install safetensors`.")


# --------------------------------------------------------------------------------------------
# The quantization map
# --------------------------------------------------------------------------------------------

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def quantization_map(weights: QuantizedWeights, model, plan: Plan | None = None) -> dict:
    """``{tensor name: entry}`` for every parameter of ``model``, in model order.

    Each entry: ``config`` (the resolved label, e.g. ``"int4/channel@0"``), ``axis`` (the channel
    axis, ``None`` per tensor and for floats), ``shape``, ``dtype``, ``method`` (the quantizer's
    name, ``"float16"``/``"float"``, or ``"outside plan"``), and ``unit`` where the plan's unit
    is not the tensor itself. ``model`` gives the parameters that are not in ``weights`` (kept in
    float) and every tensor's dtype.
    """
    system = as_system(model)
    unit_of = {p: u for u, ps in plan.members.items() for p in ps} if plan is not None else {}
    out = {}
    for name in system.parameter_names():
        w = system.get_parameter(name)
        config = weights.configs.get(name, KeepFloat())
        gran = getattr(config, "granularity", None)
        entry = {"config": config.label, "axis": getattr(gran, "axis", None), "shape": list(w.shape),
                 "dtype": _dtype_name(w.dtype), "method": weights.methods.get(name, "outside plan")}
        if unit_of.get(name, name) != name:
            entry["unit"] = unit_of[name]
        out[name] = entry
    return out


def _tensors_of(name: str, entry: dict) -> list[str]:
    """The keys under which tensor ``name`` is stored in the file."""
    config = parse(entry["config"])
    if not isinstance(config, Int):
        return [name]
    return [f"{name}.codes", f"{name}.scale"] + ([] if config.symmetric else [f"{name}.zero"])


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

def _packed(qt: QuantizedTensor) -> dict:
    """The arrays that store ``qt``: packed codes, float16 scales, packed zero points."""
    fmt = qt.fmt
    unsigned = (qt.codes.reshape(-1).to(torch.int32) - fmt.qmin).cpu().numpy().astype(np.uint8)
    out = {"codes": np.frombuffer(pack_bits(unsigned, fmt.bits), dtype=np.uint8),
           "scale": qt.scale.cpu().numpy().astype(np.float16)}
    if not fmt.symmetric:
        out["zero"] = np.frombuffer(pack_bits(qt.zero.cpu().numpy().astype(np.uint8), fmt.bits), dtype=np.uint8)
    return out


def _float_array(w: torch.Tensor, config) -> np.ndarray:
    w = w.detach().cpu()
    if isinstance(config, Float16):
        w = w.to(torch.float16)
    if w.dtype not in (torch.float16, torch.float32, torch.float64):
        raise ValueError(f"tensors of dtype {w.dtype} cannot be stored in a checkpoint; use float16, 32 or 64.")
    return w.numpy()


def _split(blob: bytes) -> tuple[dict, bytes, int]:
    """``(header, data section, header length)`` of safetensors bytes (no checks: our own output)."""
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n]), blob[8 + n:], n


def _digest(header: dict, data: bytes) -> str:
    """SHA-256 of the header (without its ``sha256`` entry, canonical JSON) and the data section."""
    header = copy.deepcopy(header)
    header.get("__metadata__", {}).pop("sha256", None)
    h = hashlib.sha256(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
    h.update(data)
    return h.hexdigest()


def save_checkpoint(quantized, path, model=None, info: Mapping | None = None) -> Path:
    """Write a quantized model as a packed safetensors file (see the module docstring).

    Parameters
    ----------
    quantized : QuantizedModel or QuantizedWeights
        What :func:`tqslite.quantize` returned (any plan, any quantizer), or its ``weights``.
    path : path-like
        The file to write (``.safetensors`` by convention). Written atomically: a failed write
        leaves an existing file as it was.
    model : nn.Module or system, optional
        Needed with ``QuantizedWeights``: the model the weights were computed on (its other
        parameters are stored in float). Default: ``quantized.model``.
    info : mapping, optional
        Stored as JSON in the metadata, e.g. ``{"model": "pangu_lite"}`` (``tqslite forecast``
        reads it to build the architecture).

    Returns
    -------
    pathlib.Path
        The file written. Its size is measured by :func:`checkpoint_sizes`.
    """
    _need_safetensors()
    plan = None
    if isinstance(quantized, QuantizedModel):
        weights, plan = quantized.weights, quantized.plan
        model = quantized.model if model is None else model
    elif isinstance(quantized, QuantizedWeights):
        weights = quantized
        if model is None:
            raise ValueError("save_checkpoint(weights, path, model=...): QuantizedWeights need the model they were "
                             "computed on (its other parameters are stored in float).")
    else:
        raise TypeError(f"save_checkpoint takes a QuantizedModel (from tqslite.quantize) or QuantizedWeights, "
                        f"got {type(quantized).__name__}.")
    system = as_system(model)
    names = system.parameter_names()
    strangers = [n for n in weights.configs if n not in names]
    if strangers:
        raise ValueError(f"the quantized weights name tensor(s) {strangers[:3]} that the model lacks: were they "
                         "computed on another model?")
    qmap = quantization_map(weights, system, plan)
    if plan is None:  # one unit per tensor, on its resolved configuration
        plan_dict = {"units": {n: c.label for n, c in weights.configs.items()}, "info": {}}
    else:
        plan_dict = {"units": {u: c.label for u, c in plan.configs.items()}, "info": plan.info}
    arrays: dict[str, np.ndarray] = {}
    for name, entry in qmap.items():
        keys = _tensors_of(name, entry)
        clash = [k for k in keys if k in arrays or (k != name and k in qmap)]
        if clash:
            raise ValueError(f"tensor {name!r} would be stored under {clash[0]!r}, which another tensor uses; "
                             "rename the parameter.")
        if name in weights.tensors:
            qt = weights.tensors[name]
            if tuple(qt.shape) != tuple(entry["shape"]):
                raise ValueError(f"tensor {name!r}: the quantized form has shape {tuple(qt.shape)}, the model "
                                 f"{tuple(entry['shape'])}.")
            for part, value in _packed(qt).items():
                arrays[f"{name}.{part}"] = value
        else:
            config = weights.configs.get(name, KeepFloat())
            value = weights.floats.get(name, system.get_parameter(name))
            arrays[name] = _float_array(value, config)
    metadata = {"format": FORMAT, "map": json.dumps(qmap, separators=(",", ":")),
                "plan": json.dumps(plan_dict, separators=(",", ":"), default=str), "quantizer": weights.quantizer,
                "info": json.dumps(dict(info or {}), separators=(",", ":"), default=str)}
    first = st.save(arrays, metadata=metadata)
    header, data, _ = _split(first)
    blob = st.save(arrays, metadata=metadata | {"sha256": _digest(header, data)})
    if _split(blob)[1] != data:  # safetensors lays the data out by name and dtype, not by metadata
        raise RuntimeError("safetensors laid out the same tensors differently twice; please report this.")
    return write_atomic(path, lambda tmp: tmp.write_bytes(blob))


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

def _read_checked(path) -> tuple[dict, bytes, bytes]:
    """``(header, raw bytes, data section)`` of a checkpoint, after every integrity check."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint: {path}")
    raw = path.read_bytes()
    if len(raw) < 8:
        raise CheckpointError(f"{path} is truncated ({len(raw)} bytes): not even the 8-byte header length is there.")
    n = struct.unpack("<Q", raw[:8])[0]
    if 8 + n > len(raw):
        raise CheckpointError(f"{path} is truncated or corrupted: its header should be {n} bytes long, but the file "
                              f"has only {len(raw)} bytes.")
    try:
        header = json.loads(raw[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is corrupted: its header is not valid JSON ({err}).") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a tqslite checkpoint (no \"format\": \"{FORMAT}\" in its metadata); "
                              "write one with tqslite.save_checkpoint or `tqslite quantize ... --out FILE.safetensors`.")
    data = raw[8 + n:]
    try:
        end = max((int(e["data_offsets"][1]) for k, e in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        raise CheckpointError(f"{path} is corrupted: its header's tensor index is damaged.") from None
    if len(data) < end:
        raise CheckpointError(f"{path} is truncated: the tensors need {end} bytes after the header, the file has "
                              f"{len(data)}. Write it again.")
    if len(data) > end:
        raise CheckpointError(f"{path} is corrupted: {len(data) - end} unexpected bytes after the last tensor.")
    if _digest(header, data) != meta.get("sha256"):
        raise CheckpointError(f"{path} is corrupted: its checksum (sha256) does not match its contents, so some byte "
                              "changed after it was written. Write it again.")
    return header, raw, data


def read_metadata(path) -> dict:
    """The checked metadata of a checkpoint: ``map``, ``plan`` and ``info`` as dicts, ``quantizer``, ``format``.

    Raises :class:`CheckpointError` (naming the file and the problem) for a truncated, corrupted
    or foreign file.
    """
    _need_safetensors()
    meta = dict(_read_checked(path)[0]["__metadata__"])
    for key in ("map", "plan", "info"):
        meta[key] = json.loads(meta.get(key, "{}"))
    return meta


def checkpoint_sizes(path) -> dict:
    """Bytes of a checkpoint as found on disk: ``file`` (``os.path.getsize``), ``header`` (the
    8-byte length plus the JSON header, read from the file) and ``data`` (``file - header``)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
    header = 8 + struct.unpack("<Q", head)[0] if len(head) == 8 else size
    return {"file": size, "header": header, "data": size - header}


def _check_architecture(path, qmap: dict, system) -> None:
    names = system.parameter_names()
    hint = "was it written for another architecture?"
    for name in names:
        if name not in qmap:
            raise CheckpointError(f"{path} has no tensor {name!r}, which this model has: {hint}")
    for name, entry in qmap.items():
        if name not in names:
            raise CheckpointError(f"{path} holds tensor {name!r}, which this model lacks: {hint}")
        w = system.get_parameter(name)
        if list(w.shape) != list(entry["shape"]):
            raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(entry['shape'])} in the file and "
                                  f"{tuple(w.shape)} in this model: {hint}")
        if _dtype_name(w.dtype) != entry["dtype"]:
            raise CheckpointError(f"{path}: tensor {name!r} is {entry['dtype']} in the file and "
                                  f"{_dtype_name(w.dtype)} in this model; convert the model first.")


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """:func:`tqslite.quantization.unpack_bits`, by shifts and masks when ``bits`` divides 8.

    In the little-endian stream, value ``i`` of a width dividing 8 sits in byte ``i // (8 // bits)``
    at bit ``(i % (8 // bits)) * bits``: 1, 2, 4 and 8 bits need no bit-by-bit unpacking (about
    ten times faster on large tensors). Other widths go through ``unpack_bits``.
    """
    if 8 % bits:
        return unpack_bits(packed.tobytes(), bits, count)
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    return ((packed.reshape(-1, 1) >> shifts) & np.uint8(2**bits - 1)).reshape(-1)[:count]


def _unpacked(arrays: dict, name: str, fmt: Int, shape: tuple, dtype: torch.dtype) -> QuantizedTensor:
    n_scales = fmt.n_scales(shape)
    numel = math.prod(shape)
    codes = _unpack(arrays[f"{name}.codes"], fmt.bits, numel).astype(np.int32) + fmt.qmin
    if fmt.symmetric:
        zero = np.zeros(n_scales, dtype=np.int32)
    else:
        zero = _unpack(arrays[f"{name}.zero"], fmt.bits, n_scales).astype(np.int32)
    scale = torch.from_numpy(np.array(arrays[f"{name}.scale"], dtype=np.float16))
    return QuantizedTensor.from_rows(torch.from_numpy(codes).reshape(n_scales, -1), scale, torch.from_numpy(zero),
                                     fmt, shape, dtype)


def load_checkpoint(path, model, inplace: bool = False) -> QuantizedModel:
    """Read a packed checkpoint into a model of the same architecture.

    Parameters
    ----------
    path : path-like
        A file written by :func:`save_checkpoint`.
    model : nn.Module or system
        The architecture (its current weights do not matter). Copied unless ``inplace=True``.

    Returns
    -------
    QuantizedModel
        ``model``: the copy with every weight rebuilt, bit-identical to the fake-quant model the
        file was written from; ``weights``: the stored form (codes, scales, zero points, floats);
        ``plan``: the plan the file was made from.

    Raises
    ------
    CheckpointError
        Naming the file: truncated, corrupted (checksum), not a tqslite checkpoint, or written
        for another architecture (a tensor missing on either side, another shape or dtype).
    """
    _need_safetensors()
    header, raw, _ = _read_checked(path)
    meta = header["__metadata__"]
    qmap, plan_dict = json.loads(meta["map"]), json.loads(meta["plan"])
    target = model if inplace else copy.deepcopy(model)
    system = as_system(target)
    _check_architecture(path, qmap, system)
    arrays = st.load(raw)
    weights = QuantizedWeights(quantizer=meta.get("quantizer", ""))
    outside = {}
    for name, entry in qmap.items():
        config, shape, dtype = parse(entry["config"]), tuple(entry["shape"]), getattr(torch, entry["dtype"])
        missing = [k for k in _tensors_of(name, entry) if k not in arrays]
        if missing:
            raise CheckpointError(f"{path} lists tensor {name!r} in its map but stores no {missing[0]!r}.")
        if isinstance(config, Int):
            weights.tensors[name] = _unpacked(arrays, name, config, shape, dtype)
        else:
            value = torch.from_numpy(np.array(arrays[name])).to(dtype).reshape(shape)
            if entry["method"] == "outside plan":
                outside[name] = value
                continue
            weights.floats[name] = value
        weights.configs[name], weights.methods[name] = config, entry["method"]
    for name, value in (weights.dequantized() | outside).items():
        system.set_parameter(name, value)
    units = plan_dict["units"]
    members: dict[str, list] = {u: [] for u in units}
    for name, entry in qmap.items():
        if entry["method"] != "outside plan":
            members[entry.get("unit", name)].append(name)
    plan = Plan({u: as_config(c) for u, c in units.items()}, {u: tuple(ps) for u, ps in members.items()},
                {n: tuple(qmap[n]["shape"]) for ps in members.values() for n in ps}, dict(plan_dict["info"]))
    return QuantizedModel(target, weights, plan)


__all__ = ["CheckpointError", "FORMAT", "checkpoint_sizes", "load_checkpoint", "quantization_map", "read_metadata",
           "save_checkpoint"]
