"""A black-box system: an ONNX graph run by onnxruntime, whose weights the probe swaps by name.

The TQS probe needs only forward passes and a way to replace named weight tensors, so it can
score a model it has no code for. :class:`OnnxSystem` provides exactly that for an ONNX file:

* its **parameters** are the graph's float initializers with at least one element (integer
  shape constants are skipped), named as in the file;
* swapping a weight costs nothing: every initializer is also a graph input (an *overridable
  initializer* in onnxruntime's terms), so the current values are simply fed to
  ``InferenceSession.run`` with the state -- no session is rebuilt. Initializers that are not
  graph inputs in the file are made so in memory when the file is loaded;
* the **output-channel axis** of each initializer (what per-channel RTN scales along) is read
  from the node that consumes it: ``Conv`` weights and ``Gemm`` weights with ``transB=1`` use
  axis 0, a ``MatMul`` right operand of shape ``(in, out)`` and a ``Gemm`` weight with
  ``transB=0`` use their last axis, a ``ConvTranspose`` weight ``(in, out / groups, ...)``
  uses axis 1; anything else (biases, norm gains) uses axis 0;
* :func:`copy.deepcopy` (used by :func:`tqslite.apply_plan`) copies the weight values and
  shares the session, so a quantized copy is cheap; :meth:`OnnxSystem.save` writes the current
  weights to a new ONNX file.

:func:`export_onnx` exports a torch model so that its initializers keep the torch parameter
names: torch's TorchScript-based exporter (``dynamo=False``, opset 17) stores the weight of a
``Linear`` applied to 3-D tokens transposed, as an anonymous ``onnx::MatMul_123`` initializer;
these are renamed after export by matching their values to the transposed torch weights, so
that ``blocks.0.attn.qkv.weight`` exists in the graph and block units
(:func:`tqslite.units.block_label`) work on the black box as on the torch model.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from pathlib import Path

import numpy as np
import torch

try:  # optional dependencies: a clear message at use, not at import of tqslite
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper
except ImportError as err:  # pragma: no cover - exercised only without the packages
    onnx = ort = numpy_helper = None
    _IMPORT_ERROR = err
else:
    _IMPORT_ERROR = None

#: Opset used by :func:`export_onnx`.
OPSET = 17


def _need_onnx():
    if _IMPORT_ERROR is not None:
        raise ImportError(f"the ONNX path needs the packages onnx and onnxruntime ({_IMPORT_ERROR}); "
                          "install them with `pip install onnx onnxruntime`.")


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------

def _rename_initializers(proto, state: dict[str, np.ndarray]) -> dict[str, str]:
    """Give anonymous initializers the name of the torch parameter they hold (as is or transposed).

    Returns ``{old name: new name}``. An initializer that matches no parameter keeps its name;
    one that matches two parameters is an error (the correspondence would be a guess).
    """
    graph = proto.graph
    taken = {init.name for init in graph.initializer}
    renames = {}
    for init in graph.initializer:
        if init.name in state:
            continue
        value = numpy_helper.to_array(init)
        matches = [n for n, p in state.items() if n not in taken and
                   ((p.shape == value.shape and np.array_equal(p, value)) or
                    (p.ndim == 2 and p.T.shape == value.shape and np.array_equal(p.T, value)))]
        if len(matches) > 1:
            raise ValueError(f"initializer {init.name!r} matches several parameters {matches}; cannot name it.")
        if matches:
            renames[init.name] = matches[0]
            taken.add(matches[0])
    if not renames:
        return renames
    for init in graph.initializer:
        init.name = renames.get(init.name, init.name)
    for inp in graph.input:
        inp.name = renames.get(inp.name, inp.name)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    return renames


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path, opset: int = OPSET) -> Path:
    """Export ``model`` (a state-to-state map) to an ONNX file whose weights keep torch's names.

    Parameters
    ----------
    model : nn.Module
        Maps ``(B, *S)`` to ``(B, *S)``; it is exported in eval mode and left as it was.
    example : Tensor
        An example batch ``(B, *S)``; the batch axis is dynamic in the file.
    path : path-like
        Where to write the ``.onnx`` file.
    opset : int
        ONNX opset (default 17).

    Returns
    -------
    pathlib.Path
        The file written: input ``x``, output ``y``, initializers also listed as graph inputs.
    """
    _need_onnx()
    was_training = model.training
    model.eval()
    buf = io.BytesIO()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # the TorchScript-based exporter is chosen on purpose (it needs no onnxscript); its
            # deprecation notices are not news to the caller
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(model, (example,), buf, dynamo=False, opset_version=opset, input_names=["x"],
                              output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
                              keep_initializers_as_inputs=True, do_constant_folding=True)
    finally:
        model.train(was_training)
    proto = onnx.load_from_string(buf.getvalue())
    state = {n: p.detach().cpu().numpy() for n, p in model.named_parameters()}
    _rename_initializers(proto, state)
    names = {init.name for init in proto.graph.initializer}
    missing = [n for n in state if n not in names]
    if missing:
        raise ValueError(f"after export, parameters {missing} have no initializer of their name in the graph.")
    onnx.checker.check_model(proto)
    path = Path(path)
    onnx.save(proto, str(path))
    return path


# --------------------------------------------------------------------------------------------
# The system
# --------------------------------------------------------------------------------------------

_FLOAT_TYPES = {1: np.float32, 10: np.float16, 11: np.float64}  # onnx.TensorProto FLOAT, FLOAT16, DOUBLE


def _axis_from_consumer(graph, name: str, ndim: int) -> int:
    """The output-channel axis of initializer ``name``, read from the first node that consumes it."""
    if ndim <= 1:
        return 0
    for node in graph.node:
        if name not in node.input:
            continue
        pos = list(node.input).index(name)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "MatMul":
            return ndim - 1 if pos == 1 else ndim - 2
        if node.op_type == "Gemm" and pos == 1:
            return 0 if attrs.get("transB", 0) else 1
        if node.op_type == "ConvTranspose" and pos == 1:
            return 1
        return 0
    return 0


class OnnxSystem:
    """An ONNX model as a system: ``step`` runs onnxruntime, parameters are its initializers.

    Parameters
    ----------
    model : path-like or bytes
        An ONNX file (or its bytes) mapping one input ``(B, *S)`` to one output of the same shape.
    providers : sequence of str
        onnxruntime execution providers (default CPU).
    threads : int, optional
        onnxruntime intra-op threads (default: onnxruntime's choice).
    swappable : bool
        True (default): every initializer is fed with the state, so weights can be swapped.
        False: the graph runs as deployed, its initializers constants (none a graph input), so
        onnxruntime can fold and pre-pack them; :meth:`set_parameter` then refuses.

    Notes
    -----
    The weights are held as numpy arrays and fed to every ``session.run`` together with the
    state, so :meth:`set_parameter` takes effect at the next :meth:`step` without rebuilding
    the session. No torch code of the model is involved.
    """

    def __init__(self, model, providers=("CPUExecutionProvider",), threads: int | None = None,
                 swappable: bool = True):
        _need_onnx()
        raw = Path(model).read_bytes() if isinstance(model, (str, Path)) else bytes(model)
        proto = onnx.load_from_string(raw)
        graph = proto.graph
        inputs = {i.name for i in graph.input}
        inits = {init.name: init for init in graph.initializer}
        self.swappable = bool(swappable)
        if not self.swappable:  # every initializer a constant
            kept = [i for i in graph.input if i.name not in inits]
            del graph.input[:]
            graph.input.extend(kept)
        for name, init in inits.items():  # make every initializer overridable
            if self.swappable and name not in inputs:
                graph.input.append(onnx.helper.make_tensor_value_info(name, init.data_type, list(init.dims)))
        data_inputs = [i for i in graph.input if i.name not in inits]
        if len(data_inputs) != 1 or len(graph.output) != 1:
            raise ValueError(f"an OnnxSystem needs one state input and one output; this graph has inputs "
                             f"{[i.name for i in data_inputs]} and outputs {[o.name for o in graph.output]}.")
        self.input_name, self.output_name = data_inputs[0].name, graph.output[0].name
        elem = data_inputs[0].type.tensor_type.elem_type
        if elem not in _FLOAT_TYPES:
            raise ValueError(f"the state input {self.input_name!r} has ONNX element type {elem}; a float type is needed.")
        self._np_dtype = _FLOAT_TYPES[elem]
        self._proto = proto
        self._values: dict[str, np.ndarray] = {}
        self._axes: dict[str, int] = {}
        for name, init in inits.items():
            if init.data_type in _FLOAT_TYPES and int(np.prod(init.dims)) > 0:
                value = numpy_helper.to_array(init)
                self._values[name] = np.array(value, order="C", copy=True)  # writable, owned
                self._axes[name] = _axis_from_consumer(graph, name, value.ndim)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # initializers-as-inputs warnings are expected here
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
        self._session = ort.InferenceSession(proto.SerializeToString(), sess_options=opts, providers=list(providers))
        overridable = {i.name for i in self._session.get_overridable_initializers()} if self.swappable else set()
        self._fed = [n for n in self._values if n in overridable]  # what session.run receives besides the state

    # -- the system protocol -------------------------------------------------------------------

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """One step ``(B, *S) -> (B, *S)`` through onnxruntime, with the current weights."""
        feeds = {self.input_name: np.ascontiguousarray(x.detach().cpu().numpy(), dtype=self._np_dtype)}
        feeds.update((n, self._values[n]) for n in self._fed)
        return torch.from_numpy(self._session.run([self.output_name], feeds)[0])

    def parameter_names(self) -> list[str]:
        """Names of the float initializers with at least one element, in graph order."""
        return list(self._values)

    def get_parameter(self, name: str) -> torch.Tensor:
        """The current value of initializer ``name`` (shares memory: change it with :meth:`set_parameter`)."""
        return torch.from_numpy(self._values[self._check(name)])

    def set_parameter(self, name: str, value) -> None:
        """Replace initializer ``name`` by ``value`` (same shape; cast to its dtype, copied)."""
        if not self.swappable:
            raise ValueError(f"this OnnxSystem runs its graph as deployed (swappable=False): its weights are constants; "
                             f"open the file with OnnxSystem(path) to swap {name!r}.")
        old = self._values[self._check(name)]
        new = value.detach().cpu().numpy() if torch.is_tensor(value) else np.asarray(value)
        if new.shape != old.shape:
            raise ValueError(f"{name}: shape {new.shape} does not match the initializer's {old.shape}.")
        self._values[name] = np.array(new, dtype=old.dtype, order="C", copy=True)

    def channel_axis(self, name: str) -> int:
        """The output-channel axis of initializer ``name``, read from its consuming node."""
        return self._axes[self._check(name)]

    @contextlib.contextmanager
    def evaluating(self):
        """A no-op: an ONNX graph has no training mode."""
        yield self

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the state (and of the rollouts)."""
        return torch.from_numpy(np.zeros(0, dtype=self._np_dtype)).dtype

    # -- copies and files ------------------------------------------------------------------------

    def __deepcopy__(self, memo):
        """A copy with its own weight values; the (immutable) session and graph are shared."""
        new = copy.copy(self)
        new._values = {n: v.copy() for n, v in self._values.items()}
        memo[id(self)] = new
        return new

    def save(self, path) -> Path:
        """Write the graph with the current weights (e.g. a quantized copy's) to ``path``."""
        proto = copy.deepcopy(self._proto)
        for init in proto.graph.initializer:
            if init.name in self._values:
                init.CopyFrom(numpy_helper.from_array(self._values[init.name], init.name))
        path = Path(path)
        onnx.save(proto, str(path))
        return path

    def _check(self, name: str) -> str:
        if name not in self._values:
            raise KeyError(f"{name!r} is not a float initializer of this graph; it has e.g. {list(self._values)[:5]}.")
        return name

    def __repr__(self) -> str:
        return f"OnnxSystem({len(self._values)} initializers, input {self.input_name!r}, output {self.output_name!r})"
