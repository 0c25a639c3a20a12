"""Gradient clipping by global norm and by value, as pure functions over pytrees.

The math is written once, in docs/clipping.md; this module follows it step by step.
For a gradient g (all leaves viewed as one vector), a threshold tau and a norm order p:

    n = ||g||_p
    optax convention:  g' = g                 if n < tau (strict)
                       g' = (g / n) * tau     otherwise
    torch convention:  g' = g * min(1, tau / (n + 1e-6))

Both conventions reproduce their library bit for bit on ordinary float32/float64
inputs (parity_tests/properties/test_clipping_properties.py checks it). Where the libraries are
wrong, this module is not (docs/divergences.md lists each case and its test):

- the norm is measured on g scaled by a power of two chosen from max|g|, so squares
  cannot overflow or underflow; multiplying by a power of two is exact, so on ordinary
  inputs the result is the library's to the last bit;
- float16/bfloat16 gradients are measured and scaled in float32, rounded toward zero
  into their dtype, and the rounded result is checked in float64 (and nudged down if
  needed), so the clipped norm is <= tau after rounding;
- thresholds that are negative or NaN, and norm orders that are not norms, raise.

Everything is branch-free (`jnp.where`, never a Python `if` on an array value): under
`jit` the values are tracers and a branch on them cannot be taken, and `lax.select`
keeps one compiled program for every step.

Non-finite gradients (`nonfinite=`):
    "propagate"  what the libraries do: NaN/inf spread through the clipped gradient;
    "skip"       the clipped gradient is all zeros (a zero update); the returned norm
                 is not finite, so `~jnp.isfinite(norm)` counts skipped steps;
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
import optax

from charclip.clipspec import (
    CONVENTIONS,
    LOW_PRECISION_MARGIN,
    NONFINITE_POLICIES,
    TORCH_EPS,
    check_choice,
    check_norm_type,
    check_threshold,
)


def _accumulation_dtype(leaves: list[jax.Array]) -> jnp.dtype:
    """float32 at least: float16/bfloat16 are measured and scaled in float32."""
    # The widest of float32 and the leaves' float types, chosen by width: result_type would be
    # refused under strict dtype promotion, which the tests run.
    return max((jnp.dtype(jnp.float32), *(jnp.dtype(leaf.dtype) for leaf in leaves)), key=lambda d: jnp.finfo(d).bits)


def _power_of_two_scale(leaves: list[jax.Array], acc: jnp.dtype) -> jax.Array:
    """2**-e with max|g| = f * 2**e, f in [0.5, 1): scaled entries lie in [0, 1).

    The exponent is clamped so the scale itself is a normal number of `acc`.
    Non-finite or zero max|g| gives exponent 0, i.e. scale 1.
    """
    max_abs = functools.reduce(
        jnp.maximum, [jnp.max(jnp.abs(leaf.astype(acc)), initial=0) for leaf in leaves]
    )
    return _scale_for(max_abs)


@jax.jit  # exact operations only, so compiling them changes no bit; one dispatch, not ~30
def _scale_for(max_abs: jax.Array) -> jax.Array:
    _, exponent = jnp.frexp(max_abs)
    limit = jnp.finfo(max_abs.dtype).maxexp - 2
    exponent = jnp.clip(exponent, -limit, limit)
    return jnp.ldexp(jnp.ones_like(max_abs), -exponent)


def _scaled_norm(scaled: list[jax.Array], p: float) -> jax.Array:
    """||scaled||_p, summed over leaves left to right from zero, as optax.tree.norm does."""
    zero = jnp.zeros((), scaled[0].dtype)
    if p == math.inf:
        return functools.reduce(jnp.maximum, [jnp.max(jnp.abs(u), initial=0) for u in scaled], zero)
    if p == 2:
        return jnp.sqrt(functools.reduce(operator.add, [jnp.sum(jnp.square(u)) for u in scaled], zero))
    if p == 1:
        return functools.reduce(operator.add, [jnp.sum(jnp.abs(u)) for u in scaled], zero)
    return functools.reduce(operator.add, [jnp.sum(jnp.abs(u) ** p) for u in scaled], zero) ** (1 / p)


def global_norm(tree: Any, norm_type: float = 2) -> jax.Array:
    """||g||_p of all leaves viewed as one vector, accumulated in float32 or wider.

    Measured on g * 2**-e (exact), so a finite gradient has a finite norm whenever the
    norm itself is representable. Returns 0.0 (float32) for a tree without leaves.
    """
    p = check_norm_type(norm_type)
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    acc = _accumulation_dtype(leaves)
    scale = _power_of_two_scale(leaves, acc)
    return _scaled_norm([leaf.astype(acc) * scale for leaf in leaves], p) / scale


@functools.partial(jax.jit, static_argnums=1)  # exact operations only: compiling changes no bit
def _round_toward_zero(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Round x into `dtype` so that |result| <= |x|: rounding cannot raise the norm."""
    nearest = x.astype(dtype)
    away = jnp.abs(nearest.astype(x.dtype)) > jnp.abs(x)
    return jnp.where(away, jnp.nextafter(nearest, jnp.zeros_like(nearest)), nearest)


def _clip_leaf(leaf, scale, scaled_norm, norm, tau, convention):
    """One leaf of the clipped gradient, computed in the accumulation dtype.

    The formulas are written exactly as the libraries write them, so that XLA compiles
    them the same way and the bits agree under `jit` too.
    """
    t = leaf.astype(norm.dtype)
    if convention == "optax":
        # A zero gradient stays zero, also for tau == 0, where optax computes 0 / 0.
        keep = (norm < tau) | (norm == 0)
        clipped = jnp.where(keep, t, (t / norm) * tau)
    else:
        # PyTorch writes max_norm / (norm + eps) and evaluates it as reciprocal * max_norm.
        coef = jnp.minimum((1 / (norm + TORCH_EPS)) * tau, 1)
        # t * coef, torch's own expression, except that t is kept as is when coef is 1: XLA
        # would flush subnormal entries of t * 1 to zero.
        clipped = jnp.where(coef >= 1, t, t * coef)
    # A norm of 2**(maxexp - 2) * min(1, tau) or more (up to inf while every entry is
    # finite): 1 / n or tau / n is subnormal, which XLA flushes to zero, or n overflowed.
    # The direction still comes out right from the scaled gradient, (g * 2**-e) / (n * 2**-e).
    largest = 2.0 ** (jnp.finfo(norm.dtype).maxexp - 2) * min(1.0, tau)
    huge = ~(norm < largest) & jnp.isfinite(scaled_norm) & (scaled_norm > 0)
    return jnp.where(huge, (t * scale) / scaled_norm * tau, clipped)


def _is_low_precision(dtype: jnp.dtype) -> bool:
    return jnp.finfo(dtype).bits < 32


def _into_dtype(clipped: jax.Array, dtype: jnp.dtype) -> jax.Array:
    if _is_low_precision(dtype):
        return _round_toward_zero(clipped, dtype)
    return clipped.astype(dtype)


def _enforce_bound(clipped: list[jax.Array], tau: float, p: float) -> list[jax.Array]:
    """Make the float16/bfloat16 leaves' clipped norm <= tau after rounding.

    Rounding toward zero cannot raise the norm, but the float32 norm it was scaled by
    may be low by a few float32 ulps. So measure the rounded result again in float64
    (its squares are exact there; jax_impl turns on 64-bit mode at import); where it
    is still above tau, scale the low-precision leaves by tau / norm, shrunk by 2**-24
    (far below their ulp), and round toward zero once more.
    """
    wide = [c.astype(jnp.float64) for c in clipped]
    measured = global_norm(wide, p)
    fix = jnp.where(measured > tau, tau / measured * (1 - LOW_PRECISION_MARGIN), 1)
    return [_round_toward_zero(w * fix, c.dtype) if _is_low_precision(c.dtype) else c for w, c in zip(wide, clipped)]


def clip_by_global_norm(
    tree: Any,
    max_norm: float,
    *,
    norm_type: float = 2,
    convention: str = "optax",
    nonfinite: str = "propagate",
) -> tuple[Any, jax.Array]:
    """Scale `tree` so that its global p-norm is at most `max_norm`; return (clipped, norm).

    `norm` is the norm before clipping (float32 for float16/bfloat16 leaves). The
    direction is kept: clipped = c * tree with 0 <= c <= 1. Pascanu, Mikolov & Bengio,
    "On the difficulty of training recurrent neural networks", ICML 2013.
    """
    tau = check_threshold("max_norm", max_norm)
    p = check_norm_type(norm_type)
    check_choice("convention", convention, CONVENTIONS)
    check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
        return tree, jnp.zeros((), jnp.float32)
    acc = _accumulation_dtype(leaves)
    scale = _power_of_two_scale(leaves, acc)
    scaled_norm = _scaled_norm([leaf.astype(acc) * scale for leaf in leaves], p)
    norm = scaled_norm / scale
    finite = jnp.isfinite(scaled_norm)  # the scaled norm is finite iff every entry is
    if nonfinite == "error" and _concrete_and_false(finite):
        raise_if_nonfinite(norm)
    clipped = [_clip_leaf(leaf, scale, scaled_norm, norm, tau, convention) for leaf in leaves]
    clipped = [_into_dtype(c, leaf.dtype) for c, leaf in zip(clipped, leaves)]
    if any(_is_low_precision(leaf.dtype) for leaf in leaves):
        clipped = _enforce_bound(clipped, tau, p)
    if nonfinite != "propagate":
        clipped = [jnp.where(finite, c, jnp.zeros_like(c)) for c in clipped]
    return jax.tree.unflatten(treedef, clipped), norm


def _concrete_and_false(flag: jax.Array) -> bool:
    """False under `jit`, where the value is unknown: there the loop checks the norm."""
    try:
        return not bool(flag)
    except jax.errors.ConcretizationTypeError:
        return False


def raise_if_nonfinite(norm: jax.Array) -> None:
    """Host-side check for nonfinite="error": call it on the norm a jitted step returned."""
    if not bool(jnp.isfinite(norm)):
        raise FloatingPointError(
            f"gradient norm is {float(norm)}: a gradient entry is NaN or infinite; lower the learning rate or check the loss."
        )


def clip_by_value(tree: Any, clip_value: float) -> Any:
    """Clamp every entry of `tree` to [-clip_value, clip_value] (changes the direction)."""
    v = check_threshold("clip_value", clip_value)
    return jax.tree.map(lambda t: jnp.clip(t, -v, v), tree)


class ClipByGlobalNormState(NamedTuple):
    """Last pre-clip norm, and how many steps had a non-finite gradient."""

    norm: jax.Array
    nonfinite_count: jax.Array


def clip_by_global_norm_reference(
    max_norm: float,
    *,
    norm_type: float = 2,
    convention: str = "optax",
    nonfinite: str = "propagate",
) -> optax.GradientTransformation:
    """`clip_by_global_norm` as an optax transformation, to stand where
    `optax.clip_by_global_norm` stands in `optax.chain` (before the optimizer).

    Its state keeps the last norm (to log, or for `raise_if_nonfinite`) and counts
    non-finite steps. With nonfinite="skip" the update passed on is zero; a stateful
    optimizer after it still decays its moments (wrap it in `optax.apply_if_finite`
    to leave its state untouched).
    """
    check_threshold("max_norm", max_norm)
    check_norm_type(norm_type)
    check_choice("convention", convention, CONVENTIONS)
    check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)

    def init_fn(params):
        leaves = jax.tree.leaves(params)
        acc = _accumulation_dtype(leaves) if leaves else jnp.float32
        return ClipByGlobalNormState(jnp.zeros((), acc), jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None):
        del params
        clipped, norm = clip_by_global_norm(
            updates, max_norm, norm_type=norm_type, convention=convention, nonfinite=nonfinite
        )
        count = state.nonfinite_count + (~jnp.isfinite(norm)).astype(jnp.int32)
        return clipped, ClipByGlobalNormState(norm.astype(state.norm.dtype), count)

    return optax.GradientTransformation(init_fn, update_fn)
