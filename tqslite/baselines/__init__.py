"""Baselines that TQS-PTQ is compared with at matched size (SPEC section 5).

* :mod:`tqslite.baselines.gptq` -- GPTQ, calibration-based, for ``Linear``/``Conv`` layers, with
  QEP's error propagation as an option;
* :mod:`tqslite.baselines.scores` -- other sensitivity scores for the same allocator: one-step
  output error (TQS at T = 1), Hessian trace (HAWQ-V2), weight range, random.
"""

from .gptq import gptq_layer, gptq_quantize, propagate_error
from .scores import hessian_scores, hutchinson_traces, one_step_scores, random_scores, range_scores

__all__ = ["gptq_layer", "gptq_quantize", "hessian_scores", "propagate_error", "hutchinson_traces", "one_step_scores",
           "random_scores", "range_scores"]
