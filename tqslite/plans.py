"""Plans: an ordered ``{unit: configuration}`` map, saved as JSON, and what a plan does to a model.

A :class:`Plan` says how every unit of a model is stored (SPEC section 3): each unit's
configuration (:mod:`tqslite.config`), its member tensors and their shapes. It holds no metrics:
how large a plan is on a model (:func:`plan_size`, which counts the tensors outside every unit
in float) and what error it predicts (:func:`tqslite.allocation.predicted_error`) are computed
from the plan and the model. A uniform plan needs only the model (:func:`uniform_plan`); the
allocator makes mixed ones (:func:`tqslite.allocation.allocate`); a hand-written JSON file is a
plan too::

    {"format": "tqslite.plan/1",
     "units": {"blocks.0": {"config": "int4/group32",
                            "tensors": {"blocks.0.attn.qkv.weight": [192, 64], ...}},
               ...},
     "info": {"made by": "allocate", ...}}

:func:`release_size` counts the stored bits of another quantized model -- a vendor's int8
release as torch quantized tensors or as plain ``(codes, scale, zero_point)`` -- and
:func:`budget_of` turns it into a budget in bytes for
``allocate(..., budget_bytes=...)``: a plan of the same size, every bit counted the same way.

:func:`quantize` applies a plan with any quantizer (:mod:`tqslite.quantizers`) and returns the
quantized copy together with every tensor's stored form; :func:`apply_plan` returns just the copy.
A plan refuses a model whose tensors or shapes differ, naming the first mismatch, before anything
is written; the caller's model is never modified unless ``inplace=True``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .files import write_atomic
from .config import Config, KeepFloat, as_config, parse
from .quantizers import RTN, QuantizedWeights, as_quantizer
from .systems import as_system
from .units import resolve_units

#: The ``format`` key of a plan file.
FORMAT = "tqslite.plan/1"


@dataclass(frozen=True)
class Plan(Mapping):
    """An ordered ``{unit: configuration}`` map with each unit's member tensors and their shapes.

    Attributes
    ----------
    configs : dict of str to Config
        Each unit's configuration, in model order.
    members : dict of str to tuple of str
        Each unit's parameter names.
    shapes : dict of str to tuple of int
        Each member tensor's shape.
    info : dict
        How the plan was made (solver, budget, objective, quantizer, ...): informative only,
        never needed to use the plan.
    """

    configs: dict
    members: dict
    shapes: dict
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        if list(self.configs) != list(self.members):
            raise ValueError("a plan needs the same units, in the same order, in configs and members.")
        missing = [p for ps in self.members.values() for p in ps if p not in self.shapes]
        if missing:
            raise ValueError(f"the plan has no shape for member tensor(s) {missing[:5]}.")
        object.__setattr__(self, "configs", {str(u): as_config(c) for u, c in self.configs.items()})

    def __getitem__(self, unit) -> Config:
        return self.configs[unit]

    def __iter__(self):
        return iter(self.configs)

    def __len__(self) -> int:
        return len(self.configs)

    @property
    def bits(self) -> dict:
        """``{unit: nominal bits}``: the code width of integer formats, 16 or 32 for the float ones."""
        return {u: c.bits for u, c in self.configs.items()}

    @property
    def n_params(self) -> dict:
        """``{unit: number of parameters}``, from the member shapes."""
        return {u: sum(math.prod(self.shapes[p]) for p in ps) for u, ps in self.members.items()}

    def tensor_configs(self) -> dict:
        """``{tensor name: configuration}`` for every member tensor."""
        return {p: self.configs[u] for u, ps in self.members.items() for p in ps}

    def check(self, model) -> None:
        """Raise ``ValueError`` naming the first member tensor the model lacks or holds in another shape."""
        system = as_system(model)
        known = set(system.parameter_names())
        for u, ps in self.members.items():
            for p in ps:
                if p not in known:
                    raise ValueError(f"the plan's unit {u!r} names tensor {p!r}, which this model does not have "
                                     "(was the plan made for another model?).")
                shape = tuple(system.get_parameter(p).shape)
                if shape != self.shapes[p]:
                    raise ValueError(f"the plan's tensor {p!r} has shape {self.shapes[p]}, the model's {shape} "
                                     "(was the plan made for another model?).")

    # -- JSON -----------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        units = {u: {"config": c.label, "tensors": {p: list(self.shapes[p]) for p in self.members[u]}}
                 for u, c in self.configs.items()}
        return {"format": FORMAT, "units": units, "info": self.info}

    def to_json(self) -> str:
        """The plan as JSON, one line per tensor shape."""
        text = json.dumps(self.to_dict(), indent=1)
        return re.sub(r"\[\s*([-\d,\s]*?)\s*\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)

    @classmethod
    def from_dict(cls, d: dict, source: str = "the plan") -> Plan:
        """Read a plan from its JSON dict; ``ValueError`` naming ``source`` and what is wrong."""
        if not isinstance(d, dict) or d.get("format") != FORMAT or not isinstance(d.get("units"), dict):
            raise ValueError(f"{source} is not a tqslite plan: it needs \"format\": \"{FORMAT}\" and a \"units\" map "
                             "(write one with Plan.save, or see tqslite.plans).")
        configs, members, shapes = {}, {}, {}
        for u, entry in d["units"].items():
            try:
                configs[u] = parse(entry["config"])
                members[u] = tuple(entry["tensors"])
                shapes.update({p: tuple(int(s) for s in shape) for p, shape in entry["tensors"].items()})
            except (KeyError, TypeError, AttributeError, ValueError) as err:
                raise ValueError(f"{source}: unit {u!r} needs a \"config\" label and a \"tensors\" map "
                                 f"{{name: shape}} ({err}).") from None
        return cls(configs, members, shapes, dict(d.get("info", {})))

    def save(self, path) -> Path:
        """Write the plan as JSON, atomically (a failed write leaves any older file intact)."""
        return write_atomic(path, lambda tmp: tmp.write_text(self.to_json()))

    @classmethod
    def load(cls, path) -> Plan:
        """Read a plan written by :meth:`save` (or by hand)."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not JSON ({err}); is it a tqslite plan?") from None
        return cls.from_dict(d, str(path))


def plan_from_configs(model, configs: Mapping, units, info: dict | None = None) -> Plan:
    """A plan for ``model`` giving each unit of ``units`` the configuration ``configs[label]``."""
    system = as_system(model)
    unit_list = resolve_units(units, system.parameter_names())
    missing = [u.label for u in unit_list if u.label not in configs]
    if missing:
        raise ValueError(f"no configuration for unit(s) {missing[:5]}.")
    shapes = {p: tuple(system.get_parameter(p).shape) for u in unit_list for p in u.params}
    return Plan({u.label: as_config(configs[u.label]) for u in unit_list}, {u.label: u.params for u in unit_list},
                shapes, dict(info or {}))


def uniform_plan(model, config=4, units="tensor") -> Plan:
    """Every unit of ``model`` on one configuration: no scores needed.

    ``config`` is a configuration, a label (``"int3/group32"``) or an int (4 is ``Int(4)``).
    ``units`` as in :func:`tqslite.probe` (every parameter tensor by default).
    """
    config = as_config(config)
    system = as_system(model)
    labels = [u.label for u in resolve_units(units, system.parameter_names())]
    return plan_from_configs(system, dict.fromkeys(labels, config), units, {"made by": "uniform_plan",
                                                                            "config": config.label})


# --------------------------------------------------------------------------------------------
# Metrics of a plan on a model
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PlanSize:
    """What a plan stores on a model, every bit counted.

    Attributes
    ----------
    stored_bits : int
        Codes, float16 scales, zero points and float tensors of the plan's units, plus every
        parameter outside the units kept in its own dtype.
    n_params : int
        All parameters of the model.
    outside_params : int
        Parameters in no unit of the plan (kept in float, counted in ``stored_bits``).
    nominal_bits : float
        The parameter-weighted mean of the configurations' nominal bits (outside parameters at
        their dtype's bits): what "a 4-bit plan" says, without scales.
    """

    stored_bits: int
    n_params: int
    outside_params: int
    nominal_bits: float

    @property
    def bits_per_param(self) -> float:
        """Stored bits per parameter, scales and float tensors included."""
        return self.stored_bits / self.n_params

    @property
    def bytes(self) -> int:
        """``ceil(stored_bits / 8)``."""
        return math.ceil(self.stored_bits / 8)

    @property
    def compression(self) -> float:
        """Against float32 storage of every parameter."""
        return 32.0 * self.n_params / self.stored_bits


def plan_size(plan: Plan, model) -> PlanSize:
    """The stored size of ``plan`` on ``model`` (:class:`PlanSize`); the plan is checked first."""
    system = as_system(model)
    plan.check(system)
    configs = plan.tensor_configs()
    stored = nominal = 0.0
    n_params = outside = 0
    for name in system.parameter_names():
        w = system.get_parameter(name)
        config = configs.get(name, KeepFloat())
        stored += config.storage_bits(tuple(w.shape), system.channel_axis(name), w.dtype)
        width = torch.finfo(w.dtype).bits if isinstance(config, KeepFloat) else config.bits
        nominal += width * w.numel()
        n_params += w.numel()
        outside += 0 if name in configs else w.numel()
    return PlanSize(int(stored), n_params, outside, nominal / max(n_params, 1))


# --------------------------------------------------------------------------------------------
# The size of another quantized model: a budget at matched size
# --------------------------------------------------------------------------------------------

#: Bits per element of torch's quantized dtypes (``quint4x2`` packs two codes per byte).
QUANTIZED_DTYPE_BITS = {torch.qint8: 8, torch.quint8: 8, torch.qint32: 32, torch.quint4x2: 4, torch.quint2x4: 2}
SCALE_SUFFIXES = ("scale", "scales")
ZERO_POINT_SUFFIXES = ("zero_point", "zero_points", "zeros")


@dataclass(frozen=True)
class ReleaseSize:
    """What another quantized model stores, every bit counted (:func:`release_size`).

    Attributes
    ----------
    code_bits : int
        Integer codes, at the width of their dtype (``qint8``: 8, ``quint4x2``: 4).
    scale_bits : int
        Scales, at the width they are stored in (torch keeps per-channel scales in float64).
    zero_point_bits : int
        Zero points, likewise (torch: int64 per channel).
    float_bits : int
        Tensors kept in a float dtype (biases, norms, layers left unquantized).
    n_params : int
        Parameters: code elements plus float elements (scales and zero points are not).
    n_quantized : int
        Parameters stored as integer codes.
    """

    code_bits: int
    scale_bits: int
    zero_point_bits: int
    float_bits: int
    n_params: int
    n_quantized: int

    @property
    def stored_bits(self) -> int:
        """Everything: codes, scales, zero points and float tensors."""
        return self.code_bits + self.scale_bits + self.zero_point_bits + self.float_bits

    @property
    def bytes(self) -> int:
        """``ceil(stored_bits / 8)``: pass it to ``allocate(..., budget_bytes=...)`` for a plan of the same size."""
        return math.ceil(self.stored_bits / 8)

    @property
    def bits_per_param(self) -> float:
        """Stored bits per parameter, scales and float tensors included."""
        return self.stored_bits / self.n_params

    @property
    def nominal_bits(self) -> float:
        """Bits per parameter of codes and float tensors only: what "int8" says, without scales."""
        return (self.code_bits + self.float_bits) / self.n_params


def _width(t: torch.Tensor) -> int:
    if t.is_quantized:
        return QUANTIZED_DTYPE_BITS[t.dtype]
    if t.dtype == torch.bool:
        return 8
    return torch.finfo(t.dtype).bits if t.is_floating_point() else torch.iinfo(t.dtype).bits


def _leaves(obj, key: str = ""):
    """``(key, tensor, role)`` for every tensor in a state dict; ``role`` is None or "scale"/"zero_point"."""
    if torch.is_tensor(obj):
        yield key, obj, None
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _leaves(v, f"{key}.{k}" if key else str(k))
    elif isinstance(obj, (tuple, list)):
        plain = len(obj) == 3 and torch.is_tensor(obj[0]) and not obj[0].is_quantized and \
            not obj[0].is_floating_point() and obj[0].dtype != torch.bool
        if plain:  # the plain layout (codes, scale, zero_point)
            yield key, obj[0], None
            yield f"{key}.scale", obj[1], "scale"
            if obj[2] is not None:
                yield f"{key}.zero_point", obj[2], "zero_point"
        else:
            for i, v in enumerate(obj):
                yield from _leaves(v, f"{key}.{i}")
    # anything else (a torch.dtype, a number, a string) is metadata in the pickle, not stored data


def _role(key: str, code_keys: set) -> str | None:
    """``"scale"``/``"zero_point"`` for a flat key that names one of some codes, else None.

    ``"fc.weight_scale"`` is a scale if ``"fc.weight"`` holds codes; ``"fc.scale"`` if some key
    under ``"fc."`` does (a torch.ao quantized module). Anything else, a float parameter named
    ``layer_scale`` included, is an ordinary tensor.
    """
    base, _, last = key.rpartition(".")
    for suffixes, role in ((SCALE_SUFFIXES, "scale"), (ZERO_POINT_SUFFIXES, "zero_point")):
        for sfx in suffixes:
            owner = last[:-len(sfx) - 1]
            if last.endswith("_" + sfx) and (f"{base}.{owner}" if base else owner) in code_keys:
                return role
            if last == sfx and any(k != key and k.startswith(f"{base}.") for k in code_keys):
                return role
    return None


def release_size(release, n_params: int | None = None) -> ReleaseSize:
    """Count every stored bit of another quantized model, e.g. a vendor's int8 release.

    Parameters
    ----------
    release : state dict, nn.Module, or path of a ``torch.save`` file
        Tensors in any of these layouts, mixed freely:

        * torch quantized tensors (``torch.quantize_per_channel`` / ``quantize_per_tensor``,
          what ``torch.ao.quantization`` modules hold, packed parameter tuples included):
          codes at their dtype's width; per-channel scales and zero points as stored
          (float64 and int64); a per-tensor scale and zero point count 64 bits each (torch
          keeps them as a Python float and int);
        * the plain layout ``{name: (codes, scale, zero_point)}``: integer ``codes`` at their
          dtype's width, ``scale`` and ``zero_point`` (or None) tensors as stored;
        * flat keys: integer tensors are codes, and a key named ``scale``/``scales`` or ending in
          ``_scale(s)`` is a scale, ``zero_point(s)``/``zeros`` or ``_zero_point(s)`` a zero
          point (``"fc.weight"``, ``"fc.weight_scale"``, ``"fc.weight_zero_point"``);
        * float tensors: at their dtype's width.

        Non-tensor entries (a ``torch.dtype``, numbers) are not counted.
    n_params : int, optional
        The model's number of parameters, if codes are packed several to an element (then
        code elements are not parameters).

    Returns
    -------
    ReleaseSize
        ``.bytes`` is the budget of a plan of the same size: ``allocate(scores, model,
        budget_bytes=release_size(release).bytes)``. For a ``torch.save`` file it equals the
        bytes of the file's tensor storages, plus 16 per per-tensor quantized tensor (the
        rest of the file is the pickle and the zip's headers).
    """
    if isinstance(release, (str, os.PathLike)):
        with warnings.catch_warnings():  # torch's own deprecation notice when it rebuilds quantized tensors
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
            release = torch.load(release, map_location="cpu", weights_only=True)
    if isinstance(release, torch.nn.Module):
        release = release.state_dict()
    if not isinstance(release, Mapping):
        raise TypeError(f"release_size takes a state dict, an nn.Module or a file path, got {type(release).__name__}.")
    leaves = list(_leaves(release))
    code_keys = {k for k, t, r in leaves if r is None and (t.is_quantized or not t.is_floating_point())}
    codes = scales = zeros = floats = n = nq = 0
    for key, t, role in leaves:
        role = role or _role(key, code_keys)
        if t.is_quantized:
            nq += t.numel()
            codes += math.ceil(t.numel() * _width(t) / 8) * 8
            if t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric,
                               torch.per_channel_affine_float_qparams):
                s, z = t.q_per_channel_scales(), t.q_per_channel_zero_points()
                scales += s.numel() * _width(s)
                zeros += z.numel() * _width(z)
            else:
                scales, zeros = scales + 64, zeros + 64
        elif role == "scale":
            scales += t.numel() * _width(t)
        elif role == "zero_point":
            zeros += t.numel() * _width(t)
        elif t.is_floating_point():
            floats += t.numel() * _width(t)
            n += t.numel()
        else:
            codes += t.numel() * _width(t)
            nq += t.numel()
    total = n + nq if n_params is None else int(n_params)
    if total <= 0:
        raise ValueError("the release holds no parameters (no integer codes and no float tensors).")
    return ReleaseSize(codes, scales, zeros, floats, total, nq)


def budget_of(release, n_params: int | None = None) -> int:
    """The size of another quantized model in bytes: a budget for ``allocate(..., budget_bytes=...)``.

    ``release_size(release, n_params).bytes``; see :func:`release_size` for the layouts.
    """
    return release_size(release, n_params).bytes


# --------------------------------------------------------------------------------------------
# Applying a plan
# --------------------------------------------------------------------------------------------

@dataclass
class QuantizedModel:
    """A plan applied by a quantizer: the quantized copy and every tensor's stored form.

    Attributes
    ----------
    model : nn.Module or system
        The quantized copy, of the same kind as the model passed in (fake-quant weights).
    weights : QuantizedWeights
        Codes, scales and zero points of the integer tensors, the float ones, and how each
        tensor was quantized (``weights.fallbacks`` names what a calibration-based quantizer
        left to RTN).
    plan : Plan
    """

    model: object
    weights: QuantizedWeights
    plan: Plan


def quantize(model, plan: Plan, quantizer=None, calibration=None, inplace: bool = False,
             progress: bool = False) -> QuantizedModel:
    """Apply ``plan`` to ``model`` with ``quantizer`` (RTN by default): a :class:`QuantizedModel`.

    Parameters
    ----------
    model : nn.Module or system
        Left untouched unless ``inplace=True``.
    plan : Plan
        Checked against the model before anything is computed.
    quantizer : Quantizer or str, optional
        ``RTN()`` (default), ``MSEClip()``, ``GPTQ()`` or a name (``"rtn"``, ``"mse"``, ``"gptq"``).
    calibration : Tensor, optional
        States for a calibration-based quantizer (GPTQ), shaped like the model's input.
    """
    quantizer = RTN() if quantizer is None else as_quantizer(quantizer)
    plan.check(model)
    if quantizer.needs_calibration and calibration is None:
        raise ValueError(f"{quantizer.name} needs calibration states: pass calibration=... (inputs of the model, "
                         "e.g. training states).")
    weights = quantizer.quantize_weights(model, plan.tensor_configs(), calibration, progress)
    target = model if inplace else copy.deepcopy(model)
    system = as_system(target)
    for name, w in weights.dequantized().items():  # everything computed before anything is written
        system.set_parameter(name, w)
    return QuantizedModel(target, weights, plan)


def apply_plan(model, plan: Plan, quantizer=None, calibration=None, inplace: bool = False):
    """A copy of ``model`` quantized by ``plan`` with ``quantizer`` (see :func:`quantize`)."""
    return quantize(model, plan, quantizer, calibration, inplace).model


__all__ = ["FORMAT", "Plan", "PlanSize", "QuantizedModel", "ReleaseSize", "apply_plan", "budget_of",
           "plan_from_configs", "plan_size", "quantize", "release_size", "uniform_plan"]
