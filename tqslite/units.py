"""Units: the named sets of parameter tensors that the probe perturbs and the allocator prices.

SPEC section 2:

* ``tensor`` granularity: every named parameter, 1-D ones included, is its own unit, labelled by
  its name (``"blocks.0.attn.qkv.weight"``).
* ``block`` granularity: one unit per module subtree at ``depth`` (default 1: the model's direct
  children), labelled by the module path (``"blocks.0"`` at depth 2); a parameter that sits
  directly on the root module is its own unit, labelled by its name.
* ``include`` / ``exclude``: shell-style patterns (``fnmatch``) on parameter names, applied
  before grouping (``exclude=["*.bias", "*norm*"]`` leaves biases and norm gains out).
* a custom map ``{label: [parameter names or patterns]}`` is accepted as it is.

Units are built from parameter *names* only, so the same code serves a torch module and an ONNX
graph whose initializers are named ``"blocks.0.attn.qkv.weight"`` and the like.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase


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


def make_units(
    names: Iterable[str],
    granularity: str = "tensor",
    depth: int = 1,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    custom: Mapping[str, Iterable[str]] | None = None,
) -> list[Unit]:
    """Group parameter ``names`` into units.

    Parameters
    ----------
    names : iterable of str
        Parameter names in model order (``[n for n, _ in module.named_parameters()]``).
    granularity : {"tensor", "block"}
        One unit per tensor, or one per module subtree at ``depth``.
    depth : int
        Block depth for ``granularity="block"``.
    include, exclude : list of str, optional
        ``fnmatch`` patterns on parameter names; a parameter is kept if it matches some
        ``include`` pattern (all are, if ``include`` is None) and no ``exclude`` pattern.
    custom : dict, optional
        ``{label: [names or patterns]}``; overrides ``granularity``. Every entry must match at
        least one parameter, and no parameter may sit in two units.

    Returns
    -------
    list of Unit
        In model order (a unit's position is that of its first parameter).
    """
    names = list(names)
    kept = [n for n in names if (include is None or _matches(n, include)) and not _matches(n, exclude)]
    if custom is not None:
        units, owner = [], {}
        for label, patterns in custom.items():
            patterns = [patterns] if isinstance(patterns, str) else list(patterns)
            members = tuple(n for n in kept if n in patterns or _matches(n, patterns))
            if not members:
                raise ValueError(f"custom unit {label!r} matches no parameter (patterns {patterns}); "
                                 f"parameter names look like {names[:3]}.")
            for n in members:
                if n in owner:
                    raise ValueError(f"parameter {n!r} is in two custom units: {owner[n]!r} and {label!r}.")
                owner[n] = label
            units.append(Unit(str(label), members))
    elif granularity == "tensor":
        units = [Unit(n, (n,)) for n in kept]
    elif granularity == "block":
        groups: dict[str, list[str]] = {}
        for n in kept:
            groups.setdefault(block_label(n, depth), []).append(n)
        units = [Unit(label, tuple(members)) for label, members in groups.items()]
    else:
        raise ValueError(f"granularity={granularity!r}: use 'tensor' or 'block' (or pass custom=...).")
    if not units:
        raise ValueError("the unit set is empty: no parameter is left after include/exclude "
                         f"(include={include}, exclude={exclude}); loosen the patterns.")
    return units


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
