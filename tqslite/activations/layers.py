"""Finding the layers whose outputs are quantized: Linear, Conv1d and Conv2d, by name or pattern."""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

from torch import nn

#: The layer types whose outputs are quantized.
QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


def torch_module(model) -> nn.Module:
    """The ``nn.Module`` behind ``model`` (a module, or a system with a ``module`` attribute)."""
    if isinstance(model, nn.Module):
        return model
    module = getattr(model, "module", None)
    if isinstance(module, nn.Module):
        return module
    raise TypeError(f"{type(model).__name__} has no torch module: activation quantization and the activation "
                    "probe attach forward hooks, so they need an nn.Module, a TorchSystem or a WindowedSystem "
                    "(an ONNX graph cannot be hooked).")


def quantizable_modules(model, modules: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """The ``Linear`` / ``Conv1d`` / ``Conv2d`` layers of ``model`` whose outputs get quantized.

    Parameters
    ----------
    model : nn.Module or system
        The model (see :func:`torch_module`).
    modules : list of str, optional
        Module names or ``fnmatch`` patterns (``"blocks.*.mlp.fc1"``); the name of a container
        (``"blocks.0"``) selects every quantizable layer inside it. Default: every quantizable
        layer. A pattern that selects no quantizable layer raises ``ValueError``.

    Returns
    -------
    dict
        ``{qualified name: module}`` in model order.
    """
    net = torch_module(model)
    named = dict(net.named_modules())
    found = {n: m for n, m in named.items() if isinstance(m, QUANTIZABLE)}
    if modules is None:
        if not found:
            raise ValueError(f"{type(net).__name__} has no Linear or Conv1d/2d layer to quantize.")
        return found
    modules = [modules] if isinstance(modules, str) else list(modules)
    chosen = set()
    for pattern in modules:
        hits = [n for n in found if n == pattern or fnmatchcase(n, pattern) or n.startswith(pattern + ".")]
        if not hits:
            if pattern in named:
                raise ValueError(f"module {pattern!r} is a {type(named[pattern]).__name__} with no Linear or "
                                 "Conv1d/2d layer inside; only those layers' outputs are quantized.")
            raise ValueError(f"module {pattern!r} matches no submodule; quantizable layers are e.g. {list(found)[:5]}.")
        chosen.update(hits)
    return {n: m for n, m in found.items() if n in chosen}


def is_linear(module: nn.Module) -> bool:
    """Whether the layer is a Linear (channels last) rather than a convolution (channels at dim 1)."""
    return isinstance(module, nn.Linear)


def layer_channels(module: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)``: input features and output channels."""
    if is_linear(module):
        return module.in_features, module.out_features
    return module.in_channels, module.out_channels
