"""Lyapunov exponents against known values."""

import numpy as np
import pytest
import torch

from tqslite import Lorenz63, finite_time_lyapunov, lyapunov_spectrum


@pytest.fixture(scope="module")
def lorenz63_spectrum():
    x0 = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    return lyapunov_spectrum(Lorenz63(), x0, n_steps=50_000, dt=0.01, transient=1_000)


def test_lorenz63_leading_exponent(lorenz63_spectrum):
    # sigma=10, rho=28, beta=8/3: about (0.906, 0, -14.57)
    l1, l2, l3 = lorenz63_spectrum
    assert l1 == pytest.approx(0.906, abs=0.03)
    assert abs(l2) < 0.02
    assert l3 == pytest.approx(-14.572, abs=0.05)


def test_lorenz63_spectrum_sums_to_the_divergence_of_the_flow(lorenz63_spectrum):
    # the phase-space volume contracts at rate -(sigma + 1 + beta) everywhere
    assert lorenz63_spectrum.sum() == pytest.approx(-(10 + 1 + 8 / 3), abs=2e-3)
    assert np.all(np.diff(lorenz63_spectrum) < 0) and lorenz63_spectrum.dtype == np.float64


def test_linear_map_gives_log_moduli_of_its_eigenvalues():
    # x' = A x with a non-normal A of eigenvalues 2, -0.5, 0.1: exponents per step log|lambda|
    v = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0], [1.0, 0.0, 1.0]], dtype=torch.float64)
    a = v @ torch.diag(torch.tensor([2.0, -0.5, 0.1], dtype=torch.float64)) @ torch.linalg.inv(v)
    x0 = torch.full((3,), 1e-100, dtype=torch.float64)  # the state grows like 2^t: start small
    ex = lyapunov_spectrum(lambda x: a @ x, x0, 1000)
    np.testing.assert_allclose(ex, np.log([2.0, 0.5, 0.1]), atol=5e-3)
    top = lyapunov_spectrum(lambda x: a @ x, x0, 1000, dt=0.5, k=1)
    assert top.shape == (1,) and top[0] == pytest.approx(np.log(2.0) / 0.5, abs=1e-2)


def test_finite_time_exponents_average_to_the_exponent():
    x0 = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    ftle = finite_time_lyapunov(Lorenz63(), x0, n_steps=20_000, window=100, dt=0.01, transient=500)
    full = lyapunov_spectrum(Lorenz63(), x0, n_steps=20_000, dt=0.01, k=1, transient=500)
    assert ftle.shape == (200, 1)
    assert ftle.mean() == pytest.approx(full[0], abs=1e-12)
    assert ftle.std() > 0.5  # predictability varies a lot along the attractor


def test_bad_arguments():
    m = Lorenz63()
    with pytest.raises(ValueError, match="shape \\(D,\\)"):
        lyapunov_spectrum(m, torch.ones(2, 3, dtype=torch.float64), 10)
    with pytest.raises(ValueError, match="k=4"):
        lyapunov_spectrum(m, torch.ones(3, dtype=torch.float64), 10, k=4)
    with pytest.raises(ValueError, match="non-finite"):
        lyapunov_spectrum(lambda x: x * 1e300, torch.ones(3, dtype=torch.float64), 10)
