"""tqslite: Trajectory-based Quantization Sensitivity for autoregressive forecasters.

The pieces, one module per job:

* :mod:`tqslite.config` -- the configuration vocabulary: integer formats on a scale granularity,
  float16, kept in float;
* :mod:`tqslite.quantization` -- integer grids, round-to-nearest, the stored form of a tensor;
* :mod:`tqslite.quantizers` -- the quantizer interface, RTN and MSE-clip RTN;
* :mod:`tqslite.gptq` -- GPTQ, calibration-based, mixed precision included;
* :mod:`tqslite.units` -- the tensors and blocks that share one configuration;
* :mod:`tqslite.systems` -- models as state-to-state maps, Lorenz-63 and Lorenz-96;
* :mod:`tqslite.adapters` -- your own forecaster as a system: block forecasters with their own
  normalisation, masks and quantiles, models with extra inputs per step, plain functions;
* :mod:`tqslite.probe` -- the TQS probe (gamma_quant, gamma_gauss);
* :mod:`tqslite.row_blocks` -- many perturbed copies of a model as blocks of rows of one plain pass (the probe's
  batched engine); :mod:`tqslite.batched` -- the same under ``torch.vmap``, and the memory plan of a pass;
* :mod:`tqslite.sweep` -- long sweeps: resumable from a netCDF file, on any executor or a dask cluster;
* :mod:`tqslite.activations` -- static, dynamic and probabilistic activation quantization, and
  the probe for activation noise;
* :mod:`tqslite.stats` -- bootstrap intervals and Spearman agreement;
* :mod:`tqslite.knapsack` -- the multiple-choice knapsack (exact and greedy);
* :mod:`tqslite.allocation` -- cost tables priced with any quantizer, allocation, Pareto fronts;
* :mod:`tqslite.bank` -- a quantizer's weights at every option, computed once for every plan;
* :mod:`tqslite.refine` -- closed-loop refinement of a plan, judged by measured rollouts;
* :mod:`tqslite.pipeline` -- the recommended TQS pipeline (:data:`~tqslite.pipeline.RECOMMENDED`);
* :mod:`tqslite.plans` -- plans ``{unit: configuration}`` as JSON, their size, applying them;
* :mod:`tqslite.dynamics` -- Lyapunov spectra and finite-time exponents;
* :mod:`tqslite.evaluation` -- forecasts as xarray, latitude-weighted RMSE, anomaly correlation;
* :mod:`tqslite.emulators` -- small learned emulators of the reference systems;
* :mod:`tqslite.baselines` -- the other sensitivity scores TQS is compared with (one-step, Hessian, range, random);
* :mod:`tqslite.benchmark` -- a shipped model's probe states, evaluation windows and references;
* :mod:`tqslite.skill` -- the skill-aware horizon rule;
* :mod:`tqslite.wins` -- one definition of a win: paired bootstrap, Holm's adjustment;
* :mod:`tqslite.comparison` -- methods as (score, objective, quantizer) triples at matched size;
* :mod:`tqslite.checkpoint` -- packed checkpoints: a quantized model as a small safetensors file;
* :mod:`tqslite.onnx_quant` -- low-bit ONNX graphs from a plan, for a stand-in or an existing graph
  (``tqslite.export_quantized`` imports onnx and onnxruntime on first use).
"""

from .activations import calibrate, probe_activations, quantized_activations
from .adapters import BlockForecaster, Ensemble, Forced, FunctionSystem, Mask, Normalise, Quantiles
from .allocation import allocate, cost_table, pareto, predicted_error
from .bank import WeightBank
from .checkpoint import load_checkpoint, save_checkpoint
from .config import DEFAULT_OPTIONS, Float16, Int, KeepFloat, PerChannel, PerGroup, PerTensor, as_config, int_options
from .dynamics import finite_time_lyapunov, jacobians, lyapunov_spectrum, trajectory
from .knapsack import InfeasibleBudget, solve_mckp
from .pipeline import RECOMMENDED, Pipeline, recommended
from .plans import (Plan, PlanSize, QuantizedModel, ReleaseSize, apply_plan, budget_of, plan_size, quantize,
                    release_size, uniform_plan)
from .probe import Gaussian, QuantResidual, gamma_at, probe
from .quantization import QuantizedTensor, relative_error, rtn_quantize, sqnr_db, storage_bits
from .gptq import GPTQ
from .quantizers import RTN, MSEClip, QuantizedWeights, Quantizer, as_quantizer
from .stats import bootstrap_gamma, spearman, spearman_agreement
from .systems import Lorenz63, Lorenz96, TorchSystem, WindowedSystem, as_system, rollout
from .units import BlockUnits, TensorUnits, Unit, format_unit_tree, make_units, unit_tree

__version__ = "0.1.0"


def __getattr__(name):
    # the ONNX writer needs onnx and onnxruntime: imported when it is first asked for, not with tqslite
    if name == "export_quantized":
        from .onnx_quant import export_quantized
        return export_quantized
    raise AttributeError(f"module 'tqslite' has no attribute {name!r}")


__all__ = [
    "BlockForecaster", "BlockUnits", "DEFAULT_OPTIONS", "Ensemble", "Float16", "Forced", "FunctionSystem", "GPTQ",
    "Gaussian", "InfeasibleBudget", "Int", "KeepFloat", "Lorenz63", "Lorenz96", "MSEClip", "Mask", "Normalise",
    "PerChannel", "PerGroup", "PerTensor", "Pipeline", "Plan", "PlanSize", "QuantResidual", "Quantiles",
    "QuantizedModel", "QuantizedTensor", "QuantizedWeights", "Quantizer", "RECOMMENDED", "RTN", "ReleaseSize",
    "TensorUnits", "TorchSystem", "Unit", "WeightBank", "WindowedSystem", "allocate", "apply_plan", "as_config",
    "as_quantizer", "as_system", "bootstrap_gamma", "budget_of", "calibrate", "cost_table", "export_quantized",
    "finite_time_lyapunov", "format_unit_tree", "gamma_at", "int_options", "jacobians", "load_checkpoint",
    "lyapunov_spectrum", "make_units", "pareto", "plan_size", "predicted_error", "probe", "probe_activations",
    "quantize", "quantized_activations", "recommended", "relative_error", "release_size", "rollout", "rtn_quantize",
    "save_checkpoint", "solve_mckp", "spearman", "spearman_agreement", "sqnr_db", "storage_bits", "trajectory",
    "uniform_plan", "unit_tree",
]
