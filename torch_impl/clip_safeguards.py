"""The safeguards of charclip.torch.clipping: what makes torch's formula safe where torch is wrong.

`torch_impl/clipping.py` is the algorithm: measure, take `coefficient(norm, tau,
convention)`, scale. This module is how each step is made safe (docs/clipping.md,
"Where ours departs"), and every factor it applies comes from that one `coefficient`:

- measuring: torch's own kernels, grouped by device and dtype as torch groups them;
  a norm that overflowed or underflowed is measured again, wide (float64, in chunks,
  on g * 2**-e for float64 gradients); float16/bfloat16 are always measured wide;
- scaling: the coefficient of the wide norm in float64, rounded into the gradient's
  dtype toward zero for float16/bfloat16 (rounding cannot raise the norm);
- the strict bound: the clipped gradient measured again in float64 and scaled once more
  where that does not prove its norm <= tau.

Nothing here is public API; `charclip.torch.clipping` is.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from charclip.torch import clipping

_CHUNK = (
    1 << 14
)  # float64 re-measurement in chunks: error (chunk + n / chunk) ulps, and fast on the CPU


def as_list(tensors: clipping.Tensors) -> list[torch.Tensor]:
    return [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)


def _is_low_precision(dtype: torch.dtype) -> bool:
    return torch.finfo(dtype).bits < 32


class Grouped:
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
    """Whether reading a value on `device` is free (no wait for a device queue to drain).
    Not while torch.compile traces: a branch on a value would break the graph."""
    return device.type == "cpu" and not torch.compiler.is_compiling()


def _foreach_devices() -> tuple[str, ...]:
    # The device types torch's own foreach kernels serve (torch/utils/_foreach_utils.py).
    return ("cpu", "cuda", "xpu", "mtia", torch._C._get_privateuse1_backend_name())


def use_foreach(tensors: list[torch.Tensor], device: torch.device, foreach: bool | None) -> bool:
    """torch's rule: None means foreach where the device and plain tensors allow it."""
    supported = device.type in _foreach_devices() and not torch.jit.is_scripting()
    if foreach is None:
        return supported and all(type(t) is torch.Tensor for t in tensors)
    if foreach and not supported:
        raise RuntimeError(
            f"foreach=True was passed, but can't use the foreach API on {device.type} tensors"
        )
    return bool(foreach)


def _per_tensor_norms(g: Grouped, p, foreach, dtype=None) -> list[torch.Tensor]:
    norms: list[torch.Tensor] = []
    for (device, _), ts in g.groups.items():
        if use_foreach(ts, device, foreach):
            norms.extend(torch._foreach_norm(ts, p, dtype=dtype))
        else:
            norms.extend(torch.linalg.vector_norm(t, p, dtype=dtype) for t in ts)
    return norms


def _norm_of_norms(norms: list[torch.Tensor], p: float, device: torch.device) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), p)


def _mul_(g: Grouped, factor: torch.Tensor, foreach: bool | None) -> None:
    for (device, _), ts in g.groups.items():
        f = factor.to(device)
        if use_foreach(ts, device, foreach):
            torch._foreach_mul_(ts, f)
        else:
            for t in ts:
                t.mul_(f)


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


def measured(norm: torch.Tensor) -> _Measure:
    """A norm taken as it is (scale 1); finite exactly when every entry is."""
    return _Measure(norm, norm, _ONE)


def _wide_norm(g: Grouped, p: float, foreach) -> tuple[torch.Tensor, torch.Tensor]:
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
        top = _norm_of_norms(
            _per_tensor_norms(Grouped(chunks), math.inf, foreach, torch.float64), math.inf, g.device
        )
        _, exponent = torch.frexp(top)  # 0 for a zero, inf or nan maximum: scale 1
        scale = torch.exp2(-exponent.clamp(-1021, 1021).to(torch.float64))
        chunks = [c.double() * scale.to(c.device) for c in chunks]
    return _norm_of_norms(
        _per_tensor_norms(Grouped(chunks), p, foreach, torch.float64), p, g.device
    ), scale


def _result_dtype(g: Grouped) -> torch.dtype:
    dtype = torch.float32  # float16/bfloat16 norms are returned as float32, not rounded to 3 digits
    for _, d in g.groups:
        dtype = torch.promote_types(dtype, d)
    return dtype


def measure(g: Grouped, p: float, foreach: bool | None) -> _Measure:
    if math.isinf(p) and any(t.numel() == 0 for t in g.tensors):
        # torch's foreach inf-norm refuses empty tensors; they hold no maximum
        nonempty = [t for t in g.tensors if t.numel()]
        if not nonempty:
            return measured(torch.zeros((), device=g.device))
        g = Grouped(nonempty)
    if g.low:
        scaled, scale = _wide_norm(g, p, foreach)
        return _Measure((scaled / scale).to(_result_dtype(g)), scaled, scale)
    fast = _norm_of_norms(_per_tensor_norms(g, p, foreach), p, g.device)  # torch's own norm
    floor = _trust_floor(fast.dtype, p)
    if g.on_cpu:
        if floor <= float(fast) < math.inf:  # reading a CPU tensor is no device sync
            return measured(fast)
        scaled, scale = _wide_norm(g, p, foreach)
        return _Measure((scaled / scale).to(fast.dtype), scaled, scale)
    scaled, scale = _wide_norm(g, p, foreach)
    trusted = (fast >= floor) & (fast < math.inf)
    return _Measure(
        torch.where(trusted, fast, (scaled / scale).to(fast.dtype)),
        torch.where(trusted, fast.double(), scaled),
        torch.where(trusted, 1.0, scale),
    )


def _finite(m: _Measure) -> torch.Tensor:
    return torch.isfinite(m.scaled)  # the scaled norm is finite iff every entry is


def raise_if_nonfinite(m: _Measure, p: float) -> None:
    if not _finite(m):
        raise clipping.NonFiniteGradientError(
            f"The total norm of order {p} for gradients from `parameters` is non-finite (a gradient entry "
            "is NaN or infinite), so it cannot be clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`"
        )


def count_nonzero(tensors: list[torch.Tensor], error_if_nonfinite: bool) -> torch.Tensor:
    """The 0-"norm" of all tensors as one vector: how many entries are not zero."""
    if error_if_nonfinite and not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise clipping.NonFiniteGradientError(
            "The total norm of order 0.0 for gradients from `parameters` is non-finite (a gradient entry is NaN or infinite)"
        )
    device = tensors[0].device
    return sum(torch.count_nonzero(t).to(device) for t in tensors).to(
        _result_dtype(Grouped(tensors))
    )


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


def _clip_wide_(g: Grouped, m: _Measure, max_norm: float, convention: str) -> None:
    """The careful path: each gradient times a power of two and a float64 coefficient,
    rounded into its dtype (toward zero for float16/bfloat16, so rounding cannot raise the norm)."""
    c = clipping.coefficient(m.scaled, max_norm, convention, scale=m.scale)
    keep, k = c.keep, c.tau / c.divisor  # g' = (g * scale) * k, in float64
    for t in g.tensors:
        wide = (t.double() * m.scale.to(t.device)) * k.to(t.device)
        new = _round_toward_zero(wide, t.dtype) if _is_low_precision(t.dtype) else wide.to(t.dtype)
        t.copy_(torch.where(keep.to(t.device), t, new))


def clip_(g: Grouped, m: _Measure, max_norm: float, convention: str, foreach, p: float) -> None:
    """Scale the gradients in place by the convention's coefficient for the measured norm."""
    if g.low:
        _clip_wide_(g, m, max_norm, convention)
        # The float32 norm may be a few ulps low: check the rounded result in float64.
        enforce_bound_(g, max_norm, p, foreach, exact=False)
        return
    largest = _largest(m.norm.dtype, max_norm)
    if g.on_cpu and not float(m.norm) < largest and math.isfinite(float(m.scaled)):
        _clip_wide_(g, m, max_norm, convention)
        return
    # Below, the libraries' own formulas on the measured norm (on an accelerator also for a
    # huge norm, with the coefficient from float64: see docs/divergences.md).
    n = m.norm
    if convention == "torch":
        c = clipping.coefficient(n, max_norm, convention)
        if g.on_cpu:
            if bool(c.keep):  # c = 1 changes no bit: on the CPU, the usual unclipped step is free
                return
            _mul_(g, c.ratio, foreach)
            return
        ordinary = (n < largest) | ~_finite(m)
        wide = clipping.coefficient(m.scaled, max_norm, convention, scale=m.scale)
        _mul_(g, torch.where(ordinary, c.factor(), wide.factor(m.scale).to(n.dtype)), foreach)
        return
    # optax: (g / n) * tau, divide then multiply as optax writes it; by 1 and 1 where g is kept.
    if g.on_cpu:
        # Decided on the host (reading a CPU value is free); c.divisor is float(n), so the
        # tensor n divides (foreach kernels take 0-dim tensors faster than Python scalars).
        c = clipping.coefficient(float(n), max_norm, convention)
        if c.keep:
            return
        divisor, factor = n, torch.full_like(n, c.tau)
    else:
        c, one = clipping.coefficient(n, max_norm, convention), torch.ones_like(n)
        divisor, factor = torch.where(c.keep, one, c.divisor), torch.where(c.keep, one, max_norm)
    for (device, _), ts in g.groups.items():
        if use_foreach(ts, device, foreach):
            torch._foreach_div_(ts, divisor.to(device))
            torch._foreach_mul_(ts, factor.to(device))
        else:
            for t in ts:
                t.div_(divisor.to(device)).mul_(factor.to(device))


def enforce_bound_(g: Grouped, max_norm: float, p: float, foreach, *, exact: bool) -> None:
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
    norm = scaled / scale
    shrink = _shrink(g.numel(), p)
    if not bool(norm > (max_norm * shrink if exact else max_norm)):  # False for NaN: left as is
        return
    c = clipping.coefficient(
        norm, max_norm * shrink, "optax"
    )  # tau' / norm: the norm is above tau'
    k = c.tau / c.divisor
    for (device, dtype), ts in g.groups.items():
        info = torch.finfo(dtype)
        if _is_low_precision(dtype) or max_norm < 8 * math.sqrt(g.numel()) * info.smallest_normal:
            for t in ts:
                t.copy_(_round_toward_zero(t.double() * k.to(device), dtype))
            continue
        factor = (k * (1 - 4 * info.eps)).to(device=device, dtype=dtype)  # eps = 2u
        if use_foreach(ts, device, foreach):
            torch._foreach_mul_(ts, factor)
        else:
            for t in ts:
                t.mul_(factor)


def zero_if_nonfinite_(g: Grouped, m: _Measure) -> None:
    finite = _finite(m)
    if g.on_cpu:
        if not finite:
            for t in g.tensors:
                t.zero_()
        return
    for t in g.tensors:
        t.masked_fill_(~finite.to(t.device), 0.0)
