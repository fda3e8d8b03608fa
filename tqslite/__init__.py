"""tqslite: Trajectory-based Quantization Sensitivity for autoregressive forecasters.

The pieces, one module per job:

* :mod:`tqslite.quantization` -- RTN weight quantization, packed storage, exact sizes;
* :mod:`tqslite.units` -- the tensors and blocks that get one bit width each;
* :mod:`tqslite.systems` -- models as state-to-state maps, Lorenz-63 and Lorenz-96;
* :mod:`tqslite.probe` -- the TQS probe (gamma_quant, gamma_gauss);
* :mod:`tqslite.activations` -- static, dynamic and probabilistic activation quantization, and
  the probe for activation noise;
* :mod:`tqslite.stats` -- bootstrap intervals and Spearman agreement;
* :mod:`tqslite.allocation` -- cost tables, the knapsack solvers, plans, Pareto fronts;
* :mod:`tqslite.dynamics` -- Lyapunov spectra and finite-time exponents;
* :mod:`tqslite.evaluation` -- forecasts as xarray, latitude-weighted RMSE, anomaly correlation;
* :mod:`tqslite.emulators` -- small learned emulators of the reference systems;
* :mod:`tqslite.baselines` -- GPTQ and the other sensitivity scores TQS is compared with;
* :mod:`tqslite.comparison` -- every method at matched size on one model: win and cost tables.
"""

from .activations import calibrate, probe_activations, quantized_activations
from .allocation import InfeasibleBudget, Plan, allocate, apply_plan, cost_table, pareto, solve_mckp, uniform_plan
from .dynamics import finite_time_lyapunov, jacobians, lyapunov_spectrum, trajectory
from .probe import gamma_at, probe
from .quantization import QuantizedTensor, relative_error, rtn_quantize, sqnr_db, storage_bits
from .config import DEFAULT_OPTIONS, Float16, Int, KeepFloat, PerChannel, PerGroup, PerTensor, as_config, int_options, parse
from .quantizers import RTN, MSEClip, QuantizedWeights, Quantizer, as_quantizer
from .stats import bootstrap_gamma, spearman, spearman_agreement
from .systems import Lorenz63, Lorenz96, TorchSystem, WindowedSystem, as_system, rollout
from .units import Unit, make_units

__version__ = "0.1.0"

__all__ = [
    "InfeasibleBudget", "Plan", "jacobians", "trajectory", "calibrate", "probe_activations",
    "quantized_activations", "QuantizedTensor", "TorchSystem", "Unit", "WindowedSystem", "Lorenz63", "Lorenz96",
    "allocate", "apply_plan", "as_system", "bootstrap_gamma", "cost_table", "finite_time_lyapunov", "gamma_at",
    "lyapunov_spectrum", "make_units", "pareto", "probe", "relative_error", "rollout", "rtn_quantize",
    "solve_mckp", "spearman", "spearman_agreement", "sqnr_db", "storage_bits", "uniform_plan",
]
