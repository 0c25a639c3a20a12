"""The rest of optax's clipping family, as drop-ins: AGC, block RMS, per-example clipping.

`adaptive_grad_clip`, `clip_by_block_rms` and `per_example_global_norm_clip` take optax's
arguments and return what optax returns (`optax.GradientTransformation`s for the first
two, `(clipped_sum, num_clipped)` for the third). They are written here rather than
re-exported, for three reasons, each a row of docs/clipping-family.md:

- `unitwise_norm` with `axis=None` reads optax's layouts (a Dense kernel is (in, out), a
  convolution kernel (..., in, out)) and keeps optax's rules for ranks 1 to 5 bit for bit,
  but a kernel of rank 6 or more (a 4-D convolution, a stacked Conv3D) raises in optax
  ("Expected parameter with shape in {1, 2, 3, 4, 5}", the case optax#906 was about);
  ours takes every axis but the last, the output unit, as optax does for ranks 4 and 5;
- `clip_by_block_rms(0.0)` on an all-zero leaf gives NaN in optax (0 / 0 in its
  denominator); ours leaves the zeros;
- a concrete negative or NaN threshold raises here (optax accepts it: a negative
  `clipping` or `threshold` silently never clips, a negative `l2_norm_clip` flips
  signs). A traced one (`jit`, `inject_hyperparams`) cannot be checked and passes.

Everything else is optax's expression on optax's reductions, so on valid inputs the
results are optax's bits (parity_tests/parity/test_clip_family.py). The math:

    AGC (Brock et al. 2021, arXiv:2102.06171), per unit u of each leaf:
        m_u = clipping * max(||w_u||, eps)
        g'_u = g_u                                 if ||g_u|| < m_u
             = g_u * (m_u / max(||g_u||, 1e-6))    otherwise
    block RMS, per leaf:   g' = g / max(1, rms(g) / threshold)
    per example (Abadi et al. 2016), grads with a leading batch axis b:
        c_b = min(1, C / ||g_b||)  (1 where that is NaN);  returns (sum_b c_b g_b, #{c_b < 1})
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from charclip.jax.clipping import _threshold as check_hyperparameter  # traced values pass through

AGC_DIV_EPS = 1e-6  # optax's floor on the gradient's unit norm before dividing


def _unit_axes(shape: tuple[int, ...], axis) -> tuple[int, ...] | None:
    """The axes summed over for one unit's norm (None: the whole leaf is one unit)."""
    if axis is not None:
        return axis
    if sum(d != 1 for d in shape) <= 1:  # scalars and vectors, also (1, n) and (n, 1)
        return None
    if len(shape) in (2, 3):  # Dense (in, out); rank 3 as optax reads it: multi-head (in, h, d)
        return (0,)
    return tuple(range(len(shape) - 1))  # convolutions (..., in, out): all but the output axis


def unitwise_norm(x: jax.Array, axis: int | tuple[int, ...] | None = None) -> jax.Array:
    """Each unit's 2-norm, broadcast to `x`'s shape (optax's `unitwise_norm`, any rank).

    A unit is what `axis` leaves: with `axis=None`, the whole leaf for scalars and vectors,
    one output column for a rank-2 or rank-3 kernel (axis 0 summed, optax's rule), and one
    output channel for a rank-4+ convolution kernel (every axis but the last summed). A
    rank-3 Conv1D kernel (width, in, out) needs `axis=(0, 1)`: rank 3 alone cannot tell it
    from a multi-head kernel.
    """
    x = jnp.asarray(x)
    squares = x * x  # optax's abs_sq on real leaves
    squared = jnp.sum(squares, axis=_unit_axes(x.shape, axis), keepdims=True)
    return jnp.broadcast_to(jnp.sqrt(squared), x.shape)


def _unitwise_clip(g_norm: jax.Array, max_norm: jax.Array, g: jax.Array) -> jax.Array:
    clipped = g * (max_norm / jnp.maximum(g_norm, AGC_DIV_EPS))
    return jnp.where(g_norm < max_norm, g, clipped)  # branch-free: one program for every step


def adaptive_grad_clip(
    clipping: jax.typing.ArrayLike,
    eps: jax.typing.ArrayLike = 1e-3,
    axis: int | tuple[int, ...] | None = None,
) -> optax.GradientTransformation:
    """Adaptive gradient clipping: each unit's update norm at most `clipping` times its
    parameter norm (floored at `eps`); optax's `adaptive_grad_clip`, for kernels of any rank.

    Args:
      clipping: the largest allowed ratio of a unit's update norm to its parameter norm.
      eps: the floor on the parameter norm (so zero-initialised units can still move).
      axis: the axes summed for each unit's norm (default: inferred, see `unitwise_norm`).

    Returns:
      A stateless `optax.GradientTransformation`; its `update` needs `params`.
    """
    check_hyperparameter("clipping", clipping)
    check_hyperparameter("eps", eps)

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("adaptive_grad_clip needs params: call update(updates, state, params)")
        g_norm = jax.tree.map(lambda g: unitwise_norm(g, axis), updates)
        p_norm = jax.tree.map(lambda p: unitwise_norm(p, axis), params)
        max_norm = jax.tree.map(lambda n: clipping * jnp.maximum(n, eps), p_norm)
        return jax.tree.map(_unitwise_clip, g_norm, max_norm, updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def clip_by_block_rms(threshold: jax.typing.ArrayLike) -> optax.GradientTransformation:
    """Each leaf scaled so that its root mean square is at most `threshold` (optax's
    `clip_by_block_rms`; a zero leaf stays zero at `threshold=0`).

    Returns:
      A stateless `optax.GradientTransformation`.
    """
    check_hyperparameter("threshold", threshold)

    def clip_leaf(u: jax.Array) -> jax.Array:
        ratio = jnp.sqrt(jnp.mean(u * u)) / threshold
        # optax divides by max(1, ratio); 0 / 0 = NaN there. NaN > 1 is false: u stays.
        return u / jnp.where(ratio > 1, ratio, jnp.ones_like(ratio))

    def update(updates, state, params=None):
        del params
        return jax.tree.map(clip_leaf, updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def per_example_global_norm_clip(
    grads: Any, l2_norm_clip: jax.typing.ArrayLike
) -> tuple[Any, jax.Array]:
    """Clip each example's gradient to global norm `l2_norm_clip`, then sum over examples.

    Args:
      grads: a pytree (optax takes a list) of arrays, each with the batch on axis 0.
      l2_norm_clip: the largest global norm of one example's gradient.

    Returns:
      `(clipped_sum, num_clipped)`: the tree of sums over the batch of the clipped
      per-example gradients, and how many examples were scaled down (an int32 array).
    """
    check_hyperparameter("l2_norm_clip", l2_norm_clip)
    leaves = jax.tree.leaves(grads)
    if not leaves or any(jnp.ndim(g) == 0 for g in leaves):
        raise ValueError("per_example_global_norm_clip needs arrays with a batch axis first")
    if len({jnp.shape(g)[0] for g in leaves}) != 1:
        raise ValueError(
            "per_example_global_norm_clip: every leaf needs the same batch size on axis 0 "
            f"(got {[jnp.shape(g)[0] for g in leaves]})"
        )
    norms = jax.vmap(optax.tree.norm)(grads)  # (B,), optax's own per-example measurement
    multipliers = jnp.nan_to_num(jnp.minimum(l2_norm_clip / norms, 1.0), nan=1.0)
    num_clipped = jnp.sum(multipliers < 1.0)
    return jax.tree.map(lambda g: jnp.tensordot(multipliers, g, axes=1), grads), num_clipped
