"""Gradient clipping by global norm and by value, in place on `.grad`, PyTorch style.

The math is written once, in docs/clipping.md; this module follows it step by step
and mirrors `jax_impl.clipping`. For a gradient g (all `.grad` tensors viewed as one
vector), a threshold tau and a norm order p:

    n = ||g||_p   (the norm of the per-tensor norms, as torch measures it)
    optax convention:  g' = g                 if n < tau (strict)
                       g' = (g / n) * tau     otherwise
    torch convention:  g' = g * min(1, tau / (n + 1e-6))

Both conventions reproduce their library bit for bit on ordinary float32/float64
inputs. Where the libraries are wrong, this module is not (docs/divergences.md):

- the norm is measured on g scaled by a power of two chosen from max|g| (exact), so
  squares cannot overflow: finite gradients of 1e20 keep a finite norm and their
  direction;
- float16/bfloat16 gradients are measured and scaled in float32, rounded toward zero
  into their dtype, and the rounded result is checked in float64 (and nudged down if
  needed), so the clipped norm is <= tau after rounding;
- negative or NaN thresholds and norm orders below 1 (norm_type=0 counts non-zero
  tensors in torch) raise ValueError.

Nothing branches on a tensor value (`torch.where`, `torch.clamp`): a branch would force
a device-to-host sync on every step. The only sync is nonfinite="error", which must
look at the norm to raise, as torch's `error_if_nonfinite=True` does.

Non-finite gradients (`nonfinite=`):
    "propagate"  what torch does: NaN/inf spread through the gradients;
    "skip"       every gradient is set to zero; the returned norm is not finite, so
                 `not torch.isfinite(norm)` tells the loop to skip (and count) the step;
    "error"      raise FloatingPointError before any gradient is touched.
"""

import math
from collections.abc import Iterable

import torch

from charclip.clipspec import (
    CONVENTIONS,
    LOW_PRECISION_MARGIN,
    NONFINITE_POLICIES,
    TORCH_EPS,
    check_choice,
    check_norm_type,
    check_threshold,
)

Tensors = torch.Tensor | Iterable[torch.Tensor]


def _is_low_precision(dtype: torch.dtype) -> bool:
    return torch.finfo(dtype).bits < 32


def _max_exponent(dtype: torch.dtype) -> int:
    """maxexp as NumPy names it: the largest finite value is just below 2**maxexp."""
    return math.frexp(torch.finfo(dtype).max)[1]


def _accumulation_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    """float32 at least: float16/bfloat16 are measured and scaled in float32."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _power_of_two_scale(tensors: list[torch.Tensor], acc: torch.dtype) -> torch.Tensor:
    """2**-e with max|g| = f * 2**e, f in [0.5, 1): scaled entries lie in [0, 1).

    The exponent is clamped so the scale itself is a normal number of `acc`.
    Non-finite or zero max|g| gives exponent 0, i.e. scale 1.
    """
    max_abs = torch.stack([t.to(acc).abs().amax() for t in tensors]).amax()
    _, exponent = torch.frexp(max_abs)
    limit = _max_exponent(acc) - 2
    return torch.exp2(-exponent.clamp(-limit, limit).to(acc))


def _scaled_norm(tensors: list[torch.Tensor], scale: torch.Tensor, p: float) -> torch.Tensor:
    """||g * scale||_p measured by torch itself (the p-norm of the per-tensor p-norms)."""
    return torch.nn.utils.get_total_norm([t.to(scale.dtype) * scale for t in tensors], p)


def _measure(tensors: list[torch.Tensor], p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(scaled norm, scale); the norm is scaled_norm / scale.

    Empty tensors count as torch counts them (a zero in the stack of per-tensor norms),
    except for p = inf, where torch's foreach norm refuses them: they are left out.
    """
    nonempty = [t for t in tensors if t.numel() > 0]
    acc = _accumulation_dtype(tensors)
    scale = _power_of_two_scale(nonempty, acc)
    return _scaled_norm(nonempty if p == math.inf else tensors, scale, p), scale


def _as_list(tensors: Tensors) -> list[torch.Tensor]:
    return [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)


@torch.no_grad()
def global_norm(tensors: Tensors, norm_type: float = 2) -> torch.Tensor:
    """||g||_p of all tensors viewed as one vector, accumulated in float32 or wider.

    Measured on g * 2**-e (exact), so a finite gradient has a finite norm whenever the
    norm itself is representable. Returns tensor(0.) when there is nothing to measure.
    """
    p = check_norm_type(norm_type)
    tensors = _as_list(tensors)
    if not any(t.numel() for t in tensors):
        return torch.tensor(0.0)
    scaled_norm, scale = _measure(tensors, p)
    return scaled_norm / scale


def _clipped(grad, scale, scaled_norm, norm, max_norm, convention):
    """One clipped gradient, computed in the accumulation dtype (the formulas are the
    libraries' own, so the bits agree)."""
    g = grad.to(norm.dtype)
    if convention == "optax":
        # A zero gradient stays zero, also for max_norm == 0, where optax computes 0 / 0.
        keep = (norm < max_norm) | (norm == 0)
        clipped = torch.where(keep, g, (g / norm) * max_norm)
    else:
        # Clamp rather than branch on coef < 1: a branch would sync with the device.
        coef = torch.clamp(max_norm / (norm + TORCH_EPS), max=1.0)
        # g * coef, torch's own expression, except that g is kept as is when coef is 1.
        clipped = torch.where(coef >= 1, g, g * coef)
    # A norm of 2**(maxexp - 2) * min(1, tau) or more (up to inf while every entry is
    # finite): 1 / n or tau / n is subnormal, or n overflowed. The direction still comes out
    # right from the scaled gradient, (g * 2**-e) / (n * 2**-e). (As in jax_impl, where XLA
    # flushes subnormals to zero.)
    largest = 2.0 ** (_max_exponent(norm.dtype) - 2) * min(1.0, max_norm)
    huge = ~(norm < largest) & torch.isfinite(scaled_norm) & (scaled_norm > 0)
    return torch.where(huge, (g * scale) / scaled_norm * max_norm, clipped)


def _round_toward_zero(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round x into `dtype` so that |result| <= |x|: rounding cannot raise the norm."""
    nearest = x.to(dtype)
    away = nearest.to(x.dtype).abs() > x.abs()
    return torch.where(away, torch.nextafter(nearest, torch.zeros_like(nearest)), nearest)


def _into_dtype(clipped: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if _is_low_precision(dtype):
        return _round_toward_zero(clipped, dtype)
    return clipped.to(dtype)


def _enforce_bound(clipped: list[torch.Tensor], max_norm: float, p: float) -> list[torch.Tensor]:
    """Make the float16/bfloat16 tensors' clipped norm <= max_norm after rounding.

    Rounding toward zero cannot raise the norm, but the float32 norm it was scaled by
    may be low by a few float32 ulps. So measure the rounded result again in float64
    (its squares are exact there); where it is still above max_norm, scale the
    low-precision tensors by max_norm / norm, shrunk by 2**-24 (far below their ulp),
    and round toward zero once more.
    """
    wide = [c.double() for c in clipped]
    measured = global_norm(wide, p)
    fix = torch.where(measured > max_norm, max_norm / measured * (1 - LOW_PRECISION_MARGIN), 1.0)
    return [_round_toward_zero(w * fix, c.dtype) if _is_low_precision(c.dtype) else c for w, c in zip(wide, clipped)]


@torch.no_grad()
def clip_grad_norm_(
    parameters: Tensors,
    max_norm: float,
    *,
    norm_type: float = 2,
    convention: str = "optax",
    nonfinite: str = "propagate",
) -> torch.Tensor:
    """Scale the `.grad` of `parameters` in place so their global p-norm is <= max_norm.

    Returns the norm measured before clipping (float32 for float16/bfloat16 grads).
    The direction is kept: g' = c * g with 0 <= c <= 1. Pascanu, Mikolov & Bengio,
    "On the difficulty of training recurrent neural networks", ICML 2013.
    """
    max_norm = check_threshold("max_norm", max_norm)
    p = check_norm_type(norm_type)
    check_choice("convention", convention, CONVENTIONS)
    check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
    grads = [q.grad for q in _as_list(parameters) if q.grad is not None]
    if not any(g.numel() for g in grads):
        return torch.tensor(0.0)
    scaled_norm, scale = _measure(grads, p)
    norm = scaled_norm / scale
    finite = torch.isfinite(scaled_norm)  # the scaled norm is finite iff every entry is
    if nonfinite == "error" and not finite:
        raise FloatingPointError(
            f"gradient norm is {norm.item()}: a gradient entry is NaN or infinite; lower the learning rate or check the loss."
        )
    new = [_into_dtype(_clipped(g, scale, scaled_norm, norm, max_norm, convention), g.dtype) for g in grads]
    if any(_is_low_precision(g.dtype) for g in grads):
        new = _enforce_bound(new, max_norm, p)
    if nonfinite != "propagate":
        new = [torch.where(finite, n, torch.zeros_like(n)) for n in new]
    for g, n in zip(grads, new):
        g.copy_(n)
    return norm


@torch.no_grad()
def clip_grad_value_(parameters: Tensors, clip_value: float) -> None:
    """Clamp every `.grad` entry to [-clip_value, clip_value] in place (changes the direction)."""
    v = check_threshold("clip_value", clip_value)
    for q in _as_list(parameters):
        if q.grad is not None:
            q.grad.clamp_(min=-v, max=v)
