"""Gradient clipping by global norm and by value: a drop-in for `torch.nn.utils`' own.

`clip_grad_norm_`, `get_total_norm`, `clip_grads_with_norm_` and `clip_grad_value_`
take torch's arguments (torch 2.6+), return what torch returns and raise what torch
raises; charclip's extras (`convention=`, `nonfinite=`, `strict=`) are keyword-only.
The math is written once, in docs/clipping.md. For a gradient g (all `.grad` tensors
viewed as one vector), a threshold tau and a norm order p:

    n = ||g||_p   (the norm of the per-tensor norms, as torch measures it)
    torch convention (default):  g' = g * min(1, tau / (n + 1e-6))
    optax convention:            g' = g  if n < tau (strict), else (g / n) * tau

Where torch's answer is right, ours is torch's, bit for bit: the same kernels
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
  raise ValueError.

`strict=True` makes the promise literal for every dtype: the clipped gradient's exact
norm is <= tau. It measures the result again in float64 and, where that is not
provably <= tau, scales once more, rounding so that no entry can grow. This also
corrects torch's own float32 norm of a large CPU tensor, which the default reproduces
(one float32 accumulator per thread: 1.1% low for 1e8 entries, pytorch#169237).

Nothing on the fast path branches on a device tensor's value: a branch would make the
host wait for the device on every step. On the CPU, where reading a value costs
nothing, the float64 re-measurement runs only when torch's norm is untrustworthy;
elsewhere it runs every time and the coefficient is chosen with `torch.where`.

Non-finite gradients (`nonfinite=`):
    "propagate"  what torch does: NaN/inf spread through the gradients;
    "skip"       every gradient is set to zero; the returned norm is not finite, so
                 `not torch.isfinite(norm)` tells the loop to skip (and count) the step;
    "error"      raise NonFiniteGradientError (a RuntimeError, as torch raises for
                 `error_if_nonfinite=True`, which means the same) before any gradient
                 is touched.
"""

from __future__ import annotations

import functools
import math
import types
import warnings
from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from charclip.clipspec import (
    CONVENTIONS,
    NONFINITE_POLICIES,
    TORCH_EPS,
    check_choice,
    check_threshold,
)

Tensors = torch.Tensor | Iterable[torch.Tensor]

_CHUNK = 1 << 14  # float64 re-measurement in chunks: error (chunk + n / chunk) ulps, and fast on the CPU


class NonFiniteGradientError(RuntimeError, FloatingPointError):
    """A gradient entry is NaN or infinite. A RuntimeError, which torch raises for
    `error_if_nonfinite=True`; a FloatingPointError, which charclip raised before."""


def _norm_order(norm_type, *, clipping: bool) -> float:
    """p as a float; p in (0, 1) is a quasi-norm, >= the 2-norm, so clipping by it bounds the step."""
    p = float(norm_type)
    if math.isnan(p) or p < 0 or (p == 0 and clipping):
        raise ValueError(
            f"norm_type must be > 0 or inf (got {norm_type}): below 0 it measures the smallest entries, and "
            "norm_type=0 counts non-zero entries, which no scaling changes, so neither can bound a gradient."
        )
    return p


def _as_list(tensors: Tensors) -> list[torch.Tensor]:
    return [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)


def _is_low_precision(dtype: torch.dtype) -> bool:
    return torch.finfo(dtype).bits < 32


class _Grouped:
    """Tensors by (device, dtype), in the order torch's clipping groups them (the order of
    the per-tensor norms in the final norm, so it decides the last bit), and what the rest
    of this module asks about them, found once. (torch's grouping helper is private but
    has served its clipping and optimizers since torch 2.0.)"""

    def __init__(self, tensors: list[torch.Tensor]):
        self.tensors = tensors
        grouped = _group_tensors_by_device_and_dtype([tensors])
        self.groups = {key: list(lists[0]) for key, (lists, _) in grouped.items()}
        self.device = tensors[0].device
        self.on_cpu = all(_host_readable(device) for device, _ in self.groups)
        self.low = any(_is_low_precision(dtype) for _, dtype in self.groups)
        self.has_float64 = any(dtype == torch.float64 for _, dtype in self.groups)

    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors)


def _host_readable(device: torch.device) -> bool:
    """Whether reading a value on `device` is free (no wait for a device queue to drain)."""
    return device.type == "cpu"


def _foreach_devices() -> tuple[str, ...]:
    # The device types torch's own foreach kernels serve (torch/utils/_foreach_utils.py).
    return ("cpu", "cuda", "xpu", "mtia", torch._C._get_privateuse1_backend_name())


def _use_foreach(tensors: list[torch.Tensor], device: torch.device, foreach: bool | None) -> bool:
    """torch's rule: None means foreach where the device and plain tensors allow it."""
    supported = device.type in _foreach_devices() and not torch.jit.is_scripting()
    if foreach is None:
        return supported and all(type(t) is torch.Tensor for t in tensors)
    if foreach and not supported:
        raise RuntimeError(f"foreach=True was passed, but can't use the foreach API on {device.type} tensors")
    return bool(foreach)


def _per_tensor_norms(g: _Grouped, p, foreach, dtype=None) -> list[torch.Tensor]:
    norms: list[torch.Tensor] = []
    for (device, _), ts in g.groups.items():
        if _use_foreach(ts, device, foreach):
            norms.extend(torch._foreach_norm(ts, p, dtype=dtype))
        else:
            norms.extend(torch.linalg.vector_norm(t, p, dtype=dtype) for t in ts)
    return norms


def _norm_of_norms(norms: list[torch.Tensor], p: float, device: torch.device) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), p)


def _mul_(g: _Grouped, factor: torch.Tensor, foreach: bool | None) -> None:
    for (device, _), ts in g.groups.items():
        f = factor.to(device)
        if _use_foreach(ts, device, foreach):
            torch._foreach_mul_(ts, f)
        else:
            for t in ts:
                t.mul_(f)


@functools.cache
def _trust_floor(dtype: torch.dtype, p: float) -> float:
    """Below this norm, p-th powers of the entries may have been subnormal and torch's norm
    may have lost digits. Each such power is off by at most the smallest subnormal; at
    n**p >= 2**56 * smallest subnormal, 2**31 of them stay below one ulp of n**p."""
    if p <= 1 or math.isinf(p):
        return 0.0
    info = torch.finfo(dtype)
    return 2.0 ** ((math.log2(info.smallest_normal * info.eps) + 56) / p)


def _largest(dtype: torch.dtype, max_norm: float) -> float:
    """From this norm on, max_norm / norm may be subnormal in `dtype` (or the norm overflowed):
    the coefficient has lost digits, so the clip is done in float64 instead."""
    return 2.0 ** (math.frexp(torch.finfo(dtype).max)[1] - 2) * min(1.0, max_norm)


class _Measure(NamedTuple):
    """The norm that get_total_norm returns, and the same norm as `scaled / scale` in
    float64, where `scale` is a power of two (1 unless float64 entries needed it): so
    `scaled` is finite whenever every entry is, even where `norm` overflowed."""

    norm: torch.Tensor
    scaled: torch.Tensor
    scale: torch.Tensor


_ONE = torch.ones((), dtype=torch.float64)  # a CPU scalar: torch lets it meet tensors on any device


def _measured(norm: torch.Tensor) -> _Measure:
    """A norm taken as it is (scale 1); finite exactly when every entry is."""
    return _Measure(norm, norm, _ONE)


def _wide_norm(g: _Grouped, p: float, foreach) -> tuple[torch.Tensor, torch.Tensor]:
    """(||g * scale||_p in float64, scale), from chunks of at most _CHUNK entries.

    p-th powers of float32 and narrower entries can neither overflow nor underflow in
    float64. float64 entries are first scaled by 2**-e, with max|g| = f * 2**e and
    f in [0.5, 1) (exact), so theirs cannot either.
    """
    one = torch.ones((), dtype=torch.float64, device=g.device)
    chunks = [c for t in g.tensors for c in t.reshape(-1).split(_CHUNK) if c.numel()]
    if not chunks:
        return torch.zeros_like(one), one
    scale = one
    if g.has_float64:
        top = _norm_of_norms(_per_tensor_norms(_Grouped(chunks), math.inf, foreach, torch.float64), math.inf, g.device)
        _, exponent = torch.frexp(top)  # 0 for a zero, inf or nan maximum: scale 1
        scale = torch.exp2(-exponent.clamp(-1021, 1021).to(torch.float64))
        chunks = [c.double() * scale.to(c.device) for c in chunks]
    return _norm_of_norms(_per_tensor_norms(_Grouped(chunks), p, foreach, torch.float64), p, g.device), scale


def _result_dtype(g: _Grouped) -> torch.dtype:
    dtype = torch.float32  # float16/bfloat16 norms are returned as float32, not rounded to 3 digits
    for _, d in g.groups:
        dtype = torch.promote_types(dtype, d)
    return dtype


def _measure(g: _Grouped, p: float, foreach: bool | None) -> _Measure:
    if math.isinf(p) and any(t.numel() == 0 for t in g.tensors):
        # torch's foreach inf-norm refuses empty tensors; they hold no maximum
        nonempty = [t for t in g.tensors if t.numel()]
        if not nonempty:
            return _measured(torch.zeros((), device=g.device))
        g = _Grouped(nonempty)
    if g.low:
        scaled, scale = _wide_norm(g, p, foreach)
        return _Measure((scaled / scale).to(_result_dtype(g)), scaled, scale)
    fast = _norm_of_norms(_per_tensor_norms(g, p, foreach), p, g.device)  # torch's own norm
    floor = _trust_floor(fast.dtype, p)
    if g.on_cpu:
        if floor <= float(fast) < math.inf:  # reading a CPU tensor is no device sync
            return _measured(fast)
        scaled, scale = _wide_norm(g, p, foreach)
        return _Measure((scaled / scale).to(fast.dtype), scaled, scale)
    scaled, scale = _wide_norm(g, p, foreach)
    trusted = (fast >= floor) & (fast < math.inf)
    return _Measure(torch.where(trusted, fast, (scaled / scale).to(fast.dtype)),
                    torch.where(trusted, fast.double(), scaled), torch.where(trusted, 1.0, scale))


def _finite(m: _Measure) -> torch.Tensor:
    return torch.isfinite(m.scaled)  # the scaled norm is finite iff every entry is


def _raise_if_nonfinite(m: _Measure, p: float) -> None:
    if not _finite(m):
        raise NonFiniteGradientError(
            f"The total norm of order {p} for gradients from `parameters` is non-finite (a gradient entry "
            "is NaN or infinite), so it cannot be clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`"
        )


def _count_nonzero(tensors: list[torch.Tensor], error_if_nonfinite: bool) -> torch.Tensor:
    """The 0-"norm" of all tensors as one vector: how many entries are not zero."""
    if error_if_nonfinite and not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise NonFiniteGradientError(
            "The total norm of order 0.0 for gradients from `parameters` is non-finite (a gradient entry is NaN or infinite)"
        )
    device = tensors[0].device
    return sum(torch.count_nonzero(t).to(device) for t in tensors).to(_result_dtype(_Grouped(tensors)))


def get_total_norm(tensors: Tensors, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                   foreach: bool | None = None) -> torch.Tensor:
    """||g||_p of `tensors` viewed as one vector: the p-norm of the per-tensor p-norms.

    torch's `get_total_norm`, with torch's bits wherever torch's norm is right. Where
    torch's overflows or underflows, the norm is measured again in float64;
    float16/bfloat16 tensors are always measured in float64, and their norm is float32.
    norm_type=0 counts the non-zero entries (torch counts non-zero tensors); below 0
    raises ValueError. A NaN or infinite entry raises NonFiniteGradientError (a
    RuntimeError) when `error_if_nonfinite`.
    """
    with torch.no_grad():
        tensors = _as_list(tensors)
        p = _norm_order(norm_type, clipping=False)
        if not tensors:
            return torch.tensor(0.0)
        if p == 0:
            return _count_nonzero(tensors, error_if_nonfinite)
        m = _measure(_Grouped(tensors), p, foreach)
        if error_if_nonfinite:
            _raise_if_nonfinite(m, p)
        return m.norm


def _wide_factor(m: _Measure, max_norm: float, convention: str, shrink: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, k) in float64: g' = g where keep, else g' = (g * scale) * k, k being the
    convention's coefficient (times `shrink`, below 1 where the bound must be exact)."""
    norm = m.scaled / m.scale  # may be inf while `scaled` is finite
    tau = max_norm * shrink
    if convention == "optax":
        # A zero gradient stays zero, also for max_norm == 0, where optax computes 0 / 0.
        return (norm < tau) | (norm == 0), tau / m.scaled
    return tau >= norm + TORCH_EPS, tau / (m.scaled + TORCH_EPS * m.scale)


def _round_toward_zero(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (float64) into `dtype` with |result| <= |x|: rounding cannot raise the norm.
    float64 itself: one step toward zero, as x was already rounded to nearest."""
    if dtype == torch.float64:
        return torch.nextafter(x, torch.zeros_like(x))
    nearest = x.to(dtype)
    away = nearest.to(x.dtype).abs() > x.abs()
    return torch.where(away, torch.nextafter(nearest, torch.zeros_like(nearest)), nearest)


def _shrink(n_entries: int, p: float) -> float:
    """1 minus a bound on the relative error of a chunked float64 norm (recursive sums
    within and across chunks), with room for the coefficient's and products' roundings
    (general p: for pow and its root, which torch's kernel gets 14 ulps off)."""
    room = 16 if p in (1.0, 2.0, math.inf) else 64
    return 1.0 - (_CHUNK + n_entries / _CHUNK + room) * 2.0**-52


def _clip_wide_(g: _Grouped, m: _Measure, max_norm: float, convention: str) -> None:
    """The careful path: each gradient times a power of two and a float64 coefficient,
    rounded into its dtype (toward zero for float16/bfloat16, so rounding cannot raise the norm)."""
    keep, k = _wide_factor(m, max_norm, convention, 1.0)
    for t in g.tensors:
        wide = (t.double() * m.scale.to(t.device)) * k.to(t.device)
        new = _round_toward_zero(wide, t.dtype) if _is_low_precision(t.dtype) else wide.to(t.dtype)
        t.copy_(torch.where(keep.to(t.device), t, new))


def _clip_(g: _Grouped, m: _Measure, max_norm: float, convention: str, foreach, p: float) -> None:
    """Scale the gradients in place by the convention's coefficient for the measured norm."""
    if g.low:
        _clip_wide_(g, m, max_norm, convention)
        # The float32 norm may be a few ulps low: check the rounded result in float64.
        _enforce_bound_(g, max_norm, p, foreach, exact=False)
        return
    largest = _largest(m.norm.dtype, max_norm)
    if g.on_cpu and not float(m.norm) < largest and math.isfinite(float(m.scaled)):
        _clip_wide_(g, m, max_norm, convention)
        return
    # Below, the libraries' own formulas on the measured norm (on an accelerator also for a
    # huge norm, with the coefficient from float64: see docs/divergences.md).
    n = m.norm
    if convention == "torch":
        # Clamp rather than branch on coef < 1: a branch would sync with the device.
        coef = torch.clamp(max_norm / (n + TORCH_EPS), max=1.0)
        if not g.on_cpu:
            ordinary = (n < largest) | ~_finite(m)
            keep, k = _wide_factor(m, max_norm, convention, 1.0)
            coef = torch.where(ordinary, coef, torch.where(keep, 1.0, k * m.scale).to(coef.dtype))
        elif float(coef) == 1.0:  # multiplying by 1 changes no bit: on the CPU, the usual unclipped step is free
            return
        _mul_(g, coef, foreach)
        return
    # optax: (g / n) * tau, divide then multiply as optax writes it; by 1 and 1 where g is kept.
    if g.on_cpu:
        if float(n) < max_norm or float(n) == 0:
            return
        divisor, factor = n, torch.full_like(n, max_norm)
    else:
        keep, one = (n < max_norm) | (n == 0), torch.ones_like(n)
        divisor, factor = torch.where(keep, one, n), torch.where(keep, one, max_norm)
    for (device, _), ts in g.groups.items():
        if _use_foreach(ts, device, foreach):
            torch._foreach_div_(ts, divisor.to(device))
            torch._foreach_mul_(ts, factor.to(device))
        else:
            for t in ts:
                t.div_(divisor.to(device)).mul_(factor.to(device))


def _enforce_bound_(g: _Grouped, max_norm: float, p: float, foreach, *, exact: bool) -> None:
    """Measure the clipped gradients in float64; where that norm is above max_norm (exact:
    where it does not prove the exact norm <= max_norm), scale them once more, by
    k = max_norm * shrink / measured. (One host sync, also on an accelerator; the second
    scaling runs only when needed.)

    float32/float64 tensors are multiplied in place by k * (1 - 8u), rounded to their dtype
    (u its unit roundoff): each product then rounds to at most |g_i| * k. float16/bfloat16
    tensors, and norms so small that products could be subnormal (absolute rounding
    errors), are scaled in float64 and rounded toward zero instead.
    """
    scaled, scale = _wide_norm(g, p, foreach)
    measured = scaled / scale
    shrink = _shrink(g.numel(), p)
    if not bool(measured > (max_norm * shrink if exact else max_norm)):  # False for NaN: left as is
        return
    k = max_norm * shrink / measured
    for (device, dtype), ts in g.groups.items():
        info = torch.finfo(dtype)
        if _is_low_precision(dtype) or max_norm < 8 * math.sqrt(g.numel()) * info.smallest_normal:
            for t in ts:
                t.copy_(_round_toward_zero(t.double() * k.to(device), dtype))
            continue
        factor = (k * (1 - 4 * info.eps)).to(device=device, dtype=dtype)  # eps = 2u
        if _use_foreach(ts, device, foreach):
            torch._foreach_mul_(ts, factor)
        else:
            for t in ts:
                t.mul_(factor)


def _zero_if_nonfinite_(g: _Grouped, m: _Measure) -> None:
    finite = _finite(m)
    if g.on_cpu:
        if not finite:
            for t in g.tensors:
                t.zero_()
        return
    for t in g.tensors:
        t.masked_fill_(~finite.to(t.device), 0.0)


def clip_grad_norm_(parameters: Tensors, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                    foreach: bool | None = None, *, convention: str = "torch", nonfinite: str = "propagate",
                    strict: bool = False) -> torch.Tensor:
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
                warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=2)
        max_norm = check_threshold("max_norm", max_norm)
        p = _norm_order(norm_type, clipping=True)
        check_choice("convention", convention, CONVENTIONS)
        check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        if error_if_nonfinite:
            if nonfinite == "skip":
                raise ValueError('error_if_nonfinite=True and nonfinite="skip" contradict each other; pass one.')
            nonfinite = "error"
        grads = [q.grad for q in parameters if q.grad is not None]
        if not grads:
            return torch.tensor(0.0)
        g = _Grouped(grads)
        m = _measure(g, p, foreach)
        if nonfinite == "error":
            _raise_if_nonfinite(m, p)
        _clip_(g, m, max_norm, convention, foreach, p)
        if strict:
            _enforce_bound_(g, max_norm, p, foreach, exact=True)
        if nonfinite == "skip":
            _zero_if_nonfinite_(g, m)
        return m.norm


def clip_grads_with_norm_(parameters: Tensors, max_norm: float, total_norm: torch.Tensor,
                          foreach: bool | None = None, *, convention: str = "torch") -> None:
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
        _clip_(_Grouped(grads), _measured(torch.as_tensor(total_norm)), max_norm, convention, foreach, 2.0)


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
        for (device, _), ts in _Grouped(grads).groups.items():
            if _use_foreach(ts, device, foreach):
                torch._foreach_clamp_min_(ts, -v)
                torch._foreach_clamp_max_(ts, v)
            else:
                for t in ts:
                    t.clamp_(min=-v, max=v)


global_norm = get_total_norm  # the name jax_impl.clipping gives the same measurement
