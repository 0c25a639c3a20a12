"""Gradient clipping by global norm and by value: optax's transformations, made safe.

`clip_by_global_norm(max_norm)` and `clip(max_delta)` stand where optax's functions of
the same names stand: they return stateless `optax.GradientTransformation`s (`init`
gives optax's empty state, `update(g, None)` works), accept a traced threshold (`jit`,
`optax.inject_hyperparams`, a schedule, `vmap` over thresholds), chain, and work inside
`optax.MultiSteps`. The pieces are public, as torch's `get_total_norm` and
`clip_grads_with_norm_` are: `global_norm(tree)` measures, `clip_tree_with_norm(tree,
max_norm, norm)` scales by a norm measured elsewhere (a `psum` over devices, say), and
`clip_tree_by_global_norm(tree, max_norm)` does both and returns `(clipped, norm)`.

The math is written once, in docs/clipping.md, and once here, in `coefficient`: the
public functions measure, take that factor and scale. How each safeguard below works is
in `jax_impl/clip_safeguards.py`, which applies no other factor. For a gradient g (all
leaves viewed as one vector), a threshold tau and a norm order p:

    n = ||g||_p
    optax convention:  g' = g                 if n < tau (strict)
                       g' = (g / n) * tau     otherwise
    torch convention:  g' = g * min(1, tau / (n + 1e-6))

Pascanu, Mikolov & Bengio, "On the difficulty of training recurrent neural networks",
ICML 2013.

On float32/float64 gradients the default computes optax's expression on optax's norm,
so it returns optax's bits, eagerly and under `jit` (test_jax_clipping_api.py). Where
optax is wrong, ours is not (docs/divergences.md lists each case and its test): a norm
whose squares overflow or underflow is measured again on g * 2**-e; float16/bfloat16
are measured in float64 and rounded so the clipped norm is <= tau; `strict=True` makes
that promise for every dtype; a negative or NaN threshold raises (a traced one makes
the update NaN, never a flipped sign). How: `jax_impl/clip_safeguards.py`. Everything
is branch-free (`jnp.where`, `lax.cond`, never a Python `if` on a traced value), so one
compiled program serves every step and every threshold.

Non-finite gradients (`nonfinite=`):
    "propagate"  what optax does: NaN/inf spread through the clipped gradient;
    "skip"       the clipped gradient is all zeros (a zero update); the returned norm
                 is not finite, so `~jnp.isfinite(norm)` counts skipped steps, and
                 `count_nonfinite()` chained before the clip counts them in its state;
    "error"      called on concrete arrays it raises FloatingPointError; under `jit`
                 nothing can raise, so it behaves as "skip" and the training loop
                 calls `raise_if_nonfinite(norm)` on the returned norm, outside jit.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from charclip.clipspec import (
    CONVENTIONS,
    NONFINITE_POLICIES,
    TORCH_EPS,
    check_choice,
    check_norm_type,
    check_threshold,
)
from charclip.jax import clip_safeguards as safe


def _threshold(name: str, value) -> jax.Array | float:
    """Check a concrete threshold (one line ValueError); pass a traced one through.

    Under `jit`, `vmap` or `inject_hyperparams` the threshold is a tracer and cannot be
    checked; `clip_safeguards.poison_invalid` then turns an invalid one into NaN, branch-free.
    """
    if isinstance(value, jax.core.Tracer):
        return value
    if np.ndim(value) != 0:
        raise ValueError(
            f"{name} must be a scalar (got shape {np.shape(value)}); use jax.vmap to clip with several thresholds."
        )
    check_threshold(name, value)
    return value


class Coefficient(NamedTuple):
    """The factor c of g' = c * g: c = 1 where `keep`, else c = tau / divisor."""

    keep: jax.Array
    tau: jax.Array
    divisor: jax.Array
    convention: str

    def scale_leaf(self, t: jax.Array) -> jax.Array:
        """t * c where c < 1, as each library writes it (the same expression, so the same bits)."""
        if self.convention == "optax":
            return (t / self.divisor) * self.tau
        # PyTorch writes max_norm / (norm + eps) and evaluates it as reciprocal * max_norm.
        return t * jnp.minimum((1 / self.divisor) * self.tau, 1)


def coefficient(
    norm: jax.Array, tau: jax.Array, convention: str, *, scale: jax.Array | None = None
) -> Coefficient:
    """The clipping factor c, as docs/clipping.md (step 2) writes it; the only place it is derived.

        optax:  c = 1 if n < tau (or n == 0, so tau = 0 keeps a zero gradient), else tau / n
        torch:  c = min(1, tau / (n + 1e-6))

    `scale`: the norm was measured on g * scale (a power of two, so that a norm beyond the
    dtype's range stays finite) and `norm` is that scaled norm; tau / divisor is then the
    factor for g * scale, c / scale. Branch-free: every comparison is a traced boolean.
    """
    n = norm if scale is None else norm / scale
    if convention == "optax":
        return Coefficient((n < tau) | (n == 0), tau, norm, convention)
    divisor = n + TORCH_EPS if scale is None else norm + TORCH_EPS * scale
    return Coefficient((1 / (n + TORCH_EPS)) * tau >= 1, tau, divisor, convention)


def global_norm(tree: Any, norm_type: float = 2) -> jax.Array:
    """||g||_p of all leaves viewed as one vector (optax.tree.norm for p = 2, without its overflow).

    float32 for float16/bfloat16 leaves (measured in float64), else the widest leaf
    dtype. Finite whenever the norm itself is representable. 0.0 (float32) for a tree
    without leaves; empty leaves count as zero, also for p = inf.
    """
    p = check_norm_type(norm_type, clipping=False)
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    if p == 0:  # as charclip.torch's get_total_norm: how many entries are not zero
        return sum(jnp.count_nonzero(leaf) for leaf in leaves).astype(safe.norm_dtype(leaves))
    acc = safe.accumulation_dtype(leaves)
    wide = [leaf.astype(acc) for leaf in leaves]
    scale, scaled = safe.measure(wide, p, exact_squares=acc != safe.norm_dtype(leaves))
    return (scaled / scale).astype(safe.norm_dtype(leaves))


def _check_options(norm_type, convention, nonfinite) -> float:
    check_choice("convention", convention, CONVENTIONS)
    check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
    return check_norm_type(norm_type)


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
    clipped, norm = safe.clip_leaves(
        leaves, tau, 2, convention, strict, measured=(jnp.ones((), norm.dtype), norm)
    )
    return jax.tree.unflatten(treedef, safe.apply_nonfinite(clipped, norm, nonfinite))


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
    clipped, norm = safe.clip_leaves(leaves, tau, p, convention, strict)
    return jax.tree.unflatten(treedef, safe.apply_nonfinite(clipped, norm, nonfinite)), norm


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
        v = safe.poison_invalid(v)
    return jax.tree.map(lambda t: jnp.clip(t, -v, v), tree)


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
            updates,
            max_norm,
            norm_type=p,
            convention=convention,
            nonfinite=nonfinite,
            strict=strict,
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
