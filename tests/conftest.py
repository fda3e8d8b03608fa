"""Shared fixtures: small models and systems with known answers."""

import numpy as np
import pytest
import torch
from torch import nn

from tqslite.book import build_site


def linear_system(eigenvalues, seed=0, dtype=torch.float64) -> nn.Linear:
    """``x' = A x`` with ``A = Q diag(eigenvalues) Q^T`` (Q random orthogonal): spectral radius known."""
    g = torch.Generator().manual_seed(seed)
    d = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T
    lin = nn.Linear(d, d, bias=False).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(a)
    return lin


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 8)).double()


@pytest.fixture
def x0():
    return torch.randn(16, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def snapshot(module: nn.Module) -> dict:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def same_weights(module: nn.Module, snap: dict) -> bool:
    return all(torch.equal(p, snap[n]) for n, p in module.named_parameters())


@pytest.fixture
def rng():
    return np.random.default_rng(0)


#: pytest-timeout limit (seconds) for the tests that use ``smoke_site``: the first of them builds the
#: whole book (14 notebooks, then Sphinx), which took about 4 minutes on a fast machine and over 10 on
#: a slow shared one, past the 600 s every other test gets (pyproject.toml).
SMOKE_BUILD_TIMEOUT = 2400


@pytest.fixture(scope="session")
def smoke_site(tmp_path_factory):
    """The real book built once per session in SMOKE mode: ``(site folder, stage folder)``.

    Shared by ``test_notebooks.py`` (each page and its figures) and ``test_rendered_pages.py``
    (no raw LaTeX, warnings, machine paths or numpy reprs on any page).
    """
    root = tmp_path_factory.mktemp("smoke_book")
    site = build_site(smoke=True, out=root / "html", stage=root / "stage", timeout=300)
    return site, root / "stage"
