"""Gradient clipping by global norm and by value: a drop-in for `torch.nn.utils`' own.

`clip_grad_norm_`, `get_total_norm`, `clip_grads_with_norm_` and `clip_grad_value_`
take torch's arguments (torch 2.6+), return what torch returns and raise what torch
raises; charclip's extras (`convention=`, `nonfinite=`, `strict=`) are keyword-only.
The math is written once, in docs/clipping.md. For a gradient g (all `.grad` tensors
viewed as one vector), a threshold tau and a norm order p:

    n = ||g||_p   (the norm of the per-tensor norms, as torch measures it)
    torch convention (default):  g' = g * min(1, tau / (n + 1e-6))
    optax convention:            g' = g  if n < tau (strict), else (g / n) * tau

`coefficient` below is that factor, written once; the public functions measure, take it
and scale. Where torch's answer is right, ours is torch's, bit for bit: the same kernels
(`torch._foreach_norm`, `torch._foreach_mul_`, grouped by device and dtype) on the same
tensors. Where torch's answer is wrong and a cheap check shows it, ours is right (each
case is a row of docs/divergences.md):

- a norm that overflowed (finite entries of 1e20 in float32) or underflowed (subnormal
  squares) is measured again in float64, on g scaled by a power of two when g is
  float64, so finite gradients keep a finite norm and their direction;
- float16/bfloat16 gradients are always measured in float64 and scaled there, rounded
  toward zero into their dtype, so the clipped norm is <= tau after rounding (torch's
  bfloat16 norm is itself rounded to bfloat16, and its clipped norm can exceed tau);
- negative or NaN thresholds, and norm orders that do not bound the gradient (p <= 0),
  raise ValueError (`charclip.clipspec.check_norm_type`, the check both backends share).

`strict=True` makes the promise literal for every dtype: the clipped gradient's exact
norm is <= tau. It measures the result again in float64 and, where that is not
provably <= tau, scales once more, rounding so that no entry can grow. This also
corrects torch's own float32 norm of a large CPU tensor, which the default reproduces
(one float32 accumulator per thread: 1.1% low for 1e8 entries, pytorch#169237).
How each safeguard works is in `torch_impl/clip_safeguards.py`; every factor it applies
comes from `coefficient`.

Nothing on the fast path branches on a device tensor's value: a branch would make the
host wait for the device on every step. On the CPU, where reading a value costs
nothing, the float64 re-measurement runs only when torch's norm is untrustworthy;
elsewhere, and under `torch.compile`, it runs every time and the coefficient is chosen
with `torch.where`, so `torch.compile(clip_grad_norm_, fullgraph=True)` compiles.

Non-finite gradients (`nonfinite=`):
    "propagate"  what torch does: NaN/inf spread through the gradients;
    "skip"       every gradient is set to zero; the returned norm is not finite, so
                 `not torch.isfinite(norm)` tells the loop to skip (and count) the step;
    "error"      raise NonFiniteGradientError (a RuntimeError, as torch raises for
                 `error_if_nonfinite=True`, which means the same) before any gradient
                 is touched.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Iterable
from typing import NamedTuple

import torch

from charclip.clipspec import (
    CONVENTIONS,
    NONFINITE_POLICIES,
    TORCH_EPS,
    check_choice,
    check_norm_type,
    check_threshold,
)
from charclip.torch import clip_safeguards as safe

Tensors = torch.Tensor | Iterable[torch.Tensor]


class NonFiniteGradientError(RuntimeError, FloatingPointError):
    """A gradient entry is NaN or infinite. A RuntimeError, which torch raises for
    `error_if_nonfinite=True`; a FloatingPointError, which charclip raised before."""


class Coefficient(NamedTuple):
    """The factor c of g' = c * g: c = 1 where `keep`, else c = tau / divisor (`ratio`, where
    the formula computes it first)."""

    keep: torch.Tensor | bool
    tau: float
    divisor: torch.Tensor | float
    ratio: torch.Tensor | None = None

    def factor(self, scale: torch.Tensor | None = None) -> torch.Tensor:
        """c as one tensor (times `scale` for a norm given as norm * scale)."""
        ratio = self.tau / self.divisor if self.ratio is None else self.ratio
        return torch.where(self.keep, 1.0, ratio if scale is None else ratio * scale)


def coefficient(
    norm: torch.Tensor | float, tau: float, convention: str, *, scale: torch.Tensor | None = None
) -> Coefficient:
    """The clipping factor c, as docs/clipping.md (step 2) writes it; the only place it is derived.

        torch:  c = min(1, tau / (n + 1e-6))
        optax:  c = 1 if n < tau (or n == 0, so tau = 0 keeps a zero gradient), else tau / n

    `norm` is a tensor, or a Python float where the caller reads it on the host anyway.
    `scale`: the norm was measured on g * scale (a power of two, so that a norm beyond the
    dtype's range stays finite) and `norm` is that scaled norm; tau / divisor is then the
    factor for g * scale, c / scale.
    """
    n = norm if scale is None else norm / scale
    if convention == "optax":
        return Coefficient((n < tau) | (n == 0), tau, norm)
    if scale is None:
        divisor = n + TORCH_EPS
        ratio = (
            tau / divisor
        )  # torch's expression; min(1, ratio) is decided on it, never branched on
        return Coefficient(ratio >= 1, tau, divisor, ratio)
    return Coefficient(tau >= n + TORCH_EPS, tau, norm + TORCH_EPS * scale)


def get_total_norm(
    tensors: Tensors,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> torch.Tensor:
    """||g||_p of `tensors` viewed as one vector: the p-norm of the per-tensor p-norms.

    torch's `get_total_norm`, with torch's bits wherever torch's norm is right. Where
    torch's overflows or underflows, the norm is measured again in float64;
    float16/bfloat16 tensors are always measured in float64, and their norm is float32.
    norm_type=0 counts the non-zero entries (torch counts non-zero tensors); below 0
    raises ValueError. A NaN or infinite entry raises NonFiniteGradientError (a
    RuntimeError) when `error_if_nonfinite`.
    """
    with torch.no_grad():
        tensors = safe.as_list(tensors)
        p = check_norm_type(norm_type, clipping=False)
        if not tensors:
            return torch.tensor(0.0)
        if p == 0:
            return safe.count_nonzero(tensors, error_if_nonfinite)
        m = safe.measure(safe.Grouped(tensors), p, foreach)
        if error_if_nonfinite:
            safe.raise_if_nonfinite(m, p)
        return m.norm


def clip_grad_norm_(
    parameters: Tensors,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    convention: str = "torch",
    nonfinite: str = "propagate",
    strict: bool = False,
) -> torch.Tensor:
    """Scale the `.grad` of `parameters` in place so their global p-norm is <= max_norm.

    torch's `clip_grad_norm_` (the same arguments, warning, errors and, where torch is
    right, bits): `get_total_norm` then `clip_grads_with_norm_`, returning the norm
    measured before clipping. The direction is kept: g' = c * g with 0 <= c <= 1.
    Pascanu, Mikolov & Bengio, "On the difficulty of training recurrent neural
    networks", ICML 2013.

    convention: "torch" (g * min(1, tau / (n + 1e-6))) or "optax" (strict <, no epsilon).
    nonfinite: "propagate" (torch), "skip" (zero the gradients) or "error"
        (`error_if_nonfinite=True` means "error").
    strict: the exact norm of the clipped gradient is <= max_norm for every dtype (the
        default leaves float32/float64 results as torch rounds them: up to a few ulps above).
    """
    with torch.no_grad():
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        else:
            is_generator = isinstance(parameters, types.GeneratorType)
            parameters = list(parameters)  # a generator is consumed once, here
            if is_generator and not parameters:
                warnings.warn(
                    "`parameters` is an empty generator, no gradient clipping will occur.",
                    stacklevel=2,
                )
        max_norm = check_threshold("max_norm", max_norm)
        p = check_norm_type(norm_type)
        check_choice("convention", convention, CONVENTIONS)
        check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        if error_if_nonfinite:
            if nonfinite == "skip":
                raise ValueError(
                    'error_if_nonfinite=True and nonfinite="skip" contradict each other; pass one.'
                )
            nonfinite = "error"
        grads = [q.grad for q in parameters if q.grad is not None]
        if not grads:
            return torch.tensor(0.0)
        g = safe.Grouped(grads)
        m = safe.measure(g, p, foreach)
        if nonfinite == "error":
            safe.raise_if_nonfinite(m, p)
        safe.clip_(g, m, max_norm, convention, foreach, p)
        if strict:
            safe.enforce_bound_(g, max_norm, p, foreach, exact=True)
        if nonfinite == "skip":
            safe.zero_if_nonfinite_(g, m)
        return m.norm


def clip_grads_with_norm_(
    parameters: Tensors,
    max_norm: float,
    total_norm: torch.Tensor,
    foreach: bool | None = None,
    *,
    convention: str = "torch",
) -> None:
    """Scale the `.grad` of `parameters` in place for a norm measured beforehand
    (`get_total_norm`, or a norm summed across processes): torch's `clip_grads_with_norm_`,
    g' = g * min(1, max_norm / (total_norm + 1e-6)) in the torch convention."""
    with torch.no_grad():
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        grads = [q.grad for q in parameters if q.grad is not None]
        max_norm = check_threshold("max_norm", max_norm)
        check_choice("convention", convention, CONVENTIONS)
        if not grads:
            return
        measured = safe.measured(torch.as_tensor(total_norm))
        safe.clip_(safe.Grouped(grads), measured, max_norm, convention, foreach, 2.0)


def clip_grad_value_(parameters: Tensors, clip_value: float, foreach: bool | None = None) -> None:
    """Clamp every `.grad` entry to [-clip_value, clip_value] in place, as torch does (this
    changes the gradient's direction; NaN stays NaN)."""
    with torch.no_grad():
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        v = check_threshold("clip_value", clip_value)
        grads = [q.grad for q in parameters if q.grad is not None]
        if not grads:
            return
        for (device, _), ts in safe.Grouped(grads).groups.items():
            if safe.use_foreach(ts, device, foreach):
                torch._foreach_clamp_min_(ts, -v)
                torch._foreach_clamp_max_(ts, v)
            else:
                for t in ts:
                    t.clamp_(min=-v, max=v)
