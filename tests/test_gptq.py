"""GPTQ (tqslite.gptq): properties that break if the algorithm, the grid or the sequential pass is wrong."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tqslite.gptq as G
from tqslite.config import Float16, Int, KeepFloat, PerChannel, PerGroup, PerTensor
from tqslite.gptq import GPTQ, Hessian
from tqslite.quantization import fp16_ceil, grid_params, round_to_grid, rtn_codes, to_rows


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def correlated(n, k, seed=0):
    """``n`` input rows of width ``k`` with correlated features of very different scales."""
    mix = randn(k, k, seed=seed + 1, dtype=torch.float64) / k**0.5
    return (randn(n, k, seed=seed, dtype=torch.float64) * torch.logspace(0, -2, k, dtype=torch.float64)) @ mix


def hessian_of(layer, *batches):
    h = Hessian(layer)
    for x in batches:
        h.add_batch(x)
    return h


def same_tensor(a, b):
    return torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)


def reference_gptq(w, H, fmt, damp=0.01, act_order=False):
    """GPTQ as in the paper, one column at a time, every update applied at once (float64).

    Per-channel scales from the original weights; no blocks, no dead columns, one Hessian.
    """
    W, H = w.double().clone(), H.double().clone()
    scale, zero = grid_params(W, fmt)
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else torch.arange(W.shape[1])
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.diag(H).mean() * torch.eye(len(H), dtype=H.dtype)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    codes = torch.zeros_like(W, dtype=torch.float32)
    for j in range(W.shape[1]):
        codes[:, j] = round_to_grid(W[:, j].float()[:, None], scale, zero, fmt)[:, 0]
        q = ((codes[:, j:j + 1] - zero) * scale)[:, 0].double()
        W[:, j:] -= ((W[:, j] - q) / U[j, j])[:, None] * U[j, j:][None, :]
    return codes[:, torch.argsort(perm)]


# --------------------------------------------------------------------------------------------
# One weight matrix
# --------------------------------------------------------------------------------------------

GRIDS = {"tensor": (PerTensor(), True), "channel": (PerChannel(0), True), "group8-static": (PerGroup(8, 0), True),
         "group8-dynamic": (PerGroup(8, 0), False)}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [True, False], ids=["act_order", "in_order"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("shape,groups", [((16, 64), 1), ((8, 4, 2, 4), 1), ((8, 4, 2, 4), 4)],
                         ids=["linear", "conv", "grouped-conv"])
def test_identity_hessian_gives_rtn_bit_for_bit(shape, groups, grid, symmetric, act_order, bits):
    gran, static = GRIDS[grid]
    fmt = Int(bits, gran, symmetric)
    w = randn(*shape, seed=bits)
    k = w[0].numel()
    q = GPTQ(act_order=act_order, static_groups=static).quantize(w, fmt, torch.eye(k).expand(groups, k, k))
    r = rtn_codes(w, fmt)
    assert same_tensor(q, r)
    assert q.shape == r.shape and q.codes.shape == to_rows(w, fmt).shape


def test_identity_hessian_rounds_half_steps_like_rtn():
    # float64 weights a hair above a half step: RTN rounds them in float32, where they are ties
    fmt = Int(4, PerChannel(0))
    g = torch.Generator().manual_seed(7)
    w = torch.empty(64, 64, dtype=torch.float64)
    w[:, 0] = 7.7
    scale, zero = grid_params(w[:, :1], fmt)
    w[:, 1:] = (torch.randint(-7, 7, (64, 63), generator=g) + 0.5) * scale.double() * (1 + 1e-12)
    in_float64 = round_to_grid(w, scale.double(), zero.double(), fmt).float()
    assert not torch.equal(in_float64, rtn_codes(w, fmt).codes.float())  # the two roundings differ here
    assert same_tensor(GPTQ().quantize(w, fmt, torch.eye(64)), rtn_codes(w, fmt))


@pytest.mark.parametrize("act_order", [True, False], ids=["act_order", "in_order"])
@pytest.mark.parametrize("bits", [2, 4])
def test_matches_the_textbook_column_loop(bits, act_order):
    # lazy block updates, Cholesky of the inverse and act-order give the paper's algorithm exactly
    w = randn(12, 40, seed=3)
    lin = nn.Linear(40, 12)
    H = hessian_of(lin, correlated(500, 40)).H[0]
    fmt = Int(bits, PerChannel(0))
    q = GPTQ(block_size=16, act_order=act_order).quantize(w, fmt, H)
    assert torch.equal(q.codes.float(), reference_gptq(w, H, fmt, act_order=act_order))


@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
@pytest.mark.parametrize("act_order", [True, False], ids=["act_order", "in_order"])
def test_block_size_changes_nothing(act_order, static):
    # groups of 8 cross blocks of 5 and 12: a group's scales must come from the up-to-date values
    w = randn(10, 48, seed=4)
    H = hessian_of(nn.Linear(48, 10), correlated(400, 48, seed=2)).H
    fmt = Int(3, PerGroup(8, 0), symmetric=False)
    one = GPTQ(block_size=1, act_order=act_order, static_groups=static).quantize(w, fmt, H)
    for b in (5, 12, 128):
        assert same_tensor(GPTQ(block_size=b, act_order=act_order, static_groups=static).quantize(w, fmt, H), one)


def test_dynamic_groups_take_scales_from_the_updated_weights():
    w = randn(10, 48, seed=4)
    H = hessian_of(nn.Linear(48, 10), correlated(400, 48, seed=2)).H
    fmt = Int(3, PerGroup(8, 0))
    static = GPTQ(static_groups=True).quantize(w, fmt, H)
    dynamic = GPTQ(static_groups=False).quantize(w, fmt, H)
    assert torch.equal(static.scale, rtn_codes(w, fmt).scale)
    assert not torch.equal(dynamic.scale, static.scale)


def test_dead_inputs_get_zero_weights_and_do_not_break_the_solve():
    x = correlated(300, 24)
    x[:, [3, 17]] = 0.0
    w = randn(6, 24, seed=5)
    q = GPTQ().quantize(w, Int(3, PerChannel(0)), hessian_of(nn.Linear(24, 6), x))
    assert torch.all(q.dequantize()[:, [3, 17]] == 0)
    assert torch.isfinite(q.dequantize()).all()


# --------------------------------------------------------------------------------------------
# The Hessian
# --------------------------------------------------------------------------------------------

CONVS = {
    "conv2d": lambda: nn.Conv2d(4, 6, 3),
    "conv2d-stride-dilation-padding": lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), dilation=(1, 2), padding=(1, 2)),
    "conv2d-grouped": lambda: nn.Conv2d(6, 9, 3, groups=3, padding=1),
    "conv2d-depthwise": lambda: nn.Conv2d(6, 6, 5, groups=6),
    "conv2d-circular": lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular"),
    "conv2d-same": lambda: nn.Conv2d(4, 6, 4, padding="same"),
    "conv1d": lambda: nn.Conv1d(4, 6, 3, stride=2, dilation=2, padding=2),
    "conv1d-grouped-reflect": lambda: nn.Conv1d(4, 8, 3, groups=2, padding=1, padding_mode="reflect"),
}


def _input_for(layer, n, seed=0):
    if isinstance(layer, nn.Linear):
        return randn(n, 7, layer.in_features, seed=seed)
    if isinstance(layer, nn.Conv1d):
        return randn(n, layer.in_channels, 15, seed=seed)
    return randn(n, layer.in_channels, 9, 11, seed=seed)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("make", [lambda: nn.Linear(12, 5)] + list(CONVS.values()), ids=["linear"] + list(CONVS))
def test_hessian_gives_the_layers_output_norm(make):
    # ||delta X||_F from the Hessian is the norm of the layer's output with weights delta (no bias):
    # the im2col columns follow the layer's stride, padding, dilation, groups and weight layout
    torch.manual_seed(0)
    layer = make()
    x = _input_for(layer, 6)
    h = hessian_of(layer, x)
    delta = randn(*layer.weight.shape, seed=1)
    y = F.linear(x, delta) if isinstance(layer, nn.Linear) else layer._conv_forward(x, delta, None)
    assert h.error(delta) == pytest.approx(float(y.double().norm()), rel=1e-5)


@pytest.mark.parametrize("make", [lambda: nn.Linear(12, 5)] + list(CONVS.values()), ids=["linear"] + list(CONVS))
def test_streaming_the_hessian_equals_one_batch(make):
    torch.manual_seed(0)
    layer = make()
    x = _input_for(layer, 16)
    whole = hessian_of(layer, x)
    parts = hessian_of(layer, x[:3], x[3:8], x[8:])
    assert parts.n == whole.n
    assert torch.allclose(parts.H, whole.H, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------------------
# Every layer of the stand-ins
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stand_ins():
    """``{name: (module, calibration states)}``: a few training states of each shipped model."""
    from tqslite.models import load, module_of
    from tqslite.splits import prepare
    out = {}
    grid_train = None
    for name in ("pangu_lite", "aurora_lite", "timesfm_lite"):
        system, _ = load(name)
        rng = np.random.default_rng(0)
        if module_of(name).LAYOUT == "grid":
            grid_train = grid_train if grid_train is not None else torch.from_numpy(prepare(name).train)
            out[name] = system.module, grid_train[np.sort(rng.choice(len(grid_train) - 1, 8, replace=False))]
        else:
            train = torch.from_numpy(prepare(name).train)
            ctx = module_of(name).ARCH["context"]
            out[name] = system.module, train[np.sort(rng.choice(len(train), 64, replace=False)), :ctx]
    return out


def layer_hessians(module, x):
    """``{name: Hessian}`` of every GPTQ layer of ``module`` on the float inputs it gets from ``x``."""
    hs = {name: Hessian(m) for name, m in module.named_modules() if isinstance(m, G.LAYERS)}
    hooks = [module.get_submodule(n).register_forward_pre_hook(lambda m, a, h=h: h.add_batch(a[0]))
             for n, h in hs.items()]
    with torch.no_grad():
        module(x)
    for hook in hooks:
        hook.remove()
    return hs


@pytest.mark.parametrize("name", ["pangu_lite", "aurora_lite", "timesfm_lite"])
def test_gptq_output_error_is_at_most_rtns_on_every_layer_of_the_stand_ins(stand_ins, name):
    module, x = stand_ins[name]
    worse = []
    for layer, h in layer_hessians(module, x).items():
        w = module.get_submodule(layer).weight.detach()
        for bits in (2, 3, 4):
            for gran in (PerChannel(), PerGroup(32)):
                fmt = Int(bits, gran).resolve(w.shape, 0)
                e_gptq = h.error(w - GPTQ().quantize(w, fmt, h).dequantize())
                e_rtn = h.error(w - rtn_codes(w, fmt).dequantize())
                if not e_gptq <= e_rtn:
                    worse.append((layer, fmt.label, e_gptq / e_rtn))
    assert not worse, worse


def test_the_stand_ins_are_calibrated_in_one_traced_pass(stand_ins):
    for name, (module, x) in stand_ins.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback to hooks
            qw = GPTQ().quantize_weights(module, {n: Int(3) for n, _ in module.named_parameters()}, x)
        for n, p in module.named_parameters():
            is_layer_weight = n.endswith(".weight") and isinstance(module.get_submodule(n[:-7]), G.LAYERS)
            assert (qw.methods[n] == "gptq") == is_layer_weight, (name, n, qw.methods[n])


@pytest.mark.parametrize("name", ["pangu_lite", "timesfm_lite"])
def test_traced_pass_and_hooks_give_the_same_result_on_a_stand_in(stand_ins, monkeypatch, name):
    module, x = stand_ins[name]
    configs = {n: Int(3, PerGroup(32)) for n, _ in module.named_parameters()}
    q = GPTQ(batch_size=3).quantize_weights(module, configs, x[:8])  # 3 batches, the last smaller
    monkeypatch.setattr(G, "_trace", lambda *a: (_ for _ in ()).throw(G._Untraceable("forced")))
    with pytest.warns(UserWarning, match="forced"):
        hooked = GPTQ(batch_size=3).quantize_weights(module, configs, x[:8])
    assert q.methods == hooked.methods
    for n, t in q.tensors.items():
        assert same_tensor(t, hooked.tensors[n]), n


# --------------------------------------------------------------------------------------------
# The sequential pass on small models
# --------------------------------------------------------------------------------------------

class Reversed(nn.Module):
    """Two layers defined in the opposite order of execution."""

    def __init__(self, branchy=False):
        super().__init__()
        torch.manual_seed(0)
        self.second = nn.Linear(16, 6)
        self.first = nn.Linear(8, 16)
        self.branchy = branchy

    def forward(self, x):
        y = self.first(x)
        if self.branchy and x.sum() > 0:  # a branch on the data: no trace reproduces it on every batch
            y = -y
        return self.second(torch.tanh(y))


def calibration(n=48, k=8, seed=0):
    x = correlated(n, k, seed).float().abs()
    x[: n // 2] *= -1  # the first batches sum to < 0, the last ones to > 0
    return x


def sequential_reference(model, x, configs, gptq, batch_size):
    """Hand-made sequential GPTQ of ``Reversed``: ``first`` on the float inputs, then ``second``."""
    w1 = model.first.weight.detach()
    if isinstance(configs["first.weight"], Int):
        fmt = configs["first.weight"].resolve(w1.shape, 0)
        w1 = gptq.quantize(w1, fmt, hessian_of(model.first, *x.split(batch_size))).dequantize()
    else:
        w1 = w1.half().float()
    b1 = model.first.bias.detach()
    if isinstance(configs.get("first.bias"), Int):  # RTN, before any layer is calibrated
        b1 = rtn_codes(b1, configs["first.bias"].resolve(b1.shape, 0)).dequantize()
    elif isinstance(configs.get("first.bias"), Float16):
        b1 = b1.half().float()
    ys = []
    for b in x.split(batch_size):
        y = F.linear(b, w1, b1)
        ys.append(torch.tanh(-y if model.branchy and b.sum() > 0 else y))
    w2 = model.second.weight.detach()
    fmt2 = configs["second.weight"].resolve(w2.shape, 0)
    return w1, gptq.quantize(w2, fmt2, hessian_of(model.second, *ys)), ys


@pytest.mark.parametrize("first", [Int(2, PerChannel()), Float16()], ids=["first-int2", "first-fp16"])
@pytest.mark.parametrize("path", ["traced", "hooks"])
def test_layers_are_calibrated_in_execution_order(path, first, monkeypatch):
    model, x = Reversed(), calibration()
    if isinstance(first, Float16):  # weights where float16 is coarse (subnormal), so that `second` can tell
        with torch.no_grad():
            model.first.weight.mul_(1e-6)
            model.first.bias.mul_(1e-6)
    configs = {"second.weight": Int(3, PerGroup(8)), "first.weight": first,
               "first.bias": Int(4) if isinstance(first, Int) else first}
    if path == "hooks":
        monkeypatch.setattr(G, "_trace", lambda *a: (_ for _ in ()).throw(G._Untraceable("forced")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qw = GPTQ(batch_size=20).quantize_weights(model, configs, x)
    w1, q2, _ = sequential_reference(model, x, configs, GPTQ(), 20)
    assert torch.equal(qw.dequantized()["first.weight"], w1)
    assert same_tensor(qw.tensors["second.weight"], q2)
    # and the test can tell: calibrated on the float model's inputs, `second` comes out differently
    on_float = GPTQ().quantize(model.second.weight, configs["second.weight"].resolve((6, 16), 0),
                               hessian_of(model.second, torch.tanh(model.first(x)).detach()))
    assert not torch.equal(on_float.codes, q2.codes)


def test_untraceable_models_are_calibrated_with_hooks_and_say_so():
    model, x = Reversed(branchy=True), calibration()
    configs = {"second.weight": Int(3), "first.weight": Int(3)}
    with pytest.warns(UserWarning, match="does not reproduce the module on calibration batch"):
        qw = GPTQ(batch_size=16).quantize_weights(model, configs, x)
    _, q2, _ = sequential_reference(model, x, configs, GPTQ(), 16)
    assert same_tensor(qw.tensors["second.weight"], q2)

    class NoTrace(Reversed):
        def forward(self, x):
            return self.second(torch.tanh(self.first(torch.from_numpy(x.numpy()))))

    with pytest.warns(UserWarning, match="tracing failed"):
        qw = GPTQ().quantize_weights(NoTrace(), configs, x)
    assert set(qw.methods.values()) == {"gptq"}


class Twice(nn.Module):
    def __init__(self, chained):
        super().__init__()
        torch.manual_seed(1)
        self.pre, self.fc, self.chained = nn.Linear(8, 8), nn.Linear(8, 8), chained

    def forward(self, x):
        a = torch.tanh(self.pre(x))
        return self.fc(self.fc(a)) if self.chained else self.fc(a) + self.fc(x)


def test_a_layer_called_twice_is_calibrated_on_both_calls():
    model, x = Twice(chained=False), calibration()
    qw = GPTQ().quantize_weights(model, {"pre.weight": Int(3), "fc.weight": Int(3)}, x)
    pre = qw.dequantized()["pre.weight"]
    a = [torch.tanh(F.linear(b, pre, model.pre.bias)) for b in x.split(32)]
    expected = GPTQ().quantize(model.fc.weight, Int(3).resolve((8, 8), 0), hessian_of(model.fc, *a, *x.split(32)))
    assert same_tensor(qw.tensors["fc.weight"], expected)


@pytest.mark.parametrize("path,chained", [("traced", True), ("hooks", True), ("hooks", False)],
                         ids=["traced-chained", "hooks-chained", "hooks-parallel"])
def test_a_layer_called_twice_that_cannot_be_calibrated_falls_back_to_rtn(path, chained, monkeypatch):
    if path == "hooks":
        monkeypatch.setattr(G, "_trace", lambda *a: (_ for _ in ()).throw(G._Untraceable("forced")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qw = GPTQ().quantize_weights(Twice(chained), {"fc.weight": Int(3)}, calibration())
    assert "called 2 times" in qw.fallbacks["fc.weight"]
    assert same_tensor(qw.tensors["fc.weight"], rtn_codes(Twice(chained).fc.weight, Int(3).resolve((8, 8), 0)))


class Tied(nn.Module):
    def __init__(self, tied):
        super().__init__()
        torch.manual_seed(3)
        self.fc, self.head, self.tied = nn.Linear(8, 8), nn.Linear(8, 8), tied

    def forward(self, x):
        h = torch.tanh(self.fc(x.to(self.fc.weight.dtype)))  # asking for the dtype is not a use
        return F.linear(h, self.fc.weight) if self.tied else self.head(h)  # computing with it is


@pytest.mark.parametrize("tied", [False, True], ids=["inspected", "tied"])
def test_a_weight_computed_with_outside_its_layer_falls_back_to_rtn(tied):
    qw = GPTQ().quantize_weights(Tied(tied), {"fc.weight": Int(3)}, calibration())
    assert qw.fallbacks == ({"fc.weight": "weight also used outside its layer"} if tied else {})


# --------------------------------------------------------------------------------------------
# Mixed plans, fallbacks, the caller's model
# --------------------------------------------------------------------------------------------

class Mixed(nn.Module):
    """Every kind of tensor: layers GPTQ calibrates and the others."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pos_embed = nn.Parameter(0.1 * torch.randn(1, 8, 4, 4))
        self.deconv = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.norm = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 32)
        self.fc2 = nn.Linear(32, 8)
        self.emb = nn.Embedding(5, 8)

    def forward(self, x):
        z = self.dw(torch.relu(self.conv(x))) + self.pos_embed
        z = self.deconv(z).permute(0, 2, 3, 1)                      # (B, 8, 8, 8) channels last
        z = z + self.emb(torch.arange(8, device=x.device) % 5)[:, None, :]
        return self.fc2(torch.relu(self.fc1(self.norm(z))))


PLAN = {"conv.weight": Int(2, PerChannel()), "conv.bias": Int(8), "dw.weight": Int(4, PerTensor(), symmetric=False),
        "pos_embed": Int(4, PerGroup(8)), "deconv.weight": Int(3, PerGroup(4)), "deconv.bias": Float16(),
        "norm.weight": Int(8, symmetric=False), "norm.bias": Int(6), "fc1.weight": Int(3, PerGroup(4), symmetric=False),
        "fc1.bias": KeepFloat(), "fc2.weight": Float16(), "fc2.bias": Int(5, PerTensor()), "emb.weight": Int(2)}


def test_a_mixed_plan_gives_every_tensor_exactly_its_grid():
    model, x = Mixed(), randn(12, 3, 4, 4, seed=3)
    qw = GPTQ(batch_size=5).quantize_weights(model, PLAN, x)
    system = G.TorchSystem(model)
    assert list(qw.configs) == list(PLAN)
    for name, config in PLAN.items():
        w = model.get_parameter(name).detach()
        if not isinstance(config, Int):
            assert qw.configs[name] == config
            assert torch.equal(qw.floats[name], w.half().float() if config.bits == 16 else w)
            continue
        fmt = config.resolve(w.shape, system.channel_axis(name))
        assert qw.configs[name] == fmt
        deq = qw.dequantized()[name]
        rows, t = to_rows(deq, fmt), qw.tensors[name]
        assert t.fmt == fmt and t.shape == tuple(w.shape) and len(t.scale) == fmt.n_scales(w.shape)
        scale = t.scale.float()[:, None]
        assert torch.equal(fp16_ceil(scale), scale)
        codes = rows / scale + t.zero.float()[:, None]
        assert torch.allclose(codes, codes.round(), atol=1e-4), name
        codes = codes.round()
        assert codes.min() >= fmt.qmin and codes.max() <= fmt.qmax, name
        assert max(len(r.unique()) for r in codes) <= 2**fmt.bits
    assert {n for n, m in qw.methods.items() if m == "gptq"} == {"conv.weight", "dw.weight", "fc1.weight"}


def test_every_fallback_is_reported_by_name_and_the_callers_model_is_unchanged():
    model, x = Mixed(), randn(6, 3, 4, 4, seed=3)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    configs = {n: Int(4) for n, _ in model.named_parameters()} | {"fc2.weight": Int(4, PerChannel(1))}
    qw = GPTQ().quantize_weights(model, configs, x)
    expected = {"conv.bias": "bias", "dw.bias": "bias", "pos_embed": "pos_embed", "deconv.weight": "ConvTranspose2d",
                "deconv.bias": "ConvTranspose2d", "norm.weight": "LayerNorm", "norm.bias": "LayerNorm",
                "fc1.bias": "bias", "fc2.weight": "axis 1", "fc2.bias": "bias", "emb.weight": "Embedding"}
    assert set(qw.fallbacks) == set(expected)
    for name, word in expected.items():
        assert word in qw.fallbacks[name], (name, qw.fallbacks[name])
        w = model.get_parameter(name).detach()
        rtn = rtn_codes(w, configs[name].resolve(w.shape, G.TorchSystem(model).channel_axis(name)))
        assert same_tensor(qw.tensors[name], rtn), name
    assert {n for n, m in qw.methods.items() if m == "gptq"} == {"conv.weight", "dw.weight", "fc1.weight"}
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.training


# --------------------------------------------------------------------------------------------
# Error propagation (QEP)
# --------------------------------------------------------------------------------------------

def test_propagated_target_is_the_least_squares_fit_to_the_float_outputs():
    lin = nn.Linear(10, 6).double()
    w = lin.weight.detach()
    x = randn(200, 10, seed=4, dtype=torch.float64)
    xq = x + 0.1 * randn(200, 10, seed=5, dtype=torch.float64)  # what a quantized path delivers
    h = Hessian(lin)
    for a, b in zip(xq.split(64), x.split(64)):
        h.add_batch(a, b)
    star = h.propagated(w, alpha=1.0, damp=1e-12)
    lstsq = torch.linalg.lstsq(xq, x @ w.T).solution.T  # argmin ||W X - W* X~||
    assert torch.allclose(star, lstsq, atol=1e-8)
    assert torch.allclose(h.propagated(w, alpha=0.0), w)
    same = Hessian(lin)
    same.add_batch(x, x)
    assert torch.equal(same.propagated(w, alpha=1.0), w)  # nothing to correct


def test_propagation_in_the_pass_aims_each_layer_at_the_float_model():
    model, x = Reversed(), calibration()
    configs = {"first.weight": Int(2), "second.weight": Int(3)}
    plain = GPTQ().quantize_weights(model, configs, x)
    assert all(same_tensor(t, GPTQ(propagation=0.0).quantize_weights(model, configs, x).tensors[n])
               for n, t in plain.tensors.items())
    qep = GPTQ(propagation=0.5).quantize_weights(model, configs, x)
    assert same_tensor(qep.tensors["first.weight"], plain.tensors["first.weight"])  # no upstream error yet
    # by hand: the target of `second` moves towards the float model's output, then GPTQ
    _, _, ys = sequential_reference(model, x, configs, GPTQ(), 32)
    h = Hessian(model.second)
    for yq, b in zip(ys, x.split(32)):
        h.add_batch(yq, torch.tanh(model.first(b)).detach())
    target = h.propagated(model.second.weight, 0.5, 0.01)
    expected = GPTQ().quantize(target, Int(3).resolve((6, 16), 0), h)
    assert same_tensor(qep.tensors["second.weight"], expected)
    assert not same_tensor(expected, plain.tensors["second.weight"])


# --------------------------------------------------------------------------------------------
# What GPTQ refuses
# --------------------------------------------------------------------------------------------

class OnnxLike:
    """A system without a torch module (like tqslite.onnx_system.OnnxSystem)."""

    def step(self, x):
        return x

    def parameter_names(self):
        return ["w"]

    def get_parameter(self, name):
        return torch.ones(2, 2)

    def set_parameter(self, name, value):
        pass

    def channel_axis(self, name):
        return 0

    def evaluating(self):
        pass


def test_a_system_without_a_torch_module_is_refused():
    with pytest.raises(ValueError, match="GPTQ needs a torch module.*RTN and MSE-clip work on any system"):
        GPTQ().quantize_weights(OnnxLike(), {"w": Int(4)}, torch.ones(2, 2))


@pytest.mark.parametrize("call,match", [
    (lambda: GPTQ().quantize(torch.ones(4, 4), Int(4, PerChannel(0))), "needs the layer's Hessian"),
    (lambda: GPTQ().quantize(torch.ones(4, 4), Int(4, PerChannel(1)), torch.eye(4)), "axis 1"),
    (lambda: GPTQ().quantize(torch.ones(4, 4), Int(4, PerChannel(0)), torch.eye(3)), "does not fit"),
    (lambda: GPTQ().quantize_weights(nn.Linear(2, 2), {"weight": Int(4)}), "calibration"),
    (lambda: GPTQ().quantize_weights(nn.Linear(2, 2), {"nope": Int(4)}, torch.ones(2, 2)), "not parameters"),
    (lambda: GPTQ(damp=-0.1), "damp"),
    (lambda: GPTQ(block_size=0), "block_size"),
    (lambda: GPTQ(batch_size=2.5), "batch_size"),
    (lambda: GPTQ(act_order="yes"), "act_order"),
    (lambda: GPTQ(propagation=1.5), "propagation"),
], ids=["no-hessian", "wrong-axis", "wrong-hessian-shape", "no-calibration", "unknown-tensor", "damp", "block_size",
        "batch_size", "act_order", "propagation"])
def test_bad_input_is_refused_with_a_clear_message(call, match):
    with pytest.raises(ValueError, match=match):
        call()
