"""Baselines that TQS-PTQ is compared with at matched size (SPEC section 5).

* :mod:`tqslite.baselines.gptq` -- GPTQ, calibration-based, for ``Linear``/``Conv`` layers.
"""

from .gptq import gptq_layer, gptq_quantize

__all__ = ["gptq_layer", "gptq_quantize"]
