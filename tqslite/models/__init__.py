"""The stand-in models and their shipped checkpoints.

Three small models with the architectural traits of the ones the paper studies (their weights
cannot be downloaded here), trained by :mod:`tqslite.train` on the data shipped in ``data/``:

* :mod:`tqslite.models.pangu_lite` -- a Pangu-Weather-like patch transformer on the
  Held--Suarez grid (also exported to ONNX and probed as a black box);
* :mod:`tqslite.models.aurora_lite` -- an Aurora-like encoder-processor-decoder on the same grid;
* :mod:`tqslite.models.timesfm_lite` -- a TimesFM-like decoder-only transformer over patches of
  the Irish daily wind series.

``load(name)`` returns ``(system, meta)``: a system ready for :func:`tqslite.probe` (its
``module`` attribute is the ``nn.Module``, in eval mode) and the checkpoint's JSON metadata
(hyper-parameters, normalisation statistics, training curve, skill). Every checkpoint file is
checked against ``data/checkpoints/SHA256SUMS`` before it is read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..data import DATA_DIR, verify_file
from ..systems import TorchSystem, WindowedSystem
from . import aurora_lite, pangu_lite, timesfm_lite

#: The models, by name: each module has ``NAME``, ``DATASET``, ``LAYOUT``, ``VARIABLES``,
#: ``ARCH``, ``TRAIN`` and ``build``.
MODELS = {m.NAME: m for m in (pangu_lite, aurora_lite, timesfm_lite)}

#: Where checkpoints live: ``NAME.pt`` (state_dict), ``NAME.json`` (metadata), ``pangu_lite.onnx``.
CHECKPOINT_DIR = DATA_DIR / "checkpoints"


def regenerate_command(name: str) -> str:
    """The command that rebuilds the checkpoint files of model ``name``."""
    return f"python -m tqslite.train {name}"


def module_of(name: str):
    """The model module for ``name`` (``ValueError`` listing the known names otherwise)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; the shipped ones are {sorted(MODELS)}.")
    return MODELS[name]


def checkpoint_path(name: str, suffix: str, checkpoint_dir=None, verify: bool = True) -> Path:
    """Path of ``NAME{suffix}`` in the checkpoint folder, checked against its ``SHA256SUMS``."""
    module_of(name)
    path = Path(checkpoint_dir or CHECKPOINT_DIR) / f"{name}{suffix}"
    if verify:
        verify_file(path, path.parent / "SHA256SUMS", regenerate_command(name))
    return path


def build_from_meta(name: str, meta: dict) -> torch.nn.Module:
    """An untrained model with the architecture recorded in ``meta`` (no weights loaded)."""
    module = module_of(name)
    extra = {"lat": meta["data"]["lat"]} if name == "aurora_lite" else {}
    return module.build(meta["architecture"], **extra)


def wrap(name: str, model: torch.nn.Module):
    """The system for a model: :class:`~tqslite.systems.WindowedSystem` for the series model,
    :class:`~tqslite.systems.TorchSystem` for the grid models."""
    return WindowedSystem(model) if module_of(name).LAYOUT == "series" else TorchSystem(model)


def load(name: str, backend: str = "torch", checkpoint_dir=None, verify: bool = True):
    """Load a shipped checkpoint as a system, with its metadata.

    Parameters
    ----------
    name : str
        ``"pangu_lite"``, ``"aurora_lite"`` or ``"timesfm_lite"`` (see :data:`MODELS`).
    backend : {"torch", "onnx"}
        ``"onnx"`` (``pangu_lite`` only) returns a :class:`tqslite.onnx_system.OnnxSystem` run
        by onnxruntime, with no torch code of the model involved.
    checkpoint_dir : path-like, optional
        Folder of the checkpoint files (default :data:`CHECKPOINT_DIR`).
    verify : bool
        Check every file against ``SHA256SUMS`` first (default). A mismatch raises
        :class:`tqslite.data.ChecksumError` naming the file and ``python -m tqslite.train NAME``.

    Returns
    -------
    system
        For the grid models, states are ``(B, C, 32, 64)`` normalised with
        ``meta["normalization"]``; for ``timesfm_lite``, context windows ``(B, L)``.
    dict
        The metadata written by :mod:`tqslite.train`.
    """
    meta = json.loads(checkpoint_path(name, ".json", checkpoint_dir, verify).read_text())
    if backend == "onnx":
        if name != "pangu_lite":
            raise ValueError(f"only pangu_lite ships as ONNX; load {name!r} with backend='torch'.")
        from ..onnx_system import OnnxSystem
        return OnnxSystem(checkpoint_path(name, ".onnx", checkpoint_dir, verify)), meta
    if backend != "torch":
        raise ValueError(f"backend={backend!r}: use 'torch' or 'onnx'.")
    model = build_from_meta(name, meta)
    state = torch.load(checkpoint_path(name, ".pt", checkpoint_dir, verify), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.eval()
    return wrap(name, model), meta


__all__ = ["CHECKPOINT_DIR", "MODELS", "build_from_meta", "checkpoint_path", "load", "module_of", "regenerate_command",
           "wrap"]
