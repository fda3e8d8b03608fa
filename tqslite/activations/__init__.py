"""Activation quantization: static, dynamic and probabilistic ranges, and the activation probe.

Weights are quantized once, offline (:mod:`tqslite.quantization`). Activations change with every
input, so their quantization grid needs a range ``[lo, hi]`` per input. Three ways to get it:

* **static**: one range per layer, calibrated once on training states (:func:`calibrate`: the
  minimum and maximum over every element of every calibration sample, no percentile clipping).
  Costs nothing at run time; a rollout that leaves the calibrated range is clipped.
* **dynamic**: the minimum and maximum of each sample's output, measured after the layer has run.
  Never clips, but the full-precision output must be held in memory before it can be quantized,
  and it costs a second pass over the output.
* **probabilistic** (Santini, Paissan and Farella, 2025, arXiv 2505.10689): the range is
  *predicted* before the layer runs, from cheap statistics of its input. For ``y = W x + b``
  applied at many positions (the tokens of a transformer, the pixels of a convolution), the
  per-sample mean ``mu`` and variance ``v`` of each input feature over positions give, for each
  output channel ``j``::

      E[y_j]   = W_j . mu + b_j                  (exact for a Linear layer)
      Var[y_j] = (W_j * W_j) . v                 (if input features are independent)

  and the range is ``[min_j (E[y_j] - k std_j), max_j (E[y_j] + k std_j)]``. A convolution uses
  the kernel summed over its spatial taps, which also assumes that neighbouring positions are
  independent: they rarely are in a smooth field, so ``surrogate="calibrated"`` rescales each
  channel's predicted standard deviation by a factor fitted once on calibration states (a small
  learned surrogate, ``d_out`` numbers per layer). The range can clip the tails of a sample.

**Where the quantizers sit, and why.** Every quantizer acts on the *output* of an ``nn.Linear``,
``nn.Conv1d`` or ``nn.Conv2d`` -- the pre-activation, before any nonlinearity or residual sum. That
is the quantity the probabilistic surrogate predicts (``W x + b`` is linear in ``x``, so its moments
follow from those of ``x``), and it is what an integer kernel with a fused epilogue produces: it
accumulates in int32 and *requantizes* its output to ``b`` bits with the output's scale and zero
point. Quantizing a layer's input is the other common choice; up to the nonlinearities, norms and
residual sums in between, one layer's output is what the next one reads, but only the output is
what the surrogate can predict from the statistics of the input.

**The grid** is the weights' asymmetric RTN grid over each sample's range
(:mod:`tqslite.activations.grid`).

**Memory.** Counted in elements held *beyond the layer's own (quantized) output*, per sample
(:func:`activation_costs`): static 0; dynamic the whole full-precision output; probabilistic
``2 (d_in + d_out)`` (input means and variances, predicted means and variances). Persistent
per-layer tensors are counted apart: 2 numbers for static, the squared weights (and, for a
convolution, the spatially summed kernel) for probabilistic. In this module every strategy is
*simulated* in floating point ("fake quantization"): the float output is always computed, so the
accounting says what an integer kernel would need, not what this simulation allocates.

**The activation probe** (:func:`probe_activations`) is the TQS probe of :mod:`tqslite.probe` with
the perturbation moved from a unit's weights to its output: Gaussian noise of relative size
``sigma_rel`` (times the RMS of that sample's output) added at every call, through a forward hook,
seeded by ``(seed, module name)``. Like ``gamma_gauss`` it knows nothing of any quantizer; its
result has the layout of a :func:`tqslite.probe` result.

Everything here works on the ``nn.Module`` of a model (a module, or a
:class:`~tqslite.systems.TorchSystem` / :class:`~tqslite.systems.WindowedSystem`); hooks are
removed on exit and the model's parameters are never written.

**Modules.** :mod:`~tqslite.activations.layers` (which layers), :mod:`~tqslite.activations.grid`
(the quantizer), :mod:`~tqslite.activations.surrogate` (moments measured and predicted),
:mod:`~tqslite.activations.calibration` (static ranges and the surrogate's correction),
:mod:`~tqslite.activations.context` (:func:`quantized_activations`),
:mod:`~tqslite.activations.costs` (memory, arithmetic, measured overhead) and
:mod:`~tqslite.activations.probe` (the activation probe). Import from the package:
``from tqslite.activations import quantized_activations``.
"""

from .calibration import Calibration, calibrate
from .context import MODES, SURROGATES, ActivationLog, quantized_activations
from .costs import activation_costs, layer_io, overhead_timing
from .grid import activation_grid, check_bits, fake_quantize
from .layers import QUANTIZABLE, quantizable_modules, torch_module
from .probe import probe_activations
from .surrogate import input_moments, measured_moments, predicted_moments, probabilistic_range

__all__ = [
    "QUANTIZABLE", "MODES", "SURROGATES", "ActivationLog", "Calibration", "activation_costs", "activation_grid",
    "calibrate", "check_bits", "fake_quantize", "input_moments", "layer_io", "measured_moments", "overhead_timing",
    "predicted_moments", "probabilistic_range", "probe_activations", "quantizable_modules", "quantized_activations",
    "torch_module",
]
