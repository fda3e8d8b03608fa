"""Tests of tqslite.emulators: training on one trajectory or on several."""

import pytest
import torch

from tqslite import Lorenz63
from tqslite.dynamics import trajectory
from tqslite.emulators import fit_emulator


@pytest.fixture(scope="module")
def states():
    return trajectory(Lorenz63(), torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64), 400)[100:]  # (300, 3)


def test_one_trajectory_with_or_without_a_batch_dim_trains_the_same_emulator(states):
    a, losses_a = fit_emulator(states, width=8, depth=1, steps=20, seed=3)
    b, losses_b = fit_emulator(states[:, None], width=8, depth=1, steps=20, seed=3)
    assert losses_a == losses_b
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_several_trajectories_pool_their_pairs_and_never_pair_across_them(states):
    batch = torch.stack([states[:100], states[200:]], dim=1)          # (100, 2, 3): two pieces
    model, _ = fit_emulator(batch, width=8, depth=1, steps=1)
    x = batch.float()
    pairs_in = torch.cat([x[:-1, 0], x[:-1, 1]])                       # 2 x 99 pairs
    steps = torch.cat([x[1:, 0] - x[:-1, 0], x[1:, 1] - x[:-1, 1]])
    torch.testing.assert_close(model.x_mean, pairs_in.mean(0))
    torch.testing.assert_close(model.inc_std, steps.std(0))
    # a pair across the two pieces (states[99] -> states[200]) would be a jump far larger than a step
    across = x[0, 1] - x[-1, 0]
    assert (across.abs() > 5 * steps.abs().max(0).values).any()


def test_a_trajectory_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=r"\(n, D\) or \(n, B, D\).*got shape \(1, 3\)"):
        fit_emulator(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="got shape \\(5,\\)"):
        fit_emulator(torch.zeros(5))
