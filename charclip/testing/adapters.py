"""Adapters: how the kit calls a clipper, by calling convention.

An adapter takes the user's function and returns a clipper the promises can call: given
NumPy leaves and a threshold, it returns an `Output` (or the clipped list, or
`(clipped, norm)`). Without an adapter, `check_clipper` uses:

  framework="numpy": `functional(fn)`        fn(list of np.ndarray, tau) -> clipped or (clipped, norm)
  framework="jax":   `functional(fn, "jax")`  the same on jax.Arrays
  framework="torch": `inplace_torch(fn)`      fn(parameters with .grad, tau), clips in place,
                                              returns the norm (or None), as clip_grad_norm_

Others: `optax_transformation(factory)` for `factory(tau) -> optax.GradientTransformation`
(as `optax.clip_by_global_norm`), and `keras_option("global_clipnorm")` for a Keras 3
optimizer class (the clipped gradient is read back from one SGD-like step from zero
with learning rate 1: the parameter moves to exactly -g').
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from charclip.testing.promises import Output
from charclip.testing.strategies import (
    dtype_name,
    from_torch,
    jax_tree,
    torch_parameters,
)


def to_numpy(x: Any) -> np.ndarray:
    """NumPy with the same bits and dtype, from NumPy, torch, JAX or TensorFlow arrays."""
    if hasattr(x, "detach"):  # torch
        return from_torch(x)
    a = np.asarray(x)
    return a.copy() if a.base is not None else a


def _norm(norm: Any) -> tuple[float | None, str | None]:
    if norm is None:
        return None, None
    dtype = getattr(norm, "dtype", None)
    return float(np.asarray(to_numpy(norm), np.float64)), dtype_name(
        dtype
    ) if dtype is not None else "float64"


def output(result: Any) -> Output:
    """An `Output` from what a functional clipper returned: the clipped list or (clipped, norm)."""
    if isinstance(result, Output):
        return result
    if (
        isinstance(result, tuple)
        and len(result) == 2
        and isinstance(result[0], (list, tuple, dict))
    ):
        clipped, norm = result
    else:
        clipped, norm = result, None
    if isinstance(clipped, dict):  # a pytree given back as a dict: its leaves in key order
        import jax

        clipped = jax.tree.leaves(clipped)
    return Output([to_numpy(c) for c in clipped], *_norm(norm))


def functional(
    fn: Callable, framework: str = "numpy"
) -> Callable[[list[np.ndarray], float], Output]:
    """fn(leaves, tau) -> clipped list or (clipped, norm), on NumPy or JAX arrays."""

    def clipper(leaves, tau):
        if framework == "jax":
            import jax

            arrays = jax.tree.leaves(jax_tree(leaves))
        else:
            arrays = list(leaves)
        return output(fn(arrays, tau))

    return clipper


def inplace_torch(fn: Callable) -> Callable[[list[np.ndarray], float], Output]:
    """fn(parameters, tau), clipping each parameter's `.grad` in place; returns the norm or None."""

    def clipper(leaves, tau):
        params = torch_parameters(leaves)
        norm = fn(params, tau)
        return Output([from_torch(p.grad) for p in params], *_norm(norm))

    return clipper


def optax_transformation(factory: Callable) -> Callable[[list[np.ndarray], float], Output]:
    """factory(tau) -> optax.GradientTransformation; the clipped gradient is its update."""

    def clipper(leaves, tau):
        import jax

        tree = jax_tree(leaves)
        tx = factory(tau)
        updates, _ = tx.update(tree, tx.init(tree), tree)
        return Output([to_numpy(u) for u in jax.tree.leaves(updates)])

    return clipper


def keras_option(option: str = "global_clipnorm") -> Callable[[Callable], Callable]:
    """An adapter for a Keras 3 optimizer class and its clipping option (`global_clipnorm`,
    `clipnorm`, `clipvalue`), on whatever backend Keras runs (KERAS_BACKEND)."""

    def adapter(optimizer_class: Callable) -> Callable[[list[np.ndarray], float], Output]:
        def clipper(leaves, tau):
            import keras

            opt = optimizer_class(learning_rate=1.0, **{option: tau})
            variables = [
                keras.Variable(np.zeros(a.shape, a.dtype), dtype=dtype_name(a.dtype))
                for a in leaves
            ]
            grads = [keras.ops.convert_to_tensor(a, dtype=dtype_name(a.dtype)) for a in leaves]
            opt.apply(grads, variables)
            return Output([-to_numpy(keras.ops.convert_to_numpy(v.value)) for v in variables])

        return clipper

    return adapter
