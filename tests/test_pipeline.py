"""The recommended pipeline as a recipe, rollout calibration, and the shipped Lorenz-96 emulator."""

from dataclasses import replace

import numpy as np
import pytest
import torch

import tqslite
from tqslite import models, splits, train
from tqslite.bank import WeightBank
from tqslite.pipeline import CLOSED_LOOP, RECOMMENDED, Pipeline, recommended, rollout_calibration, run
from conftest import same_weights, snapshot


def test_the_default_is_one_written_recipe():
    assert recommended() is RECOMMENDED and tqslite.RECOMMENDED is RECOMMENDED
    assert RECOMMENDED.perturbation == "quant" and isinstance(RECOMMENDED.quantizer, tqslite.GPTQ)
    assert RECOMMENDED.objective == "quadratic" and RECOMMENDED.units == "tensor" and not RECOMMENDED.refine
    assert CLOSED_LOOP == replace(RECOMMENDED, refine=True)
    with pytest.raises(ValueError, match="perturbation"):
        Pipeline(perturbation="noise")
    assert [o.label for o in RECOMMENDED.options(tqslite.PerGroup(32))][:2] == ["int2/group32", "int3/group32"]


@pytest.mark.parametrize("pipeline", [RECOMMENDED, replace(CLOSED_LOOP, generations=2, offspring=4, survivors=1)],
                         ids=["open loop", "closed loop"])
def test_run_stays_within_budget_leaves_the_model_alone_and_reuses_shared_work(mlp, x0, pipeline):
    before = snapshot(mlp)
    budget = tqslite.plan_size(tqslite.uniform_plan(mlp, 3), mlp).bits_per_param
    res = run(pipeline, mlp, x0, budget, horizon=3, calibration=x0)
    assert same_weights(mlp, before)
    assert tqslite.plan_size(res.plan, mlp).bits_per_param <= budget
    served = tqslite.apply_plan(mlp, res.plan, res.bank)  # the model is the bank's weights for the plan
    assert all(torch.equal(a, b) for a, b in zip(served.parameters(), res.model.parameters()))
    again = run(pipeline, mlp, x0, budget, horizon=3, calibration=x0, bank=res.bank, scores=res.scores)
    assert again.plan.configs == res.plan.configs and "bank" not in again.seconds and "probe" not in again.seconds
    if pipeline.refine:
        assert res.refined and res.refined[-1].fitness <= res.refined[0].start_fitness
    else:
        assert res.refined == [] and res.plan is res.knapsack_plan


def test_rollout_calibration_is_the_float_models_own_rollout(mlp, x0):
    states = rollout_calibration(mlp, x0, horizon=3)
    with torch.no_grad():
        expected = tqslite.rollout(mlp, x0, 3).flatten(0, 1)
    assert torch.equal(states, expected) and states.shape == (3 * len(x0), 8)
    some = rollout_calibration(mlp, x0, horizon=3, n=10, seed=1)
    assert some.shape == (10, 8) and all(any(torch.equal(s, e) for e in expected) for s in some)


# --------------------------------------------------------------------------------------------
# The shipped Lorenz-96 emulator
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def emulator():
    return models.load("lorenz96_emulator"), splits.prepare("lorenz96_emulator")


def test_its_truth_is_lorenz96_on_the_attractor(emulator):
    (_, meta), prep = emulator
    # the climate of Lorenz-96 with F = 8: mean about 2.3, standard deviation about 3.6 (Lorenz 1996)
    mean, std = (float(prep.stats["x"].sel(stat=k)) for k in ("mean", "std"))
    assert 2.2 < mean < 2.5 and 3.4 < std < 3.8
    assert meta["data"]["sha256"] == prep.info["sha256"]  # the generated training data are the recorded ones


def test_the_checkpoint_matches_its_recorded_skill_and_beats_persistence(emulator):
    (system, meta), prep = emulator
    rec = meta["skill"]["heldout"]
    skill = train.evaluate("lorenz96_emulator", system, prep.heldout, meta, rec["n_windows"], rec["horizon"],
                           max_lead=5)
    leads = [lead for lead in rec["leads"] if lead <= 5]
    model = skill["rmse"].sel(forecast="model", lead=leads).values
    np.testing.assert_allclose(model, rec["rmse_normalised"]["model"][:len(leads)], rtol=1e-4)
    assert model[0] < skill["rmse"].sel(forecast="persistence", lead=1).item()


def test_retraining_with_the_recorded_seed_reproduces_the_first_steps(emulator):
    (_, meta), prep = emulator
    rep = meta["reproducibility"]
    _, record = train.fit("lorenz96_emulator", prep, stop_after=rep["check_steps"], progress=False)
    np.testing.assert_allclose(record["loss_first_steps"], meta["loss_first_steps"][:rep["check_steps"]],
                               rtol=rep["rtol"])


def test_the_emulators_leading_exponent_is_near_the_systems(emulator):
    # Lorenz-96, n = 40, F = 8: leading Lyapunov exponent about 1.7 per time unit (Lorenz and Emanuel 1998)
    (system, _), prep = emulator
    x = torch.from_numpy(prep.validation.values[0]).double()
    lam = tqslite.lyapunov_spectrum(system.module.double(), x, 1500, dt=0.05, k=1, transient=100)[0]
    system.module.float()
    assert 1.3 < lam < 2.1
