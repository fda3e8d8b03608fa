"""A weight bank: a quantizer's weights for every option, computed once and shared by every plan.

Pricing options (:func:`tqslite.allocation.cost_table`), probing with a quantizer's residual
(:class:`tqslite.probe.QuantResidual`), searching over whole plans (:mod:`tqslite.refine`) and
comparing methods at many budgets all need the same thing: what a quantizer makes of every
tensor at every option. For RTN that is cheap; for GPTQ it is one calibrated pass over the model
per option. A :class:`WeightBank` runs the quantizer **once per integer option on the whole
model** (every tensor on that option, as a uniform plan) and keeps the stored form of every
tensor. It is itself a :class:`~tqslite.quantizers.Quantizer`, so anything that takes a
quantizer takes a bank, and a plan is applied by picking each tensor's stored form from the bank
-- no quantizer runs again::

    bank = WeightBank.build(model, int_options((2, 3, 4, 8)), GPTQ(), calibration)
    table = cost_table(scores, model, options, quantizer=bank)      # no GPTQ pass here
    model_q = apply_plan(model, allocate(table, budget_bits=4), bank)

This is EvoPress's database (Sieberling et al., 2024): every layer quantized at every level
once, then any configuration assembled from it. For a data-free quantizer (RTN, MSE-clip) a
tensor's stored form does not depend on the others, so a bank gives exactly what the quantizer
gives. For sequential GPTQ it does not hold exactly: in a mixed plan a layer would be calibrated
on the inputs of layers quantized at *other* widths; the bank's layer was calibrated on inputs
of layers at its own width. A uniform plan is served exactly as GPTQ makes it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import ClassVar

import torch
from tqdm import tqdm

from .config import Int, as_config
from .quantization import cast
from .quantizers import RTN, QuantizedWeights, Quantizer, as_quantizer
from .systems import as_system


class WeightBank(Quantizer):
    """Every tensor's stored form at every integer option, as one quantizer made them.

    Build one with :meth:`build`. Serving a plan (:meth:`quantize_weights`) takes each tensor's
    stored form from the option its configuration names (float options are cast on the spot);
    an option the bank does not hold is an error that names the options it holds.

    Attributes
    ----------
    source : Quantizer
        The quantizer that made the weights.
    weights : dict of str to QuantizedWeights
        ``{option label: the stored form of every banked tensor on that option}``.
    seconds : dict of str to float
        Wall seconds the quantizer took per option (what a uniform plan of that option costs).
    """

    name: ClassVar[str] = "bank"
    needs_calibration: ClassVar[bool] = False

    def __init__(self, source: Quantizer, weights: dict, reference: dict, seconds: dict | None = None):
        self.source = source
        self.weights = dict(weights)
        self.seconds = dict(seconds or {})
        self._reference = dict(reference)
        self._dequantized = {}  # option label -> {tensor: fake-quant weights}, filled on demand

    @classmethod
    def build(cls, model, options, quantizer=None, calibration=None, tensors=None,
              progress: bool = False) -> WeightBank:
        """Run ``quantizer`` once per integer option of ``options`` on ``tensors`` of ``model``.

        Parameters
        ----------
        model : nn.Module or system
            Read, never modified.
        options : sequence of configurations
            Integer ones are banked; float ones need no bank and are skipped.
        quantizer : Quantizer or str, optional
            RTN by default; ``GPTQ()`` needs ``calibration``.
        calibration : Tensor, optional
            States for a calibration-based quantizer.
        tensors : list of str, optional
            Parameter names to bank (default: every parameter of the model).
        progress : bool
            A progress bar over options.
        """
        system = as_system(model)
        quantizer = RTN() if quantizer is None else as_quantizer(quantizer)
        if isinstance(quantizer, WeightBank):
            raise ValueError("a bank is built from a quantizer (RTN(), GPTQ(), ...), not from another bank.")
        if quantizer.needs_calibration and calibration is None:
            raise ValueError(f"{quantizer.name} needs calibration states to fill a bank: pass calibration=... .")
        names = list(system.parameter_names()) if tensors is None else list(tensors)
        ints = [o for o in dict.fromkeys(as_config(o) for o in options) if isinstance(o, Int)]
        weights, seconds = {}, {}
        for option in tqdm(ints, desc=f"bank ({quantizer.name})", disable=not progress):
            t0 = time.perf_counter()
            weights[option.label] = quantizer.quantize_weights(system, dict.fromkeys(names, option), calibration)
            seconds[option.label] = time.perf_counter() - t0
        reference = {n: system.get_parameter(n).clone() for n in names}
        return cls(quantizer, weights, reference, seconds)

    @property
    def options(self) -> list:
        """Labels of the integer options held."""
        return list(self.weights)

    def __repr__(self) -> str:
        return f"WeightBank({self.source!r}, options={self.options})"

    def quantize(self, w, fmt, hessian=None):
        raise ValueError("a WeightBank serves the tensors of the model it was built for, by name: use "
                         "quantize_weights(model, configs) (or apply_plan(model, plan, bank)).")

    def check(self, system, names) -> None:
        """``ValueError`` unless every tensor of ``names`` is banked and unchanged since the bank was built."""
        for n in names:
            if n not in self._reference:
                raise ValueError(f"tensor {n!r} is not in this bank; build the bank with it (tensors=None banks "
                                 "every parameter).")
            if not torch.equal(system.get_parameter(n), self._reference[n]):
                raise ValueError(f"tensor {n!r} differs from the weights the bank was built from: the bank belongs "
                                 "to another model (or the model changed since); build a new bank.")

    def quantize_weights(self, model, configs: Mapping, calibration=None, progress: bool = False) -> QuantizedWeights:
        """The stored form of every tensor of ``configs`` (``{name: configuration}``), from the bank.

        ``calibration`` is ignored: the bank was calibrated when it was built.
        """
        system = as_system(model)
        configs = {n: as_config(c) for n, c in configs.items()}
        self.check(system, configs)
        out = QuantizedWeights(quantizer=repr(self))
        for name, config in configs.items():
            if isinstance(config, Int):
                held = self.weights.get(config.label)
                if held is None:
                    raise ValueError(f"option {config.label!r} is not in the bank (it holds {self.options}); "
                                     "build the bank with every option the plans may use.")
                out.tensors[name] = held.tensors[name]
                out.configs[name], out.methods[name] = held.configs[name], held.methods[name]
            else:
                out.floats[name] = cast(system.get_parameter(name), config)
                out.configs[name], out.methods[name] = config, "float16" if config.bits == 16 else "float"
        return out

    def dequantized(self, model, configs: Mapping) -> dict:
        """``{name: fake-quant weights}`` for ``configs`` on ``model``, cached per option.

        What :meth:`quantize_weights` gives, dequantized, without unpacking the same codes twice:
        for the many plans of a search (:mod:`tqslite.refine`).
        """
        system = as_system(model)
        self.check(system, configs)
        out = {}
        for name, config in configs.items():
            config = as_config(config)
            if isinstance(config, Int):
                if config.label not in self.weights:
                    raise ValueError(f"option {config.label!r} is not in the bank (it holds {self.options}).")
                cache = self._dequantized.setdefault(config.label, {})
                if name not in cache:
                    cache[name] = self.weights[config.label].tensors[name].dequantize()
                out[name] = cache[name]
            else:
                out[name] = cast(system.get_parameter(name), config)
        return out


__all__ = ["WeightBank"]
