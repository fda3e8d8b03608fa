"""Sensitivity scores that TQS is compared with at matched size (SPEC section 5).

:mod:`tqslite.baselines.scores` -- score sets in the probe's layout, so the same allocator and any
quantizer use them: one-step output error (TQS at T = 1), Hessian trace (HAWQ-V2), weight range,
random. (GPTQ, a quantizer rather than a score, is :mod:`tqslite.gptq`.)
"""

from .scores import hessian_scores, hutchinson_traces, one_step_scores, random_scores, range_scores

__all__ = ["hessian_scores", "hutchinson_traces", "one_step_scores", "random_scores", "range_scores"]
