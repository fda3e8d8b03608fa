"""Low-bit ONNX graphs from a plan: quantized weights that onnxruntime dequantizes at run time.

A quantized model's stored form (:class:`tqslite.QuantizedWeights`: integer codes, float16
scales, zero points) becomes a graph whose quantized weights are integer initializers, in one
of two ways:

* a weight consumed only as the right operand ``B`` ``(K, N)`` of ``MatMul`` nodes (a
  ``Linear`` on tokens, as the stand-ins export it) becomes onnxruntime's contrib op
  ``com.microsoft.MatMulNBits`` -- the fused low-bit kernel, the layout of onnxruntime's
  ``matmul_nbits_quantizer.py``: codes ``uint8 (N, k_blocks, block_size * bits / 8)`` packed
  low bits first along ``K``, scales ``(N, k_blocks)``, zero points packed the same way. tqslite's
  groups of ``g`` input columns are its blocks (``g`` a power of two >= 16); one scale per
  output channel is one block of ``K`` (rounded up to a power of two >= 16, at most 256; the
  scale is repeated when ``K`` needs several blocks). Its ``bits`` is 2, 4 or 8, so 3-bit codes
  are stored as 4-bit ones and 5-7-bit codes as 8-bit ones. Symmetric codes ``q`` are stored as
  ``q + 2**(bits-1)`` with no zero-point input (whose default is ``2**(bits-1)``);
* any other weight (convolutions, biases, norm gains, a ``MatMul`` weight whose groups do not fit)
  becomes ``DequantizeLinear`` (opset 21) on an ``int4``/``uint4`` (1-4 bits) or ``int8``/
  ``uint8`` (5-8 bits) initializer: per tensor (scalar scale), per channel (``axis``), or
  blocked (``block_size`` along the axis that runs through the groups: axis 0 of a ``(K, N)``
  ``MatMul`` weight, axis 1 of a ``(N, K)`` one). Groups that run across several axes (a
  convolution's ``in x kh x kw``) are stored as the 2-D ``(channels, rest)`` matrix of
  :func:`tqslite.quantization.to_rows` and reshaped after ``DequantizeLinear``. Symmetric codes
  are stored as ``int4``/``int8`` with no zero point (its default is 0): the 15 codes
  ``[-7, 7]`` of a symmetric 4-bit tensor fit ``int4`` as they are, where ``uint4`` would need a
  stored zero point of 8 per scale. Asymmetric codes are ``uint4``/``uint8`` with their zero points.

Scales are float32 in the graph: ``DequantizeLinear`` returns the scale's type and
``MatMulNBits`` wants that of its input, and ``(code - zero) * scale`` is exact in float32 (not
in float16), so the weights onnxruntime computes equal :meth:`tqslite.QuantizedTensor.dequantize`
bit for bit. Tensors on :class:`~tqslite.Float16` are float16 initializers followed by a ``Cast``;
the rest stay as they are. Every initializer is a constant (none is a graph input), so
onnxruntime can pre-pack the ``MatMulNBits`` weights.

Why not ``DequantizeLinear`` before every ``MatMul`` and let onnxruntime fuse? It does fuse
``DequantizeLinear -> MatMul`` into ``MatMulNBits``, but with ``accuracy_level=4`` by default
(session option ``session.qdq_matmulnbits_accuracy_level``), which rounds the *activations* to
int8 as well, so the product leaves the fake-quant model by far more than float rounding
(``tests/test_onnx_quant.py::test_why_matmul_weights_are_written_as_matmulnbits`` measures both).
``MatMulNBits`` written without ``accuracy_level`` computes in float32.

What the bytes cost (measured by :func:`onnx_sizes`): 3-bit codes take 4 bits, 1-bit and 5-7-bit
codes the next supported width; scales 4 bytes instead of 2; padding of ``K`` to a block of
``MatMulNBits``; and the graph itself (nodes, names, shapes).

* :func:`export_quantized` -- a torch model (a stand-in) and its quantized weights to a graph,
  through :func:`tqslite.onnx_system.export_onnx` (initializers keep the torch names; a
  ``Linear`` on tokens stores its weight transposed, ``(in, out)``, and the codes follow); a
  history-window model's graph gets the window step, so every graph maps state to state;
* :func:`quantize_graph` -- the black box: the initializers of an existing ONNX graph, from a
  plan made on its :class:`~tqslite.onnx_system.OnnxSystem` (whose channel axes come from the
  consuming nodes) or from weights quantized on it;
* :func:`onnx_sizes` and :func:`runtime_ops` -- where the bytes of a graph go, and which
  operators onnxruntime actually runs after its own graph optimizations.
"""

from __future__ import annotations

import collections
import copy
import json
import math
import os
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .files import write_atomic
from .config import Float16, KeepFloat, PerChannel, PerGroup, PerTensor
from .onnx_system import OnnxSystem, export_onnx
from .plans import Plan, QuantizedModel, quantize
from .quantization import QuantizedTensor, from_rows, pack_bits
from .quantizers import QuantizedWeights
from .systems import TorchSystem, WindowedSystem, as_system

try:  # optional dependencies: a clear message at use, not at import of tqslite
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper, version_converter
except ImportError as err:  # pragma: no cover - exercised only without the packages
    onnx = ort = TensorProto = helper = numpy_helper = version_converter = None
    _IMPORT_ERROR = err
else:
    _IMPORT_ERROR = None

#: The opset of the graphs written here (``DequantizeLinear`` with int4 and blocks).
OPSET = 21
#: Largest ``MatMulNBits`` block used for one scale per channel (MLAS's largest block length).
MAX_BLOCK = 256
#: Metadata key (``metadata_props``) holding the ``info`` JSON of a written graph.
INFO_KEY = "tqslite.info"


def _need_onnx():
    if _IMPORT_ERROR is not None:
        raise ImportError(f"the ONNX path needs the packages onnx and onnxruntime ({_IMPORT_ERROR}); "
                          "install them with `pip install onnx onnxruntime`.")


# --------------------------------------------------------------------------------------------
# One quantized tensor as initializers
# --------------------------------------------------------------------------------------------

def _int_tensor(name: str, values: np.ndarray, signed: bool, bits: int):
    """An int4/uint4 (``bits <= 4``) or int8/uint8 initializer holding integer ``values``."""
    if bits <= 4:
        nibbles = (values.astype(np.int64) & 0xF).astype(np.uint8).reshape(-1)  # two's complement for int4
        return helper.make_tensor(name, TensorProto.INT4 if signed else TensorProto.UINT4, list(values.shape),
                                  pack_bits(nibbles, 4), raw=True)
    return numpy_helper.from_array(values.astype(np.int8 if signed else np.uint8), name)


def _next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def _nbits_block(qt: QuantizedTensor) -> int | None:
    """The ``MatMulNBits`` block size for a ``(K, N)`` ``MatMul`` weight, or None if it does not fit."""
    g = qt.fmt.granularity
    k = qt.shape[0]
    if isinstance(g, PerGroup):
        ok = g.axis == 1 and g.group_size >= 16 and g.group_size == _next_pow2(g.group_size)
        return g.group_size if ok else None
    if isinstance(g, PerChannel) and g.axis != 1:
        return None
    return min(max(_next_pow2(k), 16), MAX_BLOCK)


def _matmul_nbits(qt: QuantizedTensor, block: int) -> tuple[dict, dict]:
    """Initializer arrays and attributes of ``MatMulNBits`` for a ``(K, N)`` weight (see the module docstring)."""
    fmt, (k, n) = qt.fmt, qt.shape
    bits = 2 if fmt.bits <= 2 else 4 if fmt.bits <= 4 else 8
    kb = math.ceil(k / block)
    codes = from_rows(qt.codes.to(torch.int64), qt.shape, fmt).T.numpy()               # (N, K), column n of W
    scale = qt.scale.to(torch.float32).numpy()
    zero = qt.zero.to(torch.int64).numpy()
    g = fmt.granularity
    if isinstance(g, PerGroup):
        scale, zero = scale.reshape(n, kb), zero.reshape(n, kb)
    else:  # one scale per channel (or per tensor), repeated over the channel's blocks
        scale, zero = np.broadcast_to(scale.reshape(-1, 1), (n, kb)), np.broadcast_to(zero.reshape(-1, 1), (n, kb))
    offset = 2 ** (bits - 1) if fmt.symmetric else 0
    stored = np.zeros((n, kb * block), dtype=np.uint8)
    stored[:, :k] = codes + offset
    stored[:, k:] = offset if fmt.symmetric else np.repeat(zero, block, axis=1)[:, k:]  # padding: value 0
    arrays = {"codes": np.frombuffer(pack_bits(stored, bits), dtype=np.uint8).reshape(n, kb, block * bits // 8),
              "scale": np.ascontiguousarray(scale, dtype=np.float32)}
    if not fmt.symmetric:
        per_row = math.ceil(kb * bits / 8)
        z = np.zeros((n, per_row * 8 // bits), dtype=np.uint8)
        z[:, :kb] = zero
        arrays["zero"] = np.frombuffer(pack_bits(z, bits), dtype=np.uint8).reshape(n, per_row)
    return arrays, {"K": k, "N": n, "bits": bits, "block_size": block}


def _dequantize_linear(qt: QuantizedTensor) -> dict:
    """How ``DequantizeLinear`` stores ``qt``: codes in their stored shape, scale, zero, attributes, reshape."""
    fmt, shape = qt.fmt, tuple(qt.shape)
    g = fmt.granularity
    rows = qt.codes.to(torch.int64)
    scale = qt.scale.to(torch.float32).numpy()
    zero = qt.zero.to(torch.int64).numpy()
    out = {"attrs": {}, "reshape": None, "perm": None}
    if isinstance(g, PerTensor):
        out.update(codes=rows.reshape(shape).numpy(), scale=scale.reshape(()), zero=zero.reshape(()))
    elif isinstance(g, PerChannel):
        out.update(codes=from_rows(rows, shape, fmt).numpy(), scale=scale, zero=zero, attrs={"axis": g.axis})
    elif len(shape) == 1:  # groups of a 1-D tensor: blocks along axis 0
        out.update(codes=rows.reshape(shape).numpy(), scale=scale, zero=zero,
                   attrs={"axis": 0, "block_size": g.group_size})
    elif len(shape) == 2:  # blocks along the other axis; scales (C, n/g) moved to the channel axis
        c = shape[g.axis]
        s, z = scale.reshape(c, -1), zero.reshape(c, -1)
        if g.axis == 1:
            s, z = s.T, z.T
        out.update(codes=from_rows(rows, shape, fmt).numpy(), scale=np.ascontiguousarray(s),
                   zero=np.ascontiguousarray(z), attrs={"axis": 1 - g.axis, "block_size": g.group_size})
    else:  # groups across several axes: the (C, rest) matrix, reshaped (and transposed) after
        c = shape[g.axis]
        moved = (c,) + tuple(s for i, s in enumerate(shape) if i != g.axis)
        out.update(codes=rows.reshape(c, -1).numpy(), scale=scale.reshape(c, -1), zero=zero.reshape(c, -1),
                   attrs={"axis": 1, "block_size": g.group_size}, reshape=moved)
        if g.axis != 0:
            out["perm"] = [i for i in range(1, g.axis + 1)] + [0] + list(range(g.axis + 1, len(shape)))
    return out


# --------------------------------------------------------------------------------------------
# Rewriting a graph
# --------------------------------------------------------------------------------------------

def _consumers(graph, name: str) -> list:
    return [(node, i) for node in graph.node for i, x in enumerate(node.input) if x == name]


def _lower(proto, tensors: dict, floats: dict) -> dict:
    """Replace initializers by their stored form, in place; returns ``{name: "MatMulNBits"|"DequantizeLinear"|...}``.

    ``tensors``: ``{name: QuantizedTensor}`` in the graph's layout; ``floats``: ``{name: (array,
    config)}`` for tensors on a float configuration. Every initializer becomes a constant.
    """
    graph = proto.graph
    inits = {init.name: init for init in graph.initializer}
    how = {}
    new_inits, front = [], []
    for name, qt in tensors.items():
        consumers = _consumers(graph, name)
        matmul_b = bool(consumers) and all(n.op_type == "MatMul" and i == 1 for n, i in consumers)
        block = _nbits_block(qt) if matmul_b and len(qt.shape) == 2 else None
        signed = qt.fmt.symmetric
        if block is not None:
            arrays, attrs = _matmul_nbits(qt, block)
            new_inits.append(numpy_helper.from_array(arrays["codes"], f"{name}.codes"))
            new_inits.append(numpy_helper.from_array(arrays["scale"], f"{name}.scale"))
            extra = []
            if "zero" in arrays:
                new_inits.append(numpy_helper.from_array(arrays["zero"], f"{name}.zero"))
                extra = [f"{name}.zero"]
            for node, _ in consumers:
                replacement = helper.make_node("MatMulNBits", [node.input[0], f"{name}.codes", f"{name}.scale", *extra],
                                               list(node.output), name=node.name, domain="com.microsoft", **attrs)
                node.CopyFrom(replacement)
            how[name] = f"MatMulNBits ({attrs['bits']}-bit, block {block})"
        else:
            d = _dequantize_linear(qt)
            stored_bits = 4 if qt.fmt.bits <= 4 else 8
            new_inits.append(_int_tensor(f"{name}.codes", d["codes"], signed, stored_bits))
            new_inits.append(numpy_helper.from_array(np.asarray(d["scale"], dtype=np.float32), f"{name}.scale"))
            inputs = [f"{name}.codes", f"{name}.scale"]
            if not signed:
                new_inits.append(_int_tensor(f"{name}.zero", np.asarray(d["zero"]), False, stored_bits))
                inputs.append(f"{name}.zero")
            out = name if d["reshape"] is None else f"{name}.rows"
            front.append(helper.make_node("DequantizeLinear", inputs, [out], name=f"{name}.dequantize", **d["attrs"]))
            if d["reshape"] is not None:
                new_inits.append(numpy_helper.from_array(np.array(d["reshape"], dtype=np.int64), f"{name}.shape"))
                moved = name if d["perm"] is None else f"{name}.moved"
                front.append(helper.make_node("Reshape", [out, f"{name}.shape"], [moved], name=f"{name}.reshape"))
                if d["perm"] is not None:
                    front.append(helper.make_node("Transpose", [moved], [name], name=f"{name}.transpose", perm=d["perm"]))
            how[name] = f"DequantizeLinear ({'int' if signed else 'uint'}{stored_bits})"
        graph.initializer.remove(inits[name])
    for name, (value, config) in floats.items():
        if isinstance(config, Float16):
            dtype = inits[name].data_type
            new_inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float16), f"{name}.fp16"))
            front.append(helper.make_node("Cast", [f"{name}.fp16"], [name], name=f"{name}.cast", to=dtype))
            graph.initializer.remove(inits[name])
            how[name] = "float16"
        else:
            target = numpy_helper.to_array(inits[name]).dtype
            inits[name].CopyFrom(numpy_helper.from_array(np.asarray(value, dtype=target), name))
            how[name] = "float"
    graph.initializer.extend(new_inits)
    nodes = front + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    constants = {init.name for init in graph.initializer}
    kept = [i for i in graph.input if i.name not in constants and i.name not in tensors and i.name not in floats]
    del graph.input[:]
    graph.input.extend(kept)
    if any(n.domain == "com.microsoft" for n in graph.node) and not any(o.domain == "com.microsoft"
                                                                         for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return how


def _to_opset(proto, opset: int = OPSET):
    """``proto`` converted to ``opset`` if it is older (onnx's version converter)."""
    current = max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return version_converter.convert_version(proto, opset) if current < opset else proto


def _summary(how: dict) -> dict:
    """``{how a tensor is stored: number of tensors}``, e.g. ``{"MatMulNBits (4-bit, block 64)": 12}``."""
    return dict(collections.Counter(how.values()))


def _save(proto, path, info: dict | None) -> Path:
    """Write ``proto`` atomically, with ``info`` as JSON in its metadata.

    The graph's ``value_info`` (shapes of intermediate values, optional: onnxruntime infers them)
    is dropped, float and quantized graphs alike.
    """
    del proto.graph.value_info[:]
    if info:
        props = [p for p in proto.metadata_props if p.key != INFO_KEY]
        del proto.metadata_props[:]
        proto.metadata_props.extend(props)
        proto.metadata_props.append(onnx.StringStringEntryProto(key=INFO_KEY, value=json.dumps(info, default=str)))
    return write_atomic(path, lambda tmp: onnx.save(proto, str(tmp)))


def read_info(path) -> dict:
    """The ``info`` a graph was written with (e.g. ``{"model": "pangu_lite"}``); ``{}`` if none."""
    _need_onnx()
    proto = onnx.load(str(path), load_external_data=False)
    for p in proto.metadata_props:
        if p.key == INFO_KEY:
            return json.loads(p.value)
    return {}


def _weights_of(quantized, model=None):
    """``(model, QuantizedWeights or None)`` from a QuantizedModel, QuantizedWeights or a model."""
    if isinstance(quantized, QuantizedModel):
        return (quantized.model if model is None else model), quantized.weights
    if isinstance(quantized, QuantizedWeights):
        return model, quantized
    if quantized is None:
        return model, None
    raise TypeError(f"expected a QuantizedModel (from tqslite.quantize) or QuantizedWeights, got "
                    f"{type(quantized).__name__}.")


# --------------------------------------------------------------------------------------------
# A torch model to a low-bit graph
# --------------------------------------------------------------------------------------------

def _transposed(qt: QuantizedTensor) -> QuantizedTensor:
    """The stored form of ``w.T`` for a 2-D ``w``: the same rows, the channel axis swapped."""
    g = qt.fmt.granularity
    shape = tuple(reversed(qt.shape))
    if isinstance(g, PerTensor):
        codes = qt.codes.reshape(qt.shape).T.reshape(1, -1)
        return QuantizedTensor(codes, qt.scale, qt.zero, qt.fmt, shape, qt.dtype)
    return QuantizedTensor(qt.codes, qt.scale, qt.zero, replace(qt.fmt, granularity=replace(g, axis=1 - g.axis)),
                           shape, qt.dtype)


def _append_window_step(proto, m: int, unsqueeze: bool) -> None:
    """Make a history-window graph ``(B, k, ...) -> next frames`` state to state, as :class:`WindowedSystem`.

    The new output keeps the old name: the window without its oldest ``m`` frames, then the
    prediction (given a frame axis first if ``unsqueeze``).
    """
    graph = proto.graph
    x, y = graph.input[0].name, graph.output[0].name
    pred = f"{y}.frames"
    for node in graph.node:
        node.output[:] = [pred if o == y else o for o in node.output]
    graph.initializer.extend([numpy_helper.from_array(np.array([m], dtype=np.int64), "window.start"),
                              numpy_helper.from_array(np.array([np.iinfo(np.int64).max], dtype=np.int64), "window.end"),
                              numpy_helper.from_array(np.array([1], dtype=np.int64), "window.axis")])
    nodes = [helper.make_node("Slice", [x, "window.start", "window.end", "window.axis"], ["window.kept"],
                              name="window.drop_oldest")]
    if unsqueeze:
        nodes.append(helper.make_node("Unsqueeze", [pred, "window.axis"], [f"{pred}.1"], name="window.frame_axis"))
        pred = f"{pred}.1"
    nodes.append(helper.make_node("Concat", ["window.kept", pred], [y], name="window.append", axis=1))
    graph.node.extend(nodes)
    out = copy.deepcopy(graph.input[0])
    out.name = y
    del graph.output[:]
    graph.output.append(out)


def export_quantized(model, example: torch.Tensor, path, quantized=None, info: dict | None = None) -> Path:
    """Export a torch model and its quantized weights as a low-bit ONNX graph (see the module docstring).

    Parameters
    ----------
    model : nn.Module, TorchSystem, WindowedSystem or QuantizedModel
        The architecture and the values of every tensor not in ``quantized`` (kept in float). A
        :class:`WindowedSystem`'s graph includes its window step: ``(B, k, *F) -> (B, k, *F)``.
        A :class:`~tqslite.plans.QuantizedModel` brings its own weights.
    example : Tensor
        An example state ``(B, *S)``; the batch axis is dynamic in the file.
    path : path-like
        The ``.onnx`` file to write (atomically).
    quantized : QuantizedModel or QuantizedWeights, optional
        The quantized weights (from :func:`tqslite.quantize` on this model, torch layout). None:
        the float graph, written the same way (opset 21, constant initializers) to compare with.
    info : dict, optional
        Stored as JSON in the graph's metadata (:func:`read_info`), e.g. ``{"model": "pangu_lite"}``.

    Returns
    -------
    pathlib.Path
        The file written.
    """
    _need_onnx()
    if isinstance(model, QuantizedModel):
        model, quantized = model.model, (model if quantized is None else quantized)
    model, weights = _weights_of(quantized, model)
    system = as_system(model)
    if not isinstance(system, TorchSystem):
        raise TypeError(f"export_quantized exports torch models; for an ONNX graph use quantize_graph (got "
                        f"{type(system).__name__}).")
    module = system.module
    # Export a copy whose every parameter is distinct noise, so each initializer is found by value
    # (as is, or transposed) even where quantized weights would coincide.
    stamp = copy.deepcopy(module)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in stamp.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # torch's exporter narrating its own work (constant folding, shape checks traced as constants)
        warnings.filterwarnings("ignore", message="Constant folding")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        export_onnx(stamp, example, Path(tmp) / "model.onnx")
        proto = onnx.load(str(Path(tmp) / "model.onnx"))
    if isinstance(system, WindowedSystem):
        with torch.no_grad():
            out = module(example)
        unsqueeze = out.ndim == example.ndim - 1
        _append_window_step(proto, 1 if unsqueeze else out.shape[1], unsqueeze)
    proto = _to_opset(proto)
    inits = {init.name: init for init in proto.graph.initializer}
    stamped = dict(stamp.named_parameters())
    transposed = set()
    for name in system.parameter_names():
        value, ref = numpy_helper.to_array(inits[name]), stamped[name].detach().numpy()
        if value.shape == ref.shape and np.array_equal(value, ref):
            continue
        if ref.ndim == 2 and value.shape == ref.T.shape and np.array_equal(value, ref.T):
            transposed.add(name)
            continue
        raise ValueError(f"the exported graph stores {name!r} in a form tqslite cannot map back to the parameter "
                         f"(shape {value.shape}, parameter {tuple(ref.shape)}).")
    tensors, floats = {}, {}
    configs = weights.configs if weights is not None else {}
    for name in system.parameter_names():
        if weights is not None and name in weights.tensors:
            qt = weights.tensors[name]
            tensors[name] = _transposed(qt) if name in transposed else qt
            continue
        value = weights.floats[name] if weights is not None and name in weights.floats else system.get_parameter(name)
        value = value.detach().cpu().numpy()
        floats[name] = (value.T if name in transposed else value, configs.get(name, KeepFloat()))
    how = _lower(proto, tensors, floats)
    return _save(proto, path, dict(info or {}) | {"stored": _summary(how)})


# --------------------------------------------------------------------------------------------
# An existing graph (the black box)
# --------------------------------------------------------------------------------------------

def quantize_graph(source, quantized, path, quantizer=None, calibration=None, info: dict | None = None) -> Path:
    """Quantize the initializers of an existing ONNX graph and write the low-bit graph.

    Parameters
    ----------
    source : path-like or bytes
        The float ONNX graph (e.g. ``data/checkpoints/pangu_lite.onnx``).
    quantized : Plan, QuantizedModel or QuantizedWeights
        A plan made on this graph's :class:`~tqslite.onnx_system.OnnxSystem` (names are
        initializer names, a ``MatMul`` weight ``(in, out)`` has its channel on axis 1), applied
        here with ``quantizer``; or weights already quantized on that system.
    path : path-like
        The ``.onnx`` file to write (atomically).
    quantizer : Quantizer or str, optional
        For a plan: RTN (default), ``"mse"``, ...
    calibration : Tensor, optional
        For a calibration-based quantizer.
    info : dict, optional
        Stored as JSON in the graph's metadata (:func:`read_info`).

    Returns
    -------
    pathlib.Path
        The file written: opset 21 (converted if older), every initializer a constant.

    Raises
    ------
    ValueError
        If the weights were not made on this graph: a name it lacks, another shape, or a channel
        axis other than the one its consuming node gives (a plan made on the torch model).
    """
    _need_onnx()
    raw = Path(source).read_bytes() if isinstance(source, (str, Path)) else bytes(source)
    system = OnnxSystem(raw)
    if isinstance(quantized, Plan):
        quantized = quantize(system, quantized, quantizer, calibration)
    _, weights = _weights_of(quantized, system)
    names = set(system.parameter_names())
    for name, config in weights.configs.items():
        if name not in names:
            raise ValueError(f"the weights name {name!r}, which is no float initializer of this graph: a plan must be "
                             "made on the system it is applied to (tqslite.onnx_system.OnnxSystem of this file).")
        shape = tuple(system.get_parameter(name).shape)
        qt = weights.tensors.get(name)
        if qt is not None and tuple(qt.shape) != shape:
            raise ValueError(f"{name!r} has shape {tuple(qt.shape)} in the weights and {shape} in the graph: a plan "
                             "must be made on the system it is applied to (the graph's OnnxSystem).")
        axis = getattr(getattr(config, "granularity", None), "axis", None)
        if qt is not None and len(shape) >= 2 and axis is not None and axis != system.channel_axis(name):
            raise ValueError(f"{name!r} was quantized along axis {axis}, but its consuming node makes axis "
                             f"{system.channel_axis(name)} the output channel: a plan must be made on the system it is "
                             "applied to (the graph's OnnxSystem, not the torch model).")
    proto = _to_opset(onnx.load_from_string(raw))
    floats = {n: (v.detach().cpu().numpy(), weights.configs[n]) for n, v in weights.floats.items()}
    how = _lower(proto, dict(weights.tensors), floats)
    return _save(proto, path, dict(info or {}) | {"stored": _summary(how)})


# --------------------------------------------------------------------------------------------
# What a graph holds, and what onnxruntime runs
# --------------------------------------------------------------------------------------------

def onnx_sizes(path) -> dict:
    """Bytes of an ONNX file by role, as stored in it.

    Returns ``{"file": os.path.getsize, "codes": ..., "scales": ..., "zero_points": ...,
    "float": ..., "graph": ...}``: the payload bytes of the integer code initializers
    (``NAME.codes``), of the scales and zero points written by this module, of every other
    initializer (float weights, shape constants), and the rest of the file (nodes, names, types,
    protobuf framing).
    """
    _need_onnx()
    proto = onnx.load(str(path))
    out = collections.Counter(file=os.path.getsize(path))
    for init in proto.graph.initializer:
        n = len(init.raw_data) if init.HasField("raw_data") else numpy_helper.to_array(init).nbytes
        role = ("codes" if init.name.endswith(".codes") else "scales" if init.name.endswith(".scale")
                else "zero_points" if init.name.endswith(".zero") else "float")
        out[role] += n
    out["graph"] = out["file"] - sum(out[k] for k in ("codes", "scales", "zero_points", "float"))
    return {k: int(out[k]) for k in ("file", "codes", "scales", "zero_points", "float", "graph")}


def runtime_ops(path, threads: int = 1) -> dict:
    """``{op type: count}`` of the graph onnxruntime runs after its optimizations (CPU provider).

    ``DequantizeLinear`` nodes left here dequantize at every run; ``MatMulNBits`` reads the codes
    in its kernel.
    """
    _need_onnx()
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = threads
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        proto = onnx.load(opts.optimized_model_filepath)
    return dict(collections.Counter(node.op_type for node in proto.graph.node))


__all__ = ["INFO_KEY", "MAX_BLOCK", "OPSET", "export_quantized", "onnx_sizes", "quantize_graph", "read_info",
           "runtime_ops"]
