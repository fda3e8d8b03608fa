"""Units: the named sets of parameter tensors that the probe perturbs and the allocator prices.

SPEC section 2:

* :class:`TensorUnits` (``"tensor"``): every named parameter, 1-D ones included, is its own unit,
  labelled by its name (``"blocks.0.attn.qkv.weight"``).
* :class:`BlockUnits` (``"block"``): one unit per module subtree at ``depth`` (default 1: the
  model's direct children), labelled by the module path (``"blocks.0"`` at depth 2); a parameter
  that sits directly on the root module is its own unit, labelled by its name.
* ``include`` / ``exclude`` on either: shell-style patterns (``fnmatch``) on parameter names,
  applied before grouping (``exclude=("*.bias", "*norm*")`` leaves biases and norm gains out of
  every unit: they stay in float, and count in the model's size).
* a custom map ``{label: [parameter names or patterns]}`` is accepted as it is.

This is the *unit* granularity: which tensors share one configuration. How many scales a
quantized tensor stores is the *scale* granularity of :mod:`tqslite.config`.

Units are built from parameter *names* only, so the same code serves a torch module and an ONNX
graph whose initializers are named ``"blocks.0.attn.qkv.weight"`` and the like.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase

import numpy as np
import xarray as xr


@dataclass(frozen=True)
class Unit:
    """A unit: its label and the names of the parameter tensors it holds (in model order)."""

    label: str
    params: tuple[str, ...]


def _matches(name: str, patterns: Iterable[str] | None) -> bool:
    return any(fnmatchcase(name, p) for p in (patterns or ()))


def block_label(name: str, depth: int = 1) -> str:
    """The block a parameter belongs to: the first ``depth`` parts of its module path.

    ``block_label("blocks.0.attn.qkv.weight", 2) == "blocks.0"``; a parameter on the root
    module (no dot in its name) is its own block: ``block_label("pos_embed") == "pos_embed"``.
    """
    if depth < 1:
        raise ValueError(f"depth={depth}: block depth must be at least 1.")
    parts = name.split(".")
    if len(parts) == 1:
        return name
    return ".".join(parts[:-1][:depth])


@dataclass(frozen=True)
class TensorUnits:
    """Unit granularity ``tensor``: one unit per parameter tensor, labelled by its name.

    ``include``/``exclude`` are ``fnmatch`` patterns on parameter names (a parameter is kept if it
    matches some ``include`` pattern -- all are, if ``include`` is None -- and no ``exclude``
    pattern); ``exclude=("*.bias", "*norm*")`` leaves biases and norm gains in float.
    """

    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None

    def __post_init__(self):
        _freeze_patterns(self)


@dataclass(frozen=True)
class BlockUnits:
    """Unit granularity ``block``: one unit per module subtree at ``depth`` (see :func:`block_label`).

    ``include``/``exclude`` as for :class:`TensorUnits`, applied to parameter names before grouping.
    """

    depth: int = 1
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None

    def __post_init__(self):
        if isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth < 1:
            raise ValueError(f"depth={self.depth!r}: block depth must be an integer >= 1.")
        _freeze_patterns(self)


def _freeze_patterns(spec) -> None:
    for key in ("include", "exclude"):
        value = getattr(spec, key)
        if isinstance(value, str):
            value = (value,)
        object.__setattr__(spec, key, None if value is None else tuple(value))


def as_unit_spec(spec) -> TensorUnits | BlockUnits | dict:
    """``"tensor"`` -> :class:`TensorUnits`, ``"block"`` -> :class:`BlockUnits`; specs and custom maps as they are."""
    if isinstance(spec, (TensorUnits, BlockUnits)):
        return spec
    if isinstance(spec, Mapping):
        return dict(spec)
    if spec == "tensor":
        return TensorUnits()
    if spec == "block":
        return BlockUnits()
    raise ValueError(f"units={spec!r}: use 'tensor', 'block', TensorUnits(...), BlockUnits(depth, ...), a custom map "
                     "{label: [names or patterns]} or a list of Unit.")


def make_units(names: Iterable[str], spec="tensor") -> list[Unit]:
    """Group parameter ``names`` into units.

    Parameters
    ----------
    names : iterable of str
        Parameter names in model order (``[n for n, _ in module.named_parameters()]``).
    spec : "tensor", "block", TensorUnits, BlockUnits or dict
        The unit granularity (``"block"`` is ``BlockUnits(depth=1)``), or a custom map
        ``{label: [names or patterns]}``: every entry must match at least one parameter, and no
        parameter may sit in two units.

    Returns
    -------
    list of Unit
        In model order (a unit's position is that of its first parameter); custom units in the
        map's order.
    """
    names = list(names)
    spec = as_unit_spec(spec)
    if isinstance(spec, dict):
        units, owner = [], {}
        for label, patterns in spec.items():
            patterns = [patterns] if isinstance(patterns, str) else list(patterns)
            members = tuple(n for n in names if n in patterns or _matches(n, patterns))
            if not members:
                raise ValueError(f"custom unit {label!r} matches no parameter (patterns {patterns}); "
                                 f"parameter names look like {names[:3]}.")
            for n in members:
                if n in owner:
                    raise ValueError(f"parameter {n!r} is in two custom units: {owner[n]!r} and {label!r}.")
                owner[n] = label
            units.append(Unit(str(label), members))
        return units
    kept = [n for n in names if (spec.include is None or _matches(n, spec.include)) and not _matches(n, spec.exclude)]
    if isinstance(spec, TensorUnits):
        units = [Unit(n, (n,)) for n in kept]
    else:
        groups: dict[str, list[str]] = {}
        for n in kept:
            groups.setdefault(block_label(n, spec.depth), []).append(n)
        units = [Unit(label, tuple(members)) for label, members in groups.items()]
    if not units:
        raise ValueError(f"the unit set is empty: no parameter is left after include={spec.include} and "
                         f"exclude={spec.exclude}; loosen the patterns.")
    return units


def resolve_units(spec, names: Iterable[str]) -> list[Unit]:
    """Units from anything the library accepts: a spec or custom map (:func:`make_units`) or a list of Unit (checked)."""
    names = list(names)
    if isinstance(spec, (list, tuple)) and all(isinstance(u, Unit) for u in spec):
        return check_units(spec, names)
    return make_units(names, spec)


def check_units(units: Iterable[Unit], names: Iterable[str]) -> list[Unit]:
    """Validate user-supplied units against a system's parameter names; return them as a list."""
    units, known = list(units), set(names)
    if not units:
        raise ValueError("the unit set is empty: pass at least one unit.")
    labels = [u.label for u in units]
    if len(set(labels)) != len(labels):
        raise ValueError(f"unit labels must be unique; repeated: {sorted({x for x in labels if labels.count(x) > 1})}.")
    for u in units:
        unknown = [p for p in u.params if p not in known]
        if unknown or not u.params:
            raise ValueError(f"unit {u.label!r} names unknown parameter(s) {unknown or '(none)'}; "
                             f"the system has e.g. {sorted(known)[:5]}.")
    return units


# --------------------------------------------------------------------------------------------
# Units in results: a ``tensor`` dim that says which unit each tensor belongs to
# --------------------------------------------------------------------------------------------

def membership(units: Iterable[Unit]) -> xr.Dataset:
    """The units as an xarray Dataset: coordinate ``tensor`` (every member) and ``tensor_unit(tensor)``.

    Merged into a result (``scores.merge(membership(units))``), it stores the units without
    joining names into strings; :func:`units_of` reads them back.
    """
    units = list(units)
    labels = np.asarray([u.label for u in units for _ in u.params], dtype=object)
    return xr.Dataset({"tensor_unit": ("tensor", labels, {"long_name": "the unit each member tensor belongs to"})},
                      coords={"tensor": np.asarray([p for u in units for p in u.params], dtype=object)})


def units_of(ds) -> list[Unit]:
    """The units of a result Dataset (dims ``unit`` and ``tensor``), in the order of its ``unit`` dim."""
    if "tensor_unit" not in ds:
        raise ValueError("this Dataset has no 'tensor_unit' variable: it is not a tqslite score set or cost table "
                         "(make one with tqslite.probe or one of the score functions).")
    members: dict[str, list[str]] = {}
    for name, label in zip(ds["tensor"].values, ds["tensor_unit"].values):
        members.setdefault(str(label), []).append(str(name))
    return [Unit(str(u), tuple(members.get(str(u), ()))) for u in ds["unit"].values]
