"""Low-bit ONNX graphs: onnxruntime's weights equal tqslite's bit for bit, rollouts match torch, the black box."""

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import xarray as xr
from onnx import TensorProto, helper, numpy_helper

import tqslite
from tqslite import Float16, Int, KeepFloat, PerChannel, PerGroup, PerTensor, Plan, RTN, quantize
from tqslite.cli import main
from tqslite.evaluation import forecast
from tqslite.models import load
from tqslite.onnx_quant import export_quantized, onnx_sizes, quantize_graph, read_info, runtime_ops
from tqslite.onnx_system import OnnxSystem
from tqslite.quantizers import QuantizedWeights
from tqslite.systems import rollout
from tqslite.splits import heldout_windows

torch.set_num_threads(1)
PANGU_ONNX = "data/checkpoints/pangu_lite.onnx"


def run(path, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


# --------------------------------------------------------------------------------------------
# One weight, every way it can be stored: what onnxruntime computes is tqslite's weight, exactly
# --------------------------------------------------------------------------------------------

def one_weight_graph(kind: str, w: np.ndarray):
    """A graph ``x -> y`` whose output *is* the weight ``W`` (fed the right ``x``), and that ``x``.

    ``matmul``: ``y = x @ W`` with ``x = I`` (``W`` is ``MatMul``'s ``(K, N)`` operand);
    ``add``: ``y = x + W`` with ``x = 0``; ``convtranspose``: ``W`` ``(C_in, C_out, kh, kw)``
    through a 1x1 transposed convolution of one-hot inputs.
    """
    if kind == "matmul":
        node, x = helper.make_node("MatMul", ["x", "W"], ["y"]), np.eye(w.shape[0], dtype=np.float32)
    elif kind == "add":
        node, x = helper.make_node("Add", ["x", "W"], ["y"]), np.zeros(w.shape, dtype=np.float32)
    else:
        node = helper.make_node("ConvTranspose", ["x", "W"], ["y"])
        x = np.eye(w.shape[0], dtype=np.float32).reshape(w.shape[0], w.shape[0], 1, 1)
    graph = helper.make_graph([node], "one_weight", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(), x


CASES = [  # (kind, shape, configs)
    ("matmul", (64, 48), [Int(b, g, s) for b in (2, 3, 4, 5, 8) for s in (True, False)
                          for g in (PerChannel(), PerGroup(16), PerGroup(32), PerGroup(8), PerTensor())]),
    ("matmul", (4, 24), [Int(2), Int(4, symmetric=False), Int(8), Int(3, PerTensor())]),      # K < 16: padded block
    ("matmul", (112, 8), [Int(4), Int(3, symmetric=False), Int(4, PerGroup(16))]),           # K not a power of two
    ("matmul", (512, 8), [Int(4), Int(2, symmetric=False)]),                                 # K over 256: two blocks
    ("add", (12, 4, 3, 3), [Int(b, g, s) for b in (2, 4, 6) for s in (True, False)
                            for g in (PerChannel(), PerGroup(12), PerGroup(9), PerTensor())]),
    ("add", (64,), [Int(3), Int(4, PerGroup(16)), Int(8, symmetric=False), Int(1, symmetric=False)]),
    ("add", (48, 20), [Int(4, PerGroup(10)), Int(5, PerChannel(), False)]),
    ("convtranspose", (6, 4, 3, 3), [Int(4, PerGroup(18)), Int(3, PerGroup(6), False), Int(8, PerChannel())]),
]
PARAMS = [(kind, shape, c) for kind, shape, configs in CASES for c in configs]


@pytest.mark.parametrize("kind,shape,config", PARAMS,
                         ids=[f"{k}-{'x'.join(map(str, s))}-{c.label}" for k, s, c in PARAMS])
def test_onnxruntime_computes_the_fake_quant_weight_bit_for_bit(kind, shape, config, tmp_path):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal(shape) * rng.uniform(0.1, 2, size=(shape[0],) + (1,) * (len(shape) - 1)))
    w = w.astype(np.float32)
    model, x = one_weight_graph(kind, w)
    system = OnnxSystem(model)
    weights = QuantizedWeights()
    weights.add("W", torch.from_numpy(w), config, system.channel_axis("W"), RTN())
    path = quantize_graph(model, weights, tmp_path / "q.onnx")
    y = run(path, x)
    fake = weights.dequantized()["W"].numpy()
    assert y.shape == fake.shape and np.array_equal(y, fake)
    assert not any(i.name == "W" for i in onnx.load(path).graph.initializer)  # the float weight is gone


def test_matmul_weights_use_the_fused_kernel_and_the_rest_dequantize(tmp_path):
    w = np.random.default_rng(1).standard_normal((64, 32)).astype(np.float32)
    model, x = one_weight_graph("matmul", w)
    for config, op in [(Int(4, PerGroup(32)), "MatMulNBits"), (Int(3), "MatMulNBits"), (Int(8), "MatMulNBits"),
                       (Int(4, PerGroup(8)), "DequantizeLinear")]:
        weights = QuantizedWeights()
        weights.add("W", torch.from_numpy(w), config, 1, RTN())
        ops = runtime_ops(quantize_graph(model, weights, tmp_path / "q.onnx"))
        assert op in ops, (config.label, ops)


# --------------------------------------------------------------------------------------------
# The stand-ins: 20-step rollouts of onnxruntime against torch
# --------------------------------------------------------------------------------------------

def mixed_plan(system, seed=0):
    """Every tensor on a configuration drawn from a wide menu (integer widths, grids, floats)."""
    menu = [Int(2), Int(3, PerGroup(16)), Int(4, PerGroup(32), symmetric=False), Int(5), Int(6, PerTensor()),
            Int(8, symmetric=False), Int(4), Int(3, symmetric=False), Float16(), KeepFloat()]
    rng = np.random.default_rng(seed)
    names = system.parameter_names()
    configs = {n: menu[i] for n, i in zip(names, rng.integers(0, len(menu), len(names)))}
    return Plan(configs, {n: (n,) for n in names}, {n: tuple(system.get_parameter(n).shape) for n in names})


@pytest.mark.parametrize("name", ["pangu_lite", "aurora_lite", "timesfm_lite"])
@pytest.mark.parametrize("plan_kind", ["int4/channel", "int3/group16", "mixed"])
def test_onnxruntime_rollout_matches_the_torch_fake_quant_model(name, plan_kind, tmp_path):
    system, _ = load(name)
    x0 = torch.from_numpy(heldout_windows(name, 4, 20)[0].values)
    plan = mixed_plan(system) if plan_kind == "mixed" else tqslite.uniform_plan(system, plan_kind)
    qm = quantize(system, plan)
    path = export_quantized(qm, x0[:1], tmp_path / "q.onnx", info={"model": name})
    deployed = OnnxSystem(path, swappable=False, threads=1)
    torch_q, onnx_q, float_ = rollout(qm.model, x0, 20), rollout(deployed, x0, 20), rollout(system, x0, 20)
    gap = float((onnx_q - torch_q).abs().max())
    assert gap <= 2e-4 * float(torch_q.abs().max())
    assert gap <= 1e-2 * float((torch_q - float_).abs().max())  # far below what quantization changes
    assert read_info(path)["model"] == name
    assert os.path.getsize(path) < 0.5 * os.path.getsize(export_quantized(system, x0[:1], tmp_path / "f.onnx"))


def test_the_float_export_is_the_float_model(tmp_path):
    system, _ = load("timesfm_lite")
    x0 = torch.from_numpy(heldout_windows("timesfm_lite", 4, 8)[0].values)
    path = export_quantized(system, x0[:1], tmp_path / "f.onnx")
    assert set(runtime_ops(path)).isdisjoint({"MatMulNBits", "DequantizeLinear"})
    gap = float((rollout(OnnxSystem(path), x0, 8) - rollout(system, x0, 8)).abs().max())
    assert gap < 1e-5  # the window step (drop the oldest patch, append the new one) is in the graph


# --------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------

def test_sizes_by_role_add_up_to_the_file_and_three_bits_cost_four(tmp_path):
    system, _ = load("pangu_lite")
    x = torch.from_numpy(heldout_windows("pangu_lite", 1, 1)[0].values)
    paths = {b: export_quantized(quantize(system, tqslite.uniform_plan(system, b)), x, tmp_path / f"{b}.onnx")
             for b in (2, 3, 4)}
    sizes = {b: onnx_sizes(p) for b, p in paths.items()}
    for b, s in sizes.items():
        assert s["file"] == os.path.getsize(paths[b])
        assert s["file"] == s["codes"] + s["scales"] + s["zero_points"] + s["float"] + s["graph"]
        assert s["zero_points"] == 0 and s["float"] == 0  # symmetric, every tensor quantized
    assert sizes[3]["codes"] == sizes[4]["codes"] > sizes[2]["codes"]  # 3-bit codes are stored as 4-bit ones
    n_params = sum(system.get_parameter(n).numel() for n in system.parameter_names())
    assert n_params / 2 <= sizes[4]["codes"] < 1.05 * n_params / 2


# --------------------------------------------------------------------------------------------
# The black box: an existing graph, a plan made on it
# --------------------------------------------------------------------------------------------

def test_the_black_box_graph_quantized_by_a_plan_made_on_it(tmp_path):
    graph = OnnxSystem(PANGU_ONNX)
    x0 = torch.from_numpy(heldout_windows("pangu_lite", 4, 20)[0].values)
    plan = mixed_plan(graph, seed=3)
    path = quantize_graph(PANGU_ONNX, plan, tmp_path / "q.onnx", info={"model": "pangu_lite"})
    assert os.path.getsize(path) < 0.5 * os.path.getsize(PANGU_ONNX)
    fake = tqslite.apply_plan(graph, plan)  # the same plan on the graph's own weights, through the float graph
    deployed = OnnxSystem(path, swappable=False)
    torch_fake, onnx_q = rollout(fake, x0, 20), rollout(deployed, x0, 20)
    gap = float((onnx_q - torch_fake).abs().max())
    assert gap <= 2e-4 * float(torch_fake.abs().max())
    assert gap <= 1e-2 * float((torch_fake - rollout(graph, x0, 20)).abs().max())
    assert "MatMulNBits" in runtime_ops(path)


def test_a_plan_made_on_the_torch_model_is_refused_by_the_graph(tmp_path):
    system, _ = load("pangu_lite")
    plan = tqslite.uniform_plan(system, 4)
    with pytest.raises(ValueError, match="was the plan made for another model"):
        quantize_graph(PANGU_ONNX, plan, tmp_path / "q.onnx")
    # square weights have the same shape in both layouts: the channel axis gives them away
    proj = "blocks.0.attn.proj.weight"
    weights = QuantizedWeights()
    weights.add(proj, system.get_parameter(proj), Int(4), system.channel_axis(proj), RTN())
    with pytest.raises(ValueError, match="quantized along axis 0, but its consuming node makes axis 1"):
        quantize_graph(PANGU_ONNX, weights, tmp_path / "q.onnx")
    assert not (tmp_path / "q.onnx").exists()


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------

def test_cli_quantize_onnx_and_forecast_from_the_graph(tmp_path, capsys):
    plan, ckpt, graph, fc = (tmp_path / n for n in ("plan.json", "q.safetensors", "q.onnx", "fc.nc"))
    assert main(["uniform", "pangu_lite", "--bits", "4", "--group-size", "32", "--out", str(plan)]) == 0
    assert main(["quantize", "pangu_lite", str(plan), "--out", str(ckpt), "--onnx", str(graph)]) == 0
    assert "low-bit ONNX graph written" in capsys.readouterr().out
    assert main(["forecast", str(graph), "--horizon", "3", "--windows", "2", "--out", str(fc)]) == 0
    ds = xr.load_dataset(fc)
    system, _ = load("pangu_lite")
    x0, _ = heldout_windows("pangu_lite", 2, 3)
    ref = forecast(quantize(system, Plan.load(plan)).model, x0, 3)
    assert ds.attrs["runtime"] == "onnxruntime" and ds["forecast"].dims == ref.dims
    assert float(abs(ds["forecast"] - ref).max()) < 1e-4
    assert main(["forecast", str(graph), "--model", "nosuch", "--out", str(fc)]) == 1
    assert "unknown model 'nosuch'" in capsys.readouterr().err


def test_a_deployed_graph_keeps_its_weights_constant(tmp_path):
    deployed = OnnxSystem(PANGU_ONNX, swappable=False)
    swappable = OnnxSystem(PANGU_ONNX)
    x = torch.from_numpy(heldout_windows("pangu_lite", 2, 1)[0].values)
    assert float((deployed.step(x) - swappable.step(x)).abs().max()) < 1e-5
    assert deployed._session.get_overridable_initializers() == []  # noqa: SLF001 - what onnxruntime was given
    with pytest.raises(ValueError, match="runs its graph as deployed"):
        deployed.set_parameter("norm.weight", torch.zeros(64))


def test_why_matmul_weights_are_written_as_matmulnbits(tmp_path):
    """onnxruntime fuses DequantizeLinear -> MatMul into MatMulNBits with accuracy_level 4, which rounds
    the activations to int8 too; the MatMulNBits written here computes in float32. If this test
    fails, onnxruntime changed that default: the module docstring and notebook 13 say otherwise."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    a = rng.standard_normal((64, 64)).astype(np.float32)  # the shape one_weight_graph declares
    weights = QuantizedWeights()
    weights.add("W", torch.from_numpy(w), Int(4), 1, RTN())
    qt = weights.tensors["W"]
    codes = qt.codes.T.numpy()  # rows are output channels: (N, K) -> (K, N)
    scale = qt.scale.numpy().astype(np.float32)
    packed = tqslite.quantization.pack_bits((codes.astype(np.int64) & 0xF).astype(np.uint8), 4)
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "s"], ["W"], axis=1), helper.make_node("MatMul", ["x", "W"], ["y"])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [helper.make_tensor("Wq", TensorProto.INT4, [64, 32], packed, raw=True),
                               numpy_helper.from_array(scale, "s")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(tmp_path / "qdq.onnx"))
    exact = a.astype(np.float64) @ weights.dequantized()["W"].numpy().astype(np.float64)
    fused_error = np.abs(run(tmp_path / "qdq.onnx", a) - exact).max() / np.abs(exact).max()
    model, _ = one_weight_graph("matmul", w)
    ours = quantize_graph(model, weights, tmp_path / "ours.onnx")
    our_error = np.abs(run(ours, a) - exact).max() / np.abs(exact).max()
    assert "MatMulNBits" in runtime_ops(tmp_path / "qdq.onnx")  # onnxruntime fused it by itself
    print(f"relative error: fused by onnxruntime {fused_error:.2e}, MatMulNBits written here {our_error:.2e}")
    assert our_error < 1e-6 < 1e-3 < fused_error
