"""Units: the named sets of parameter tensors that the probe perturbs and the allocator prices.

SPEC section 2:

* :class:`TensorUnits` (``"tensor"``): every named parameter, 1-D ones included, is its own unit,
  labelled by its name (``"blocks.0.attn.qkv.weight"``).
* :class:`BlockUnits` (``"block"``): one unit per module subtree at ``depth`` (default 1: the
  model's direct children), labelled by the module path (``"blocks.0"`` at depth 2); a parameter
  that sits directly on the root module is its own unit, labelled by its name. Labels are
  honest: a module whose subtree is split over several units at that depth (a parameter directly
  on ``head`` while ``head.mlp`` is a unit of its own) is not one unit, so each of its own
  parameters is a unit labelled by its name (``"head.proj"``), as for the root.
* ``include`` / ``exclude`` on either: shell-style patterns (``fnmatch``) on parameter names,
  applied before grouping (``exclude=("*.bias", "*norm*")`` leaves biases and norm gains out of
  every unit: they stay in float, and count in the model's size).
* a custom map ``{label: [parameter names or patterns]}`` is accepted as it is.

:func:`unit_tree` shows a model's modules and tensors as a tree, with parameter counts, shares and
the block depths at which each is one unit, so a depth can be chosen before probing
(:func:`format_unit_tree` prints it; ``tqslite units MODEL`` on the command line).

This is the *unit* granularity: which tensors share one configuration. How many scales a
quantized tensor stores is the *scale* granularity of :mod:`tqslite.config`.

Units are built from parameter *names* only, so the same code serves a torch module and an ONNX
graph whose initializers are named ``"blocks.0.attn.qkv.weight"`` and the like.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase

import numpy as np
import pandas as pd
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
    A module split over several units at this depth (some parameters directly on it, others in
    submodules that are units of their own) is not labelled as a whole: each of its own
    parameters becomes a unit labelled by its name.
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
        labels = {n: block_label(n, spec.depth) for n in kept}
        blocks = set(labels.values())
        # a block that is a proper prefix of another is split: its own parameters are units by name
        split = {b for b in blocks if any(other.startswith(b + ".") for other in blocks)}
        groups: dict[str, list[str]] = {}
        for n in kept:
            groups.setdefault(n if labels[n] in split else labels[n], []).append(n)
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


# --------------------------------------------------------------------------------------------
# The unit tree: what each depth would make of a model, before probing
# --------------------------------------------------------------------------------------------

def _tree_root(model):
    """``(names, shapes, root module or None)`` of a model or system."""
    from .systems import as_system
    system = as_system(model)
    names = system.parameter_names()
    shapes = {n: tuple(system.get_parameter(n).shape) for n in names}
    root = getattr(system, "model", None)  # an adapter: the wrapped model
    if root is None:
        root = getattr(system, "module", None)
    return names, shapes, root


def unit_tree(model, depth: int | None = None) -> pd.DataFrame:
    """The modules and tensors of ``model`` as a tree: sizes, shares, and where each is one unit.

    Parameters
    ----------
    model : nn.Module or system
        Anything :func:`tqslite.probe` takes (an adapter shows the wrapped model's names).
    depth : int, optional
        Show the tree down to the units of ``BlockUnits(depth)`` (their subtrees folded);
        default: every module and tensor.

    Returns
    -------
    pandas.DataFrame
        One row per node in model order (pre-order), indexed by ``path`` (``""`` for the whole
        model, module paths, tensor names). Columns: ``level`` (0 for the model), ``kind``
        (``"model"``, ``"module"`` or ``"tensor"``), ``type`` (the module's class, or the
        tensor's shape), ``n_params``, ``share`` (of all parameters), ``n_tensors``,
        ``unit_from`` and ``unit_to`` (the block depths ``d`` at which the node is one unit of
        ``BlockUnits(d)``: ``unit_from <= d <= unit_to``, 0 if never; ``unit_to`` equal to
        ``attrs["max_depth"]`` means every deeper depth too) and ``unit`` (True for the units
        of ``BlockUnits(depth)``, or for every tensor when ``depth`` is None). ``attrs`` hold
        ``max_depth`` (beyond it the block units no longer change), ``model`` (the class name),
        ``depth``, ``units`` (``{depth: number of units}``, and ``"tensor"``) and ``largest``
        (``{depth: (label, share)}``, the largest unit at each depth).
        :func:`format_unit_tree` prints it.
    """
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
        raise ValueError(f"depth={depth!r}: give a block depth >= 1, or None for the whole tree.")
    names, shapes, root = _tree_root(model)
    if not names:
        raise ValueError("the model has no parameters: there is nothing to quantize.")
    max_depth = max(1, max(n.count(".") for n in names))
    total = sum(math.prod(shapes[n]) for n in names)
    depths_of: dict[str, list[int]] = {}
    counts, largest = {}, {}
    for d in range(1, max_depth + 1):
        units = make_units(names, BlockUnits(d))
        counts[d] = len(units)
        sizes = {u.label: sum(math.prod(shapes[p]) for p in u.params) for u in units}
        top = max(sizes, key=sizes.get)
        largest[d] = (top, sizes[top] / total if total else 0.0)
        for u in units:
            depths_of.setdefault(u.label, []).append(d)
    counts["tensor"] = len(names)
    # nodes in pre-order: every module path on the way to a tensor, then the tensor
    order, members = [""], {"": list(names)}
    for n in names:
        parts = n.split(".")
        for i in range(1, len(parts) + 1):
            path = ".".join(parts[:i])
            if path not in members:
                members[path] = []
                order.append(path)
            if i < len(parts):
                members[path].append(n)
        members[n] = [n]
    order = _preorder(order)
    rows = []
    for path in order:
        is_tensor = path in shapes
        level = 0 if path == "" else path.count(".") + 1
        if path == "":
            kind, kind_type = "model", type(root).__name__ if root is not None else "model"
        elif is_tensor:
            kind, kind_type = "tensor", str(shapes[path])
        else:
            kind, kind_type = "module", _module_type(root, path)
        n_params = sum(math.prod(shapes[n]) for n in members[path])
        ds = depths_of.get(path, [])
        rows.append(dict(path=path, level=level, kind=kind, type=kind_type, n_params=n_params,
                         share=n_params / total if total else 0.0, n_tensors=len(members[path]),
                         unit_from=min(ds) if ds else 0, unit_to=max(ds) if ds else 0))
    tree = pd.DataFrame(rows).set_index("path")
    if depth is None:
        tree["unit"] = tree["kind"] == "tensor"
    else:
        d = min(depth, max_depth)
        tree["unit"] = (tree["unit_from"] > 0) & (tree["unit_from"] <= d) & (tree["unit_to"] >= d)
        unit_paths = [p for p in tree.index[tree["unit"]]]
        below = [p for p in tree.index if any(p.startswith(u + ".") for u in unit_paths)]
        tree = tree.drop(index=below)
    tree.attrs.update(max_depth=max_depth, model=tree.loc["", "type"], depth=depth if depth is not None else "none",
                      units=counts, largest=largest)
    return tree


def _preorder(paths: list[str]) -> list[str]:
    """Paths in pre-order: each node right after its parent, children in first-seen order."""
    children: dict[str, list[str]] = {}
    for p in paths[1:]:
        children.setdefault(p.rpartition(".")[0], []).append(p)
    out = []

    def visit(p):
        out.append(p)
        for c in children.get(p, []):
            visit(c)

    visit("")
    return out


def _module_type(root, path: str) -> str:
    try:
        return type(root.get_submodule(path)).__name__
    except (AttributeError, TypeError):
        return "module"  # not a torch module (an ONNX graph, a function of named tensors)


def format_unit_tree(tree: pd.DataFrame) -> str:
    """:func:`unit_tree` as text: an indented tree with parameter counts, shares and unit depths.

    The last column says at which block depths a node is one unit (``2`` at depth 2 only,
    ``2+`` at depth 2 and deeper); with a ``depth``, the units of that depth are marked ``<``.
    A footer counts the units at each depth and at tensor granularity, with the largest unit.
    """
    max_depth = tree.attrs.get("max_depth", 1)
    paths = list(tree.index)
    labels = []
    for i, path in enumerate(paths):
        row = tree.loc[path]
        if path == "":
            labels.append(f"{row['type']}")
            continue
        prefix = ""
        ancestors = path.split(".")
        for lvl in range(1, len(ancestors)):
            anc = ".".join(ancestors[:lvl])
            prefix += "|   " if _has_later_sibling(paths, anc) else "    "
        prefix += "`-- " if not _has_later_sibling(paths, path) else "|-- "
        name = ancestors[-1]
        labels.append(f"{prefix}{name}  {row['type']}" if row["kind"] != "tensor" else f"{prefix}{name} {row['type']}")
    width = max(len(s) for s in labels) + 2
    marked = tree.attrs.get("depth", "none") != "none"
    lines = [f"{tree.attrs.get('model', 'model')}: {int(tree.loc['', 'n_params']):,} parameters in "
             f"{int(tree.loc['', 'n_tensors'])} tensors",
             f"{'':{width}}{'params':>12}  {'share':>7}  unit at depth"]
    for label, (path, row) in zip(labels, tree.iterrows()):
        a, b = int(row["unit_from"]), int(row["unit_to"])
        at = "" if a == 0 else f"{a}+" if b == max_depth and a < max_depth else f"{a}" if a == b else f"{a}-{b}"
        if a == max_depth and b == max_depth:
            at = f"{a}+"
        mark = "  <" if marked and row["unit"] else ""
        lines.append(f"{label:{width}}{int(row['n_params']):>12,}  {100 * row['share']:6.1f}%  {at}{mark}")
    counts, largest = tree.attrs.get("units", {}), tree.attrs.get("largest", {})
    lines.append("units per granularity (the largest one):")
    for d, n in counts.items():
        if d != "tensor":
            label, share = largest[d]
            lines.append(f"  BlockUnits(depth={d}): {n:4d} units ({label}, {100 * share:.1f}%)")
    lines.append(f"  tensor:               {counts.get('tensor', 0):4d} units")
    return "\n".join(lines)


def _has_later_sibling(paths: list[str], path: str) -> bool:
    parent = path.rpartition(".")[0]
    i = paths.index(path)
    return any(p.rpartition(".")[0] == parent and p != "" for p in paths[i + 1:])
