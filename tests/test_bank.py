"""Weight banks: every tensor quantized once per option, serving any plan exactly as the quantizer would."""

import pytest
import torch

import tqslite
from tqslite.bank import WeightBank
from tqslite.config import Int, PerGroup, int_options
from conftest import same_weights, snapshot

OPTIONS = int_options((2, 3, 4, 8))


def mixed_plan(model):
    labels = [n for n, _ in model.named_parameters()]
    configs = {u: [Int(2), Int(3), Int(8), tqslite.Float16(), Int(4)][i % 5] for i, u in enumerate(labels)}
    from tqslite.plans import plan_from_configs
    return plan_from_configs(model, configs, "tensor")


def test_an_rtn_bank_serves_any_plan_bit_for_bit(mlp):
    bank = WeightBank.build(mlp, OPTIONS)
    plan = mixed_plan(mlp)
    direct = tqslite.quantize(mlp, plan, tqslite.RTN())
    served = tqslite.quantize(mlp, plan, bank)
    for name, w in direct.weights.dequantized().items():
        assert torch.equal(served.weights.dequantized()[name], w), name
    assert served.weights.configs == direct.weights.configs
    cached = bank.dequantized(mlp, plan.tensor_configs())
    assert all(torch.equal(cached[n], w) for n, w in direct.weights.dequantized().items())


def test_a_gptq_bank_gives_gptq_exactly_on_uniform_plans_and_prices_options_alike(mlp, x0):
    gptq = tqslite.GPTQ()
    bank = WeightBank.build(mlp, OPTIONS, gptq, x0)
    for config in (Int(3), Int(8)):
        plan = tqslite.uniform_plan(mlp, config)
        direct = tqslite.quantize(mlp, plan, gptq, x0).weights.dequantized()
        served = tqslite.quantize(mlp, plan, bank).weights.dequantized()
        assert all(torch.equal(served[n], w) for n, w in direct.items())
    scores = tqslite.probe(mlp, x0, horizon=3, progress=False)
    a = tqslite.cost_table(scores, mlp, OPTIONS, quantizer=gptq, calibration=x0)
    b = tqslite.cost_table(scores, mlp, OPTIONS, quantizer=bank)
    assert (a["cost"] == b["cost"]).all() and (a["size"] == b["size"]).all()


def test_the_model_is_untouched_and_a_changed_model_is_refused(mlp):
    before = snapshot(mlp)
    bank = WeightBank.build(mlp, OPTIONS)
    tqslite.apply_plan(mlp, tqslite.uniform_plan(mlp, 3), bank)
    assert same_weights(mlp, before)
    other = type(mlp)(*[m for m in mlp])  # same modules: same weights, accepted
    tqslite.apply_plan(other, tqslite.uniform_plan(other, 3), bank)
    with torch.no_grad():
        mlp[0].weight[0, 0] += 1.0
    with pytest.raises(ValueError, match="differs from the weights the bank was built from"):
        tqslite.apply_plan(mlp, tqslite.uniform_plan(mlp, 3), bank)


def test_missing_options_and_bad_builds_are_refused_with_a_way_out(mlp, x0):
    bank = WeightBank.build(mlp, OPTIONS)
    with pytest.raises(ValueError, match=r"'int4/group32' is not in the bank .*int2/channel"):
        tqslite.apply_plan(mlp, tqslite.uniform_plan(mlp, Int(4, PerGroup(32))), bank)
    with pytest.raises(ValueError, match="needs calibration"):
        WeightBank.build(mlp, OPTIONS, tqslite.GPTQ())
    with pytest.raises(ValueError, match="not from another bank"):
        WeightBank.build(mlp, OPTIONS, bank)
    with pytest.raises(ValueError, match="quantize_weights"):
        bank.quantize(mlp[0].weight, Int(4).resolve(mlp[0].weight.shape))
