"""Gradient clipping by global norm and by value: optax's transformations, made safe.

`clip_by_global_norm(max_norm)` and `clip(max_delta)` stand where optax's functions of
the same names stand: they return stateless `optax.GradientTransformation`s (`init`
gives optax's empty state, `update(g, None)` works), accept a traced threshold (`jit`,
`optax.inject_hyperparams`, a schedule, `vmap` over thresholds), chain, and work inside
`optax.MultiSteps`. The pieces are public, as torch's `get_total_norm` and
`clip_grads_with_norm_` are: `global_norm(tree)` measures, `clip_tree_with_norm(tree,
max_norm, norm)` scales by a norm measured elsewhere (a `psum` over devices, say), and
`clip_tree_by_global_norm(tree, max_norm)` does both and returns `(clipped, norm)`.

The math is written once, in docs/clipping.md. For a gradient g (all leaves viewed as
one vector), a threshold tau and a norm order p:

    n = ||g||_p
    optax convention:  g' = g                 if n < tau (strict)
                       g' = (g / n) * tau     otherwise
    torch convention:  g' = g * min(1, tau / (n + 1e-6))

Pascanu, Mikolov & Bengio, "On the difficulty of training recurrent neural networks",
ICML 2013.

On float32/float64 gradients the default computes optax's expression on optax's norm,
so it returns optax's bits (parity_tests/properties/test_clipping_properties.py and
test_jax_clipping_api.py check it, eagerly and under `jit`). Where optax is wrong, ours
is not (docs/divergences.md lists each case and its test):

- The norm is first summed as optax sums it. Only when that sum is not finite (a
  square overflowed) or so small that squares may have underflowed does a second pass
  measure g * 2**-e, with 2**-e chosen from max|g| (exact, so the answer is the same
  wherever both are right), or, for float32, sums the squares in float64. On the CPU
  the second pass sits in a `lax.cond`, so an ordinary step pays nothing for it; on
  other platforms it is a `jnp.where` (a conditional there reads its predicate on the
  host), so no step ever waits for the host.
- float16/bfloat16 gradients are measured in float64 (their squares are exact there:
  one pass, no prescale), clipped by the library's formula, rounded toward zero into
  their dtype, and the result passes an exact check (rescaled by a hair where it does
  not), so the clipped norm, measured exactly, is <= tau. `strict=True` makes that
  promise for every dtype: float32/float64 are measured in float64 and scaled by tau
  over a proven upper bound of the norm, in one pass. The default on float32/float64
  keeps optax's bits, which can exceed tau by an ulp or two.
- A concrete threshold that is negative or NaN raises ValueError. A traced one cannot
  raise; it makes the update NaN (never a flipped sign, which is what optax returns),
  so the step fails visibly.

Everything is branch-free (`jnp.where`, `lax.cond`, never a Python `if` on a traced
value): under `jit` the values are tracers, and one compiled program serves every
step and every threshold.

Non-finite gradients (`nonfinite=`):
    "propagate"  what optax does: NaN/inf spread through the clipped gradient;
    "skip"       the clipped gradient is all zeros (a zero update); the returned norm
                 is not finite, so `~jnp.isfinite(norm)` counts skipped steps, and
                 `count_nonfinite()` chained before the clip counts them in its state;
    "error"      called on concrete arrays it raises FloatingPointError; under `jit`
                 nothing can raise, so it behaves as "skip" and the training loop
                 calls `raise_if_nonfinite(norm)` on the returned norm, outside jit.
"""

import functools
import math
import operator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from charclip.clipspec import (
    CONVENTIONS,
    NONFINITE_POLICIES,
    TORCH_EPS,
    check_choice,
    check_norm_type,
    check_threshold,
)

_F64_UNIT = 2.0**-53  # unit roundoff of float64, where the strict bound is computed


# ---- checks ---------------------------------------------------------------------------


def _threshold(name: str, value) -> jax.Array | float:
    """Check a concrete threshold (one line ValueError); pass a traced one through.

    Under `jit`, `vmap` or `inject_hyperparams` the threshold is a tracer and cannot be
    checked; `_poison_invalid` then turns an invalid one into NaN, branch-free.
    """
    if isinstance(value, jax.core.Tracer):
        return value
    if np.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar (got shape {np.shape(value)}); use jax.vmap to clip with several thresholds.")
    check_threshold(name, value)
    return value


def _poison_invalid(tau: jax.Array) -> jax.Array:
    """NaN where tau < 0 or tau is NaN: a traced invalid threshold fails visibly, never flips the step."""
    return jnp.where(tau >= 0, tau, jnp.nan)


def _is_low_precision(dtype) -> bool:
    return jnp.finfo(dtype).bits < 32


def _concrete_bool(flag) -> bool | None:
    """The value of a scalar flag, or None under `jit`/`vmap`, where it is unknown."""
    try:
        return bool(flag)
    except jax.errors.ConcretizationTypeError:
        return None


# ---- measuring ------------------------------------------------------------------------


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
    return _power_of_two(max_abs, wide[0].dtype, lambda scale: _root(_combine([_leaf_sum(u * scale, p) for u in wide], p,
                                                                               wide[0].dtype), p))


def _power_of_two(x: jax.Array, dtype, scaled_norm) -> tuple[jax.Array, jax.Array]:
    """(2**-e, scaled_norm(2**-e)) with x = f * 2**e, f in [0.5, 1), e clamped to `dtype`'s normal range."""
    _, exponent = jnp.frexp(x)
    limit = jnp.finfo(dtype).maxexp - 2
    scale = jnp.ldexp(jnp.ones((), x.dtype), -jnp.clip(exponent, -limit, limit))
    return scale.astype(dtype), scaled_norm(scale)


def _measure(wide: list[jax.Array], p: float, exact_squares: bool) -> tuple[jax.Array, jax.Array]:
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
            norm64 = _root(_combine([_leaf_sum(u.astype(jnp.float64), p) for u in wide], p, jnp.float64), p)
            return _power_of_two(norm64, dtype, lambda s: (norm64 * s).astype(dtype))
        return _scaled_norm(wide, p)

    known = _concrete_bool(trusted)
    if known is not None:  # eager: a Python branch; ordinary steps run optax's operations, op by op
        return (one, fast) if known else second()

    def selected():
        scale, scaled = second()
        return jnp.where(trusted, one, scale), jnp.where(trusted, fast, scaled)

    return lax.platform_dependent(cpu=lambda: lax.cond(trusted, lambda: (one, fast), second), default=selected)


def _widest(*dtypes):
    """The widest of these float dtypes, by width: jnp.result_type would be refused under JAX's
    strict dtype promotion, which the tests run."""
    return max((jnp.dtype(d) for d in dtypes), key=lambda d: jnp.finfo(d).bits)


def _accumulation_dtype(leaves: list[jax.Array]):
    """float64 when every leaf is float16/bfloat16 (exact squares); else the widest of float32 and the leaves."""
    if all(_is_low_precision(leaf.dtype) for leaf in leaves):
        return jnp.dtype(jnp.float64)
    return _widest(jnp.float32, *(leaf.dtype for leaf in leaves))


def _norm_dtype(leaves: list[jax.Array]):
    """The dtype of the returned norm: float32 for float16/bfloat16 gradients, else the accumulation dtype."""
    return _widest(jnp.float32, *(leaf.dtype for leaf in leaves))


def global_norm(tree: Any, norm_type: float = 2) -> jax.Array:
    """||g||_p of all leaves viewed as one vector (optax.tree.norm for p = 2, without its overflow).

    float32 for float16/bfloat16 leaves (measured in float64), else the widest leaf
    dtype. Finite whenever the norm itself is representable. 0.0 (float32) for a tree
    without leaves; empty leaves count as zero, also for p = inf.
    """
    p = check_norm_type(norm_type)
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    acc = _accumulation_dtype(leaves)
    wide = [leaf.astype(acc) for leaf in leaves]
    scale, scaled = _measure(wide, p, exact_squares=acc != _norm_dtype(leaves))
    return (scaled / scale).astype(_norm_dtype(leaves))


# ---- clipping with a given norm -------------------------------------------------------


@functools.partial(jax.jit, static_argnums=1)  # exact operations only, so compiling them changes no bit
def _round_toward_zero(x: jax.Array, dtype) -> jax.Array:
    """Round x into `dtype` so that |result| <= |x|: rounding cannot raise the norm."""
    nearest = x.astype(dtype)
    away = jnp.abs(nearest.astype(x.dtype)) > jnp.abs(x)
    return jnp.where(away, jnp.nextafter(nearest, jnp.zeros_like(nearest)), nearest)


def _library_clip(leaves, scale, scaled_norm, norm, tau, convention) -> list[jax.Array]:
    """The leaves clipped by the library's formula, in the norm's dtype.

    The formulas are written exactly as the libraries write them, so that XLA compiles
    them the same way and the bits agree under `jit` too. Scalars are computed once.
    """
    # A norm of 2**(maxexp - 2) * min(1, tau) or more (up to inf while every entry is
    # finite): 1 / n or tau / n is subnormal, which XLA flushes to zero, or n overflowed.
    # The direction still comes out right from the scaled gradient, (g * 2**-e) / (n * 2**-e).
    largest = 2.0 ** (jnp.finfo(norm.dtype).maxexp - 2) * jnp.minimum(1, tau)
    huge = ~(norm < largest) & jnp.isfinite(scaled_norm) & (scaled_norm > 0)
    if convention == "optax":
        # A zero gradient stays zero, also for tau == 0, where optax computes 0 / 0.
        keep = (norm < tau) | (norm == 0)
    else:
        # PyTorch writes max_norm / (norm + eps) and evaluates it as reciprocal * max_norm.
        coef = jnp.minimum((1 / (norm + TORCH_EPS)) * tau, 1)
        # t * coef, torch's own expression, except that t is kept as is when coef is 1: XLA
        # would flush subnormal entries of t * 1 to zero.
        keep = coef >= 1
    out = []
    for leaf in leaves:
        t = leaf.astype(norm.dtype)
        clipped = jnp.where(keep, t, (t / norm) * tau if convention == "optax" else t * coef)
        out.append(jnp.where(huge, (t * scale) / scaled_norm * tau, clipped))
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


def _certainly_within(clipped: list[jax.Array], wide: list[jax.Array], tau: jax.Array, p: float,
                      exact_squares: bool) -> tuple[jax.Array, jax.Array]:
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
    scale, scaled = _measure(wide, p, exact_squares)
    flushed = max(_flushed_tiny(c.dtype) for c in clipped) * (1.0 if p == math.inf else n ** (1 / p))
    upper = (scaled / scale) * (1 + (n + (8 if p in (1, 2, math.inf) else 64)) * _F64_UNIT) + flushed
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
    fix = tau / upper * (1 - 2.0**-24)
    return [jnp.where(ok, c, _shrink_into(w, fix, c.dtype)) for w, c in zip(wide, clipped)]


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
    scale, scaled = _measure([leaf.astype(jnp.float64) for leaf in leaves], p,
                             exact_squares=all(leaf.dtype == jnp.float32 for leaf in leaves))
    m = _strict_margin(n, p)
    flushed = max(_flushed_tiny(leaf.dtype) for leaf in leaves) * (1.0 if p == math.inf else n ** (1 / p))
    tau = tau.astype(jnp.float64)
    norm = scaled / scale
    upper = norm * (1 + m) + (flushed + (TORCH_EPS if convention == "torch" else 0.0))
    keep = upper <= tau
    factor = tau / upper
    # A norm that overflows float64 (or whose tau / n underflows): the direction from the
    # scaled gradient, as in `_library_clip`.
    largest = 2.0 ** (jnp.finfo(jnp.float64).maxexp - 2) * jnp.minimum(1, tau)
    huge = ~(upper < largest) & jnp.isfinite(scaled) & (scaled > 0)
    shrink = 1 - 4 * _F64_UNIT  # absorbs the float64 multiply's rounding
    b, a1, a2 = _float32_factors(factor)
    out = []
    for leaf in leaves:
        if leaf.dtype == jnp.float32:
            clipped = ((leaf * b) * a1) * a2
        else:
            wide = leaf.astype(jnp.float64)
            clipped = jnp.where(huge, (wide * scale) * (tau / (scaled * (1 + m)) * shrink), wide * (factor * shrink))
        out.append(jnp.where(keep, leaf, clipped.astype(leaf.dtype)))
    return out, norm.astype(_norm_dtype(leaves))


def _clip_leaves(leaves, tau, p, convention, strict, measured=None):
    """(clipped leaves, norm in the returned dtype); `measured` = (scale, scaled norm) if given."""
    tau = _poison_invalid(jnp.asarray(tau))
    low = any(_is_low_precision(leaf.dtype) for leaf in leaves)
    if strict and not low and measured is None:
        return _strict_leaves(leaves, tau, p, convention)
    acc = _accumulation_dtype(leaves)
    if measured is None:
        exact = p in (1, 2) and all(jnp.finfo(leaf.dtype).bits < jnp.finfo(acc).bits for leaf in leaves)
        measured = _measure([leaf.astype(acc) for leaf in leaves], p, exact)
    scale, scaled_norm = (jnp.asarray(x).astype(acc) for x in measured)
    norm = scaled_norm / scale
    # optax multiplies by the threshold in the gradient's dtype.
    clipped = _library_clip(leaves, scale, scaled_norm, norm, tau.astype(acc), convention)
    clipped = [_round_toward_zero(c, leaf.dtype) if _is_low_precision(leaf.dtype) else c.astype(leaf.dtype)
               for c, leaf in zip(clipped, leaves)]
    if strict or low:
        clipped = _enforce_bound(clipped, tau, p)
    return clipped, norm.astype(_norm_dtype(leaves))


def _check_options(norm_type, convention, nonfinite) -> float:
    check_choice("convention", convention, CONVENTIONS)
    check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
    return check_norm_type(norm_type)


def _apply_nonfinite(clipped: list[jax.Array], norm: jax.Array, nonfinite: str) -> list[jax.Array]:
    if nonfinite == "propagate":
        return clipped
    finite = jnp.isfinite(norm)
    if nonfinite == "error" and _concrete_bool(finite) is False:
        raise_if_nonfinite(norm)
    return [jnp.where(finite, c, jnp.zeros_like(c)) for c in clipped]


def clip_tree_with_norm(
    tree: Any,
    max_norm: jax.typing.ArrayLike,
    norm: jax.typing.ArrayLike,
    *,
    convention: str = "optax",
    nonfinite: str = "propagate",
    strict: bool = False,
) -> Any:
    """Scale `tree` by the factor that `norm` (its global norm, measured elsewhere) and `max_norm` give.

    The counterpart of torch's `clip_grads_with_norm_`: in a sharded step, `norm` is
    `sqrt(psum(sum of squares))`, and every device scales its own slices by it.
    """
    tau = _threshold("max_norm", max_norm)
    _check_options(2, convention, nonfinite)
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
        return tree
    norm = jnp.asarray(norm)
    clipped, norm = _clip_leaves(leaves, tau, 2, convention, strict, measured=(jnp.ones((), norm.dtype), norm))
    return jax.tree.unflatten(treedef, _apply_nonfinite(clipped, norm, nonfinite))


def clip_tree_by_global_norm(
    tree: Any,
    max_norm: jax.typing.ArrayLike,
    *,
    norm_type: float = 2,
    convention: str = "optax",
    nonfinite: str = "propagate",
    strict: bool = False,
) -> tuple[Any, jax.Array]:
    """Scale `tree` so that its global p-norm is at most `max_norm`; return (clipped, norm).

    `norm` is the norm before clipping (float32 for float16/bfloat16 leaves), the same
    value `global_norm(tree, norm_type)` returns. The direction is kept: clipped = c * tree
    with 0 <= c <= 1, each entry rounded once. `strict=True`: the clipped norm, measured
    exactly, is <= max_norm for every input and dtype (default: optax's bits).
    """
    tau = _threshold("max_norm", max_norm)
    p = _check_options(norm_type, convention, nonfinite)
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
        return tree, jnp.zeros((), jnp.float32)
    clipped, norm = _clip_leaves(leaves, tau, p, convention, strict)
    return jax.tree.unflatten(treedef, _apply_nonfinite(clipped, norm, nonfinite)), norm


def raise_if_nonfinite(norm: jax.Array) -> None:
    """Host-side check for nonfinite="error": call it on the norm a jitted step returned."""
    if not bool(jnp.isfinite(norm)):
        raise FloatingPointError(
            f"gradient norm is {float(norm)}: a gradient entry is NaN or infinite; lower the learning rate or check the loss."
        )


def clip_tree_by_value(tree: Any, clip_value: jax.typing.ArrayLike) -> Any:
    """Clamp every entry of `tree` to [-clip_value, clip_value] (changes the direction), as optax.clip does."""
    v = _threshold("clip_value", clip_value)
    if isinstance(v, jax.core.Tracer):
        v = _poison_invalid(v)
    return jax.tree.map(lambda t: jnp.clip(t, -v, v), tree)


# ---- the transformations --------------------------------------------------------------


def clip_by_global_norm(
    max_norm: jax.typing.ArrayLike,
    *,
    norm_type: float | None = None,
    convention: str = "optax",
    nonfinite: str = "propagate",
    strict: bool = False,
) -> optax.GradientTransformation:
    """Clips updates using their global norm: `optax.clip_by_global_norm`, made safe.

    Args:
      max_norm: The maximum global norm for an update (a float, or a traced scalar
        under `jit`, `vmap` or `optax.inject_hyperparams`).
      norm_type, convention, nonfinite, strict: charclip's extras, keyword-only; see
        `clip_tree_by_global_norm`. `norm_type=None` is 2: a numeric default would
        become a traced hyperparameter under `optax.inject_hyperparams`, which turns
        every numeric argument into one (pass a norm_type there in `static_args`).

    Returns:
      A stateless `optax.GradientTransformation`, to stand before the optimizer in
      `optax.chain`.

    References:
      Pascanu et al., `On the difficulty of training Recurrent Neural Networks
      <https://arxiv.org/abs/1211.5063>`_, 2012
    """
    _threshold("max_norm", max_norm)
    p = _check_options(2 if norm_type is None else norm_type, convention, nonfinite)

    def update_fn(updates, state, params=None):
        del params
        clipped, _ = clip_tree_by_global_norm(
            updates, max_norm, norm_type=p, convention=convention, nonfinite=nonfinite, strict=strict
        )
        return clipped, state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def clip(max_delta: jax.typing.ArrayLike) -> optax.GradientTransformation:
    """Clips updates element-wise, to be in ``[-max_delta, +max_delta]``: `optax.clip`,
    refusing a negative or NaN `max_delta` (a traced one makes the update NaN)."""
    _threshold("clip_value", max_delta)

    def update_fn(updates, state, params=None):
        del params
        return clip_tree_by_value(updates, max_delta), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


class CountNonfiniteState(NamedTuple):
    """How many updates so far held a NaN or an infinity."""

    count: jax.Array


def count_nonfinite() -> optax.GradientTransformation:
    """Counts updates with a non-finite entry, and passes them on unchanged.

    Chain it before a clip with nonfinite="skip" (which turns such updates into zeros):
    `optax.chain(count_nonfinite(), clip_by_global_norm(tau, nonfinite="skip"), ...)`.
    """

    def init_fn(params):
        del params
        return CountNonfiniteState(jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None):
        del params
        # x * 0 is NaN exactly where x is NaN or infinite, so a leaf's sum is finite iff every entry is.
        # (Per leaf, in its own dtype: adding float32 sums to a float64 zero is a silent upcast.)
        finite = jnp.asarray(True)
        for u in jax.tree.leaves(updates):
            finite = finite & jnp.isfinite(jnp.sum(u * 0))
        return updates, CountNonfiniteState(state.count + (~finite).astype(jnp.int32))

    return optax.GradientTransformation(init_fn, update_fn)
