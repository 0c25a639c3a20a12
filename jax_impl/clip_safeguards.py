"""The safeguards of charclip.jax.clipping: what makes optax's formula safe where optax is wrong.

`jax_impl/clipping.py` is the algorithm: measure, take `coefficient(norm, tau,
convention)`, scale. This module is how each step is made safe (docs/clipping.md,
"Where ours departs"), and every factor it applies comes from that one `coefficient`:

- measuring: optax's sum of squares, measured again (float32 squares in float64, or
  g * 2**-e) only where that sum overflowed or may have lost squares to underflow; p
  outside {1, 2, inf} always on g * 2**-e;
- scaling: the libraries' expressions, with the direction taken from the scaled gradient
  where the norm itself overflowed; float16/bfloat16 rounded toward zero;
- the strict bound: an upper bound of the clipped norm, computed in float64, and one
  more scaling (rounded so no entry can grow) where it does not prove the norm <= tau.

Nothing here is public API; `charclip.jax.clipping` is.
"""

import functools
import math
import operator

import jax
import jax.numpy as jnp
from jax import lax

from charclip.clipspec import TORCH_EPS
from charclip.jax import clipping

_F64_UNIT = 2.0**-53  # unit roundoff of float64, where the strict bound is computed


def poison_invalid(tau: jax.Array) -> jax.Array:
    """NaN where tau < 0 or tau is NaN: a traced invalid threshold fails visibly, never flips the step."""
    return jnp.where(tau >= 0, tau, jnp.nan)


def is_low_precision(dtype) -> bool:
    return jnp.finfo(dtype).bits < 32


def concrete_bool(flag) -> bool | None:
    """The value of a scalar flag, or None under `jit`/`vmap`, where it is unknown."""
    try:
        return bool(flag)
    except jax.errors.ConcretizationTypeError:
        return None


def _leaf_sum(u: jax.Array, p: float) -> jax.Array:
    """One leaf's part of ||.||_p before the root: written as optax.tree.norm writes it."""
    if p == math.inf:
        return jnp.max(jnp.abs(u), initial=0)
    if p == 2:
        return jnp.sum(jnp.square(u))
    if p == 1:
        return jnp.sum(jnp.abs(u))
    return jnp.sum(jnp.abs(u) ** p)


def _combine(sums: list[jax.Array], p: float, dtype) -> jax.Array:
    """Leaves' parts added left to right from zero, as optax's tree reduction adds them."""
    zero = jnp.zeros((), dtype)
    return functools.reduce(jnp.maximum if p == math.inf else operator.add, sums, zero)


def _root(total: jax.Array, p: float) -> jax.Array:
    if p in (1, math.inf):
        return total
    return jnp.sqrt(total) if p == 2 else total ** (1 / p)


def _scaled_norm(wide: list[jax.Array], p: float) -> tuple[jax.Array, jax.Array]:
    """(2**-e, ||g * 2**-e||_p) with max|g| = f * 2**e, f in [0.5, 1): no square overflows.

    Multiplying by a power of two is exact. The exponent is clamped so the scale is a
    normal number; a non-finite or zero max|g| gives scale 1.
    """
    max_abs = _combine([jnp.max(jnp.abs(u), initial=0) for u in wide], math.inf, wide[0].dtype)
    return _power_of_two(
        max_abs,
        wide[0].dtype,
        lambda scale: _root(_combine([_leaf_sum(u * scale, p) for u in wide], p, wide[0].dtype), p),
    )


def _power_of_two(x: jax.Array, dtype, scaled_norm) -> tuple[jax.Array, jax.Array]:
    """(2**-e, scaled_norm(2**-e)) with x = f * 2**e, f in [0.5, 1), e clamped to `dtype`'s normal range."""
    _, exponent = jnp.frexp(x)
    limit = jnp.finfo(dtype).maxexp - 2
    scale = jnp.ldexp(jnp.ones((), x.dtype), -jnp.clip(exponent, -limit, limit))
    return scale.astype(dtype), scaled_norm(scale)


def measure(wide: list[jax.Array], p: float, exact_squares: bool) -> tuple[jax.Array, jax.Array]:
    """(scale, scaled norm) of leaves already cast to their accumulation dtype; norm = scaled / scale.

    The fast sum is optax's. It is trusted unless it is not finite or below n * tiny / eps,
    where squares flushed to zero could have lost more than an ulp of it; then a second
    measurement is used: float32 leaves summed in float64 (their squares are exact there
    and can neither overflow nor underflow), float64 leaves measured on g * 2**-e.
    On the CPU the second pass sits in a `lax.cond`, so an ordinary step never runs it
    (measured: a jnp.where computing it always costs 2.4x). Elsewhere a conditional's
    predicate is read on the host, a stall on every step, so it is a `jnp.where`, and
    the float64 sum of float32 leaves is a sibling of optax's reduction (one pass).
    `exact_squares`: narrower floats already widened to float64; their sum is the norm.
    """
    dtype = wide[0].dtype
    if p not in (1, 2, math.inf):
        # x**p and s**(1/p) go through logarithms: 1/p is rounded, so s**(1/p) is off by
        # |ln s| / p ulps (40 ulps at s = 1e-124). On g * 2**-e the sum s lies in [2**-p, n].
        return _scaled_norm(wide, p)
    total = _combine([_leaf_sum(u, p) for u in wide], p, dtype)
    one = jnp.ones((), dtype)
    if p == math.inf or exact_squares:
        return one, _root(total, p)
    info = jnp.finfo(dtype)
    n = sum(u.size for u in wide)
    trusted = jnp.isfinite(total) & (total >= n * float(info.tiny) / float(info.eps))
    fast = _root(total, p)

    def second():
        if dtype == jnp.float32:
            norm64 = _root(
                _combine([_leaf_sum(u.astype(jnp.float64), p) for u in wide], p, jnp.float64), p
            )
            return _power_of_two(norm64, dtype, lambda s: (norm64 * s).astype(dtype))
        return _scaled_norm(wide, p)

    known = concrete_bool(trusted)
    if known is not None:  # eager: a Python branch; ordinary steps run optax's operations, op by op
        return (one, fast) if known else second()

    def selected():
        scale, scaled = second()
        return jnp.where(trusted, one, scale), jnp.where(trusted, fast, scaled)

    return lax.platform_dependent(
        cpu=lambda: lax.cond(trusted, lambda: (one, fast), second), default=selected
    )


def _widest(*dtypes):
    """The widest of these float dtypes, by width: jnp.result_type would be refused under JAX's
    strict dtype promotion, which the tests run."""
    return max((jnp.dtype(d) for d in dtypes), key=lambda d: jnp.finfo(d).bits)


def accumulation_dtype(leaves: list[jax.Array]):
    """float64 when every leaf is float16/bfloat16 (exact squares); else the widest of float32 and the leaves."""
    if all(is_low_precision(leaf.dtype) for leaf in leaves):
        return jnp.dtype(jnp.float64)
    return _widest(jnp.float32, *(leaf.dtype for leaf in leaves))


def norm_dtype(leaves: list[jax.Array]):
    """The dtype of the returned norm: float32 for float16/bfloat16 gradients, else the accumulation dtype."""
    return _widest(jnp.float32, *(leaf.dtype for leaf in leaves))


@functools.partial(
    jax.jit, static_argnums=1
)  # exact operations only, so compiling them changes no bit
def _round_toward_zero(x: jax.Array, dtype) -> jax.Array:
    """Round x into `dtype` so that |result| <= |x|: rounding cannot raise the norm."""
    nearest = x.astype(dtype)
    away = jnp.abs(nearest.astype(x.dtype)) > jnp.abs(x)
    return jnp.where(away, jnp.nextafter(nearest, jnp.zeros_like(nearest)), nearest)


def _library_clip(leaves, scale, scaled_norm, norm, tau, convention) -> list[jax.Array]:
    """The leaves clipped by the library's formula, in the norm's dtype.

    The coefficient is applied as the libraries write it (`Coefficient.scale_leaf`), so that
    XLA compiles it the same way and the bits agree under `jit` too. Scalars are computed once.
    """
    # A norm of 2**(maxexp - 2) * min(1, tau) or more (up to inf while every entry is
    # finite): 1 / n or tau / n is subnormal, which XLA flushes to zero, or n overflowed.
    # The direction still comes out right from the scaled gradient, (g * 2**-e) / (n * 2**-e).
    largest = 2.0 ** (jnp.finfo(norm.dtype).maxexp - 2) * jnp.minimum(1, tau)
    huge = ~(norm < largest) & jnp.isfinite(scaled_norm) & (scaled_norm > 0)
    c = clipping.coefficient(norm, tau, convention)
    wide = clipping.coefficient(scaled_norm, tau, "optax", scale=scale)  # 1e-6 is nothing there
    out = []
    for leaf in leaves:
        t = leaf.astype(norm.dtype)
        # t is kept as is where c is 1: XLA would flush subnormal entries of t * 1 to zero.
        clipped = jnp.where(c.keep, t, c.scale_leaf(t))
        out.append(jnp.where(huge, wide.scale_leaf(t * scale), clipped))
    return out


def _flushed_tiny(dtype) -> float:
    """The smallest normal of the dtype XLA reads `dtype` through: its subnormals are read as zero.

    XLA on the CPU treats subnormal inputs of float32 (and bfloat16, widened through
    float32) and float64 as zero; float16's subnormals are normal float32 numbers and
    are read exactly (measured).
    """
    return 0.0 if dtype == jnp.float16 else float(jnp.finfo(_widest(dtype, jnp.float32)).tiny)


def _exact_square(tau: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(t2, e2) with t2 + e2 == tau * tau exactly (Dekker's product, Veltkamp's split), float64."""
    t2 = tau * tau
    c = 134217729.0 * tau  # 2**27 + 1
    hi = c - (c - tau)
    lo = tau - hi
    return t2, ((hi * hi - t2) + 2 * hi * lo) + lo * lo


def _certainly_within(
    clipped: list[jax.Array], wide: list[jax.Array], tau: jax.Array, p: float, exact_squares: bool
) -> tuple[jax.Array, jax.Array]:
    """(ok, upper): ok means ||clipped||_p <= tau in exact arithmetic; upper bounds ||clipped||_p.

    `wide` is `clipped` in float64. For p = 2 and narrower floats, every square is exact
    there and the sum S of n of them is within (n - 1) u of the exact sum whatever XLA's
    order (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., 4.2), so
    S (1 + (n + 2) u), plus the share of subnormals XLA read as zero, is compared with
    tau**2 computed exactly: a clipped norm equal to tau (one entry, say) passes.
    Otherwise the norm, with that relative bound widened for x**p and s**(1/p) (a few ulps
    each) and float64's own squares, is compared with tau.
    """
    n = sum(u.size for u in wide)
    if p == 2 and exact_squares:
        total = _combine([jnp.sum(jnp.square(u)) for u in wide], 2, jnp.float64)
        grow = 0.0 if n == 1 else (n + 2) * _F64_UNIT  # one exact square is exact
        high = total * (1 + grow) + sum(c.size * _flushed_tiny(c.dtype) ** 2 for c in clipped)
        t2, e2 = _exact_square(tau)
        return (high < t2) | ((high == t2) & (e2 >= 0)), jnp.sqrt(high) * (1 + 2 * _F64_UNIT)
    scale, scaled = measure(wide, p, exact_squares)
    flushed = max(_flushed_tiny(c.dtype) for c in clipped) * (
        1.0 if p == math.inf else n ** (1 / p)
    )
    upper = (scaled / scale) * (
        1 + (n + (8 if p in (1, 2, math.inf) else 64)) * _F64_UNIT
    ) + flushed
    return upper <= tau, upper


def _enforce_bound(clipped: list[jax.Array], tau: jax.Array, p: float) -> list[jax.Array]:
    """Make the clipped norm, measured exactly, <= tau, changing nothing where it already is.

    The result is measured again in float64 (`_certainly_within`). Where the bound is not
    certain, every leaf is scaled by tau / upper, shrunk by 2**-24 (below a float32 ulp, far
    below a float16/bfloat16 one) and rounded so that rounding cannot lengthen it
    (`_shrink_into`): the new norm is at most tau. `jnp.where`, not `lax.cond`: a cond that
    returns whole gradients copies them (measured 6x slower on the CPU).
    """
    wide = [c.astype(jnp.float64) for c in clipped]
    exact = p in (1, 2) and all(c.dtype != jnp.float64 for c in clipped)
    tau = tau.astype(jnp.float64)
    ok, upper = _certainly_within(clipped, wide, tau, p, exact)
    if concrete_bool(ok):  # eager and already within: the leaves, as the select would return them
        return clipped
    coef = clipping.coefficient(upper, tau, "optax")  # tau / upper where the bound is not certain
    fix = coef.tau / coef.divisor * (1 - 2.0**-24)
    return [_select(ok, c, _shrink_into(w, fix, c.dtype)) for w, c in zip(wide, clipped)]


def _select(pred: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """jnp.where(pred, a, b) for a scalar `pred`, bit for bit in float16/bfloat16 too.

    Under `jit`, XLA on the CPU fused a bfloat16 select with the arithmetic around it and a
    subnormal of `a` came back as zero though `pred` was true (1.06e-38 with the norm far
    below tau; an integer select on the bits did the same). A `lax.cond` hands `a` through
    untouched. Only low-precision leaves take it: a cond copies whole gradients, which
    costs float32/float64 (whose program keeps the float select)."""
    if not is_low_precision(a.dtype):
        return jnp.where(pred, a, b)
    known = concrete_bool(pred)
    if known is not None:  # eager: a Python branch (an eager cond is traced and lowered per call)
        return a if known else b.astype(a.dtype)
    return lax.cond(pred, lambda: a, lambda: b.astype(a.dtype))


def _shrink_into(wide: jax.Array, factor: jax.Array, dtype) -> jax.Array:
    """wide * factor (float64) in `dtype`, never above the exact product in magnitude.

    float64: the factor shrunk by 2 u absorbs the multiply's rounding. float32: shrunk by
    2**-23, so that rounding to nearest (at most 2**-24 up) lands below; cheaper than
    rounding toward zero. float16/bfloat16: rounded toward zero.
    """
    if dtype == jnp.float64:
        return wide * (factor * (1 - 4 * _F64_UNIT))
    if dtype == jnp.float32:
        return (wide * (factor * (1 - 2.0**-23))).astype(jnp.float32)
    return _round_toward_zero(wide * factor, dtype)


def _strict_margin(n: int, p: float) -> float:
    """Relative bound on the error of a float64 norm of n entries, its division and the scaling.

    An n-term sum of non-negative terms (float64 squares of any dtype, rounded or not), in
    any order, is within gamma_n ~ n u of the exact sum (Higham, 4.2); the root, the
    division and the scaling's roundings add a few u; a general p's x**p and s**(1/p) a
    few ulps each (torch's were measured at 14 eps); squares lost to flushing in the
    scaled pass are below 2**-500 relative.
    """
    if p == math.inf:
        return 8 * _F64_UNIT
    return (n + (8 if p in (1, 2) else 64)) * _F64_UNIT


def _times_ratio(wide, num, den, scale, shrink: float) -> jax.Array:
    """wide * scale * (num / den) * shrink in float64, rounded once where the result is normal.

    The huge-norm path: scale (a power of two) brings a norm near float64's largest to ~1.
    Multiplied first, it sent an ordinary entry (0.33 * 2**-1022) below the smallest normal,
    where XLA on the CPU flushes it to zero, though the clipped entry (7e-308) is normal.
    Instead num / den * scale = m * 2**e with m = (num's mantissa / den's) * scale's (1/2),
    in (1/4, 1): wide * m rounds once and cannot overflow; 2**e is two exact multiplies by
    normal powers of two of the same sign, so no step passes below the final magnitude.
    """
    m_num, e_num = jnp.frexp(num)
    m_den, e_den = jnp.frexp(den)
    m_scale, e_scale = jnp.frexp(scale)
    e = e_num - e_den + e_scale
    half = e // 2
    one = jnp.ones((), jnp.float64)
    rounded = wide * (m_num / m_den * m_scale * shrink)
    return (rounded * jnp.ldexp(one, half)) * jnp.ldexp(one, e - half)


def _float32_factors(factor: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(b, a1, a2), float32, with leaf * b * a1 * a2 never above leaf * factor (float64, in [0, 1]).

    The scaling stays in float32, so XLA reads each leaf once and writes it once (a float64
    copy of the leaf, shared by the norm and the scaling, would be materialised).
    factor = m * 2**e with m in [0.5, 1): b is m rounded toward zero and shrunk by 2**-23,
    so the rounding of leaf * b (at most 2**-24 up) lands below; a1 * a2 = 2**e, two exact
    multiplies by normal float32 numbers even where 2**e itself is not one.
    """
    mantissa, exponent = jnp.frexp(factor)
    one = jnp.ones((), jnp.float32)
    half = exponent // 2
    b = _round_toward_zero(mantissa * (1 - 2.0**-23), jnp.float32)
    return b, jnp.ldexp(one, half), jnp.ldexp(one, exponent - half)


def _strict_leaves(leaves, tau, p, convention):
    """strict=True for float32/float64 trees, in one pass: the factor is tau over an upper bound of n.

    n is measured in float64 (float32 squares are exact there and cannot overflow);
    upper = n (1 + m) + ||entries XLA read as zero||_p (+ 1e-6 in torch's convention)
    bounds the exact norm. The gradient is kept when upper <= tau; otherwise every entry
    is multiplied by tau / upper and rounded so that it cannot grow.
    """
    n = sum(leaf.size for leaf in leaves)
    scale, scaled = measure(
        [leaf.astype(jnp.float64) for leaf in leaves],
        p,
        exact_squares=all(leaf.dtype == jnp.float32 for leaf in leaves),
    )
    m = _strict_margin(n, p)
    flushed = max(_flushed_tiny(leaf.dtype) for leaf in leaves) * (
        1.0 if p == math.inf else n ** (1 / p)
    )
    tau = tau.astype(jnp.float64)
    norm = scaled / scale
    upper = norm * (1 + m) + (flushed + (TORCH_EPS if convention == "torch" else 0.0))
    keep = upper <= tau  # proven within: returned untouched
    c = clipping.coefficient(upper, tau, "optax")
    factor = c.tau / c.divisor
    # A norm that overflows float64 (or whose tau / n underflows): the direction from the
    # scaled gradient, as in `_library_clip`.
    largest = 2.0 ** (jnp.finfo(jnp.float64).maxexp - 2) * jnp.minimum(1, tau)
    huge = ~(upper < largest) & jnp.isfinite(scaled) & (scaled > 0)
    shrink = 1 - 4 * _F64_UNIT  # absorbs the float64 multiply's rounding
    b, a1, a2 = _float32_factors(factor)
    top = clipping.coefficient(
        scaled * (1 + m), tau, "optax", scale=scale
    )  # the same for every leaf
    out = []
    for leaf in leaves:
        if leaf.dtype == jnp.float32:
            clipped = ((leaf * b) * a1) * a2
        else:
            wide = leaf.astype(jnp.float64)
            clipped = jnp.where(
                huge,
                _times_ratio(wide, top.tau, top.divisor, scale, shrink),
                wide * (factor * shrink),
            )
        out.append(jnp.where(keep, leaf, clipped.astype(leaf.dtype)))
    return out, norm.astype(norm_dtype(leaves))


def clip_leaves(leaves, tau, p, convention, strict, measured=None):
    """(clipped leaves, norm in the returned dtype); `measured` = (scale, scaled norm) if given."""
    tau = poison_invalid(jnp.asarray(tau))
    low = any(is_low_precision(leaf.dtype) for leaf in leaves)
    if strict and not low and measured is None:
        return _strict_leaves(leaves, tau, p, convention)
    acc = accumulation_dtype(leaves)
    if measured is None:
        exact = p in (1, 2) and all(
            jnp.finfo(leaf.dtype).bits < jnp.finfo(acc).bits for leaf in leaves
        )
        measured = measure([leaf.astype(acc) for leaf in leaves], p, exact)
    scale, scaled_norm = (jnp.asarray(x).astype(acc) for x in measured)
    norm = scaled_norm / scale
    # optax multiplies by the threshold in the gradient's dtype.
    clipped = _library_clip(leaves, scale, scaled_norm, norm, tau.astype(acc), convention)
    clipped = [
        _round_toward_zero(c, leaf.dtype) if is_low_precision(leaf.dtype) else c.astype(leaf.dtype)
        for c, leaf in zip(clipped, leaves)
    ]
    if low:
        # Below the threshold, a low-precision leaf itself, bit for bit (a select, as optax's
        # `where`): XLA on the CPU reads a bfloat16 subnormal widened to float32 as zero, so the
        # widened copy is not the leaf (a bfloat16 -9.2e-39 came back as -0, norm far below
        # tau). float32/float64 leaves are not widened and keep their program unchanged.
        keep = clipping.coefficient(norm, tau.astype(acc), convention).keep
        clipped = [
            _select(keep, leaf, c) if is_low_precision(leaf.dtype) else c
            for c, leaf in zip(clipped, leaves)
        ]
    if strict or low:
        clipped = _enforce_bound(clipped, tau, p)
    return clipped, norm.astype(norm_dtype(leaves))


def apply_nonfinite(clipped: list[jax.Array], norm: jax.Array, nonfinite: str) -> list[jax.Array]:
    """nonfinite="skip" (and "error" under jit): zeros where the norm is not finite; "error"
    on concrete arrays raises."""
    if nonfinite == "propagate":
        return clipped
    finite = jnp.isfinite(norm)
    if nonfinite == "error" and concrete_bool(finite) is False:
        clipping.raise_if_nonfinite(norm)
    return [jnp.where(finite, c, jnp.zeros_like(c)) for c in clipped]
