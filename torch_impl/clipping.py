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
- float16/bfloat16 gradients are measured and scaled in float32 and rounded toward
  zero into their dtype, so the clipped norm is <= tau after rounding;
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

TORCH_EPS = 1e-6  # the epsilon PyTorch adds to the norm before dividing
LOW_PRECISION_MARGIN = 2.0**-20  # shrink for float16/bfloat16 results; below their ulp
CONVENTIONS = ("optax", "torch")
NONFINITE_POLICIES = ("propagate", "skip", "error")

Tensors = torch.Tensor | Iterable[torch.Tensor]


def _check_threshold(name: str, value: float) -> float:
    value = float(value)
    if math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be >= 0 (got {value}); a negative threshold would flip the gradient's sign.")
    return value


def _check_norm_type(norm_type: float) -> float:
    p = float(norm_type)
    if not p >= 1:
        raise ValueError(
            f"norm_type must be >= 1 or inf (got {norm_type}); below 1 it is not a norm "
            "(norm_type=0 counts non-zeros) and cannot bound a gradient."
        )
    return p


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))} (got {value!r}).")
    return value


def _is_low_precision(dtype: torch.dtype) -> bool:
    return torch.finfo(dtype).bits < 32


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
    limit = 126 if acc == torch.float32 else 1022  # maxexp - 2
    return torch.exp2(-exponent.clamp(-limit, limit).to(acc))


def _scaled_norm(tensors: list[torch.Tensor], scale: torch.Tensor, p: float) -> torch.Tensor:
    """||g * scale||_p as torch measures it: the p-norm of the per-tensor p-norms."""
    acc = scale.dtype
    norms = [torch.linalg.vector_norm(t.to(acc) * scale, p) for t in tensors]
    return torch.linalg.vector_norm(torch.stack(norms), p)


def _measure(tensors: list[torch.Tensor], p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(scaled norm, scale); the norm is scaled_norm / scale."""
    acc = _accumulation_dtype(tensors)
    scale = _power_of_two_scale(tensors, acc)
    return _scaled_norm(tensors, scale, p), scale


def _nonempty(tensors: Tensors) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    return [t for t in tensors if t.numel() > 0]


@torch.no_grad()
def global_norm(tensors: Tensors, norm_type: float = 2) -> torch.Tensor:
    """||g||_p of all tensors viewed as one vector, accumulated in float32 or wider.

    Measured on g * 2**-e (exact), so a finite gradient has a finite norm whenever the
    norm itself is representable. Returns tensor(0.) when there is nothing to measure.
    """
    p = _check_norm_type(norm_type)
    tensors = _nonempty(tensors)
    if not tensors:
        return torch.tensor(0.0)
    scaled_norm, scale = _measure(tensors, p)
    return scaled_norm / scale


def _clipped(grad, scale, scaled_norm, norm, max_norm, convention, shrink):
    """One clipped gradient, computed in the accumulation dtype (the formulas are the
    libraries' own, so the bits agree)."""
    g = grad.to(norm.dtype)
    if convention == "optax":
        # A zero gradient stays zero, also for max_norm == 0, where optax computes 0 / 0.
        keep = (norm < max_norm) | (norm == 0)
        clipped = torch.where(keep, g, (g / norm) * max_norm * shrink)
    else:
        # Clamp rather than branch on coef < 1: a branch would sync with the device.
        coef = torch.clamp(max_norm / (norm + TORCH_EPS), max=1.0)
        clipped = g * torch.where(coef < 1, coef * shrink, coef)
    # A norm too large for the dtype (inf while every entry is finite): the direction
    # still comes out right from the scaled gradient, (g * 2**-e) / (n * 2**-e).
    overflowed = torch.isinf(norm) & torch.isfinite(scaled_norm)
    return torch.where(overflowed, (g * scale) / scaled_norm * max_norm * shrink, clipped)


def _round_toward_zero(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round x into `dtype` so that |result| <= |x|: rounding cannot raise the norm."""
    nearest = x.to(dtype)
    away = nearest.to(x.dtype).abs() > x.abs()
    return torch.where(away, torch.nextafter(nearest, torch.zeros_like(nearest)), nearest)


def _into_dtype(clipped: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if _is_low_precision(dtype):
        return _round_toward_zero(clipped, dtype)
    return clipped.to(dtype)


def _rounded_down(value: float, dtype: torch.dtype) -> float:
    """The largest value of `dtype` that is <= value, so a comparison in `dtype` is safe."""
    down = torch.tensor(value, dtype=dtype)
    if down.item() > value:
        down = torch.nextafter(down, torch.zeros_like(down))
    return down.item()


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
    max_norm = _check_threshold("max_norm", max_norm)
    p = _check_norm_type(norm_type)
    _check_choice("convention", convention, CONVENTIONS)
    _check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = _nonempty([q.grad for q in parameters if q.grad is not None])
    if not grads:
        return torch.tensor(0.0)
    scaled_norm, scale = _measure(grads, p)
    norm = scaled_norm / scale
    finite = torch.isfinite(scaled_norm)  # the scaled norm is finite iff every entry is
    if nonfinite == "error" and not finite:
        raise FloatingPointError(
            f"gradient norm is {norm.item()}: a gradient entry is NaN or infinite; lower the learning rate or check the loss."
        )
    new = [_into_dtype(_clipped(g, scale, scaled_norm, norm, max_norm, convention, 1), g.dtype) for g in grads]
    if any(_is_low_precision(g.dtype) for g in grads):
        # Rounding toward zero cannot raise the norm, but the float32 factor may be a few
        # ulps high. Check the rounded result; if it is above tau, use a factor shrunk by
        # 2**-20 (invisible at float16/bfloat16 resolution) instead.
        shrink = 1 - LOW_PRECISION_MARGIN
        within = global_norm(new, p) <= _rounded_down(max_norm, norm.dtype)
        new = [
            torch.where(within, n, _into_dtype(_clipped(g, scale, scaled_norm, norm, max_norm, convention, shrink), g.dtype))
            if _is_low_precision(g.dtype)
            else n
            for g, n in zip(grads, new)
        ]
    if nonfinite != "propagate":
        new = [torch.where(finite, n, torch.zeros_like(n)) for n in new]
    for g, n in zip(grads, new):
        g.copy_(n)
    return norm


@torch.no_grad()
def clip_grad_value_(parameters: Tensors, clip_value: float) -> None:
    """Clamp every `.grad` entry to [-clip_value, clip_value] in place (changes the direction)."""
    v = _check_threshold("clip_value", clip_value)
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    for q in parameters:
        if q.grad is not None:
            q.grad.clamp_(min=-v, max=v)
