"""Hypothesis strategies for gradients: pytrees of NumPy arrays, thresholds, dtypes.

A gradient tree is a dict or list (nested once at most) of 1 to 8 NumPy arrays of one
floating dtype (bfloat16 through `ml_dtypes`, which JAX ships). Tests convert the same
arrays to torch tensors and JAX arrays, so every backend sees identical bits.

Shapes come from a few fixed buckets (scalars and empty arrays included) so that a
jitted function compiles a bounded number of times.

Magnitudes:
- `ordinary`: entries within six decades of one another, the whole tree scaled by a
  power of ten chosen so no square overflows or underflows in the dtype; the libraries
  are exact there, and the conventions must match them bit for bit.
- `extreme`: each leaf scaled by a power of two from the subnormal range to near the
  dtype's maximum, so squares overflow and underflow.
"""

import math

import jax
import ml_dtypes
import numpy as np
from hypothesis import strategies as st

# The conformance kit's copies: one exact oracle, one way to name a dtype and to move the same
# bits between NumPy and torch (re-exported for the tests).
from charclip.testing.oracle import exact_norm  # noqa: F401
from charclip.testing.strategies import DTYPES, from_torch, np_dtype, to_torch  # noqa: F401

FLOAT_DTYPES = DTYPES  # the kit's four dtypes
LOW_PRECISION = ("float16", "bfloat16")
SHAPES = ((), (0,), (1,), (3,), (8,), (2, 4), (4, 4), (2, 3, 2))

# Powers of ten by which an `ordinary` tree may be scaled: squares of entries up to
# 1e3 * 10**k and down to 1e-3 * 10**k stay normal numbers of the dtype.
ORDINARY_DECADES = {
    "float16": (-1, 0),
    "bfloat16": (-8, 8),
    "float32": (-8, 8),
    "float64": (-60, 60),
}


def finfo(name: str):
    return ml_dtypes.finfo(ml_dtypes.bfloat16) if name == "bfloat16" else np.finfo(name)


def thresholds(low: float = 1e-3, high: float = 1e3) -> st.SearchStrategy[float]:
    """max_norm (tau), log-uniform between `low` and `high`."""
    return st.floats(math.log10(low), math.log10(high)).map(lambda e: float(10.0**e))


def _leaf(
    rng: np.random.Generator, dtype: str, shape: tuple[int, ...], exponent: int, zeros: float
) -> np.ndarray:
    """Entries of magnitude 1e-3 to 1e3, log-uniform, a fraction `zeros` of them exactly
    zero, times 2**exponent. NumPy draws the entries from a seed Hypothesis chose: drawing
    each entry through Hypothesis costs ~40 ms a tree, which the suite cannot afford."""
    size = math.prod(shape)
    values = rng.choice((-1.0, 1.0), size) * 10.0 ** rng.uniform(-3, 3, size)
    values[rng.random(size) < zeros] = 0.0
    return np.ldexp(values, exponent).reshape(shape).astype(np_dtype(dtype))


def _structure(draw, leaves: list[np.ndarray]):
    """Put the leaves in a dict, a list, or a dict holding a list."""
    kind = draw(st.sampled_from(("dict", "list", "nested")))
    if kind == "list":
        return list(leaves)
    if kind == "dict":
        return {f"w{i}": leaf for i, leaf in enumerate(leaves)}
    half = len(leaves) // 2
    return {"head": list(leaves[:half]), **{f"w{i}": leaf for i, leaf in enumerate(leaves[half:])}}


@st.composite
def gradient_trees(
    draw,
    dtypes: tuple[str, ...] = FLOAT_DTYPES,
    *,
    magnitudes: str = "ordinary",
    min_leaves: int = 1,
    max_leaves: int = 8,
    shapes: tuple[tuple[int, ...], ...] = SHAPES,
):
    """A pytree of 1 to 8 arrays of one dtype drawn from `dtypes`."""
    dtype = draw(st.sampled_from(dtypes))
    n = draw(st.integers(min_leaves, max_leaves))
    leaf_shapes = draw(st.lists(st.sampled_from(shapes), min_size=n, max_size=n))
    if magnitudes == "ordinary":
        low, high = ORDINARY_DECADES[dtype]
        shift = round(draw(st.integers(low, high)) * math.log2(10))
        exponents = [shift] * n
    else:
        info = finfo(dtype)
        lowest = int(info.minexp) - int(info.nmant)  # the smallest subnormal's exponent
        highest = int(info.maxexp) - 11  # 1e3 * 2**e stays below the dtype's maximum
        exponents = draw(st.lists(st.integers(lowest, highest), min_size=n, max_size=n))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    zeros = draw(st.sampled_from((0.0, 0.0, 0.25, 1.0)))
    leaves = [_leaf(rng, dtype, s, e, zeros) for s, e in zip(leaf_shapes, exponents)]
    return _structure(draw, leaves)


def nonzero(tree_strategy: st.SearchStrategy) -> st.SearchStrategy:
    """Trees with at least one non-zero entry."""
    return tree_strategy.filter(
        lambda tree: any(
            np.any(np.asarray(leaf, np.float64) != 0) for leaf in jax.tree.leaves(tree)
        )
    )


# The same drawn arrays, as each backend sees them.


def leaves(tree) -> list[np.ndarray]:
    """The arrays of a tree, in JAX's order (dict keys sorted)."""
    return jax.tree.leaves(tree)
