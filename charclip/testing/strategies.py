"""Hypothesis strategies for gradients and thresholds, in NumPy, torch or JAX form.

A gradient is 1 to `max_leaves` leaves of one floating dtype. A leaf is a scalar, an
empty array, or a 1-D array: a few drawn entries, possibly tiled (repeated up to 100
times, which is how accumulated rounding such as bfloat16's shows itself). Each entry is
`sign * (1 + k/16) * 2**e`, one e per leaf: Hypothesis draws k (with the sign) and e as
integers, so a failing example shrinks to few leaves, few entries, k = 0 and e near 0,
i.e. values such as `1.0`, `-2.0`, `0.5` that a person reads at a glance.

Magnitudes (`magnitudes=`):
- "ordinary": every square and the sum of all squares are normal numbers of the dtype,
  with 4 binary orders of magnitude to spare (so a gradient scaled by 2**±4 stays
  ordinary): the range where a correct clipper has no excuse for any error;
- "extreme": each leaf its own power of two, from the dtype's smallest subnormal to its
  largest finite numbers, so squares overflow or underflow;
- "overflow": ordinary leaves plus one leaf whose squares overflow the dtype.

`nonfinite=True` puts one NaN, +inf or -inf among the entries.

The strategies draw NumPy arrays (bfloat16 through `ml_dtypes`, imported only when
bfloat16 is asked for); `gradient_trees(framework="torch")` turns them into parameters
with `.grad` set, `framework="jax"` into a pytree of `jax.Array`s. torch and JAX are
imported only then.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

DTYPES = ("float16", "bfloat16", "float32", "float64")
MAGNITUDES = ("ordinary", "extreme", "overflow")
FRAMEWORKS = ("numpy", "torch", "jax")
MAX_REPEAT = 100
SPARE_BITS = 4  # ordinary gradients may be scaled by 2**±SPARE_BITS and stay ordinary


def np_dtype(name: str) -> np.dtype:
    """The NumPy dtype of a dtype name (bfloat16 from ml_dtypes)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (got {name!r})")
    return np.dtype(name)


def dtype_name(dtype) -> str:
    """The name of a NumPy, torch or JAX float dtype ('bfloat16', 'float32', ...)."""
    name = str(dtype).replace("torch.", "")
    if name in DTYPES:
        return name
    if getattr(dtype, "name", None) in DTYPES:  # TensorFlow's DType
        return dtype.name
    return str(np.dtype(dtype))


@dataclass(frozen=True)
class Info:
    """What the kit needs to know of a float dtype, as Python floats and ints."""

    eps: float  # 2**-(significand bits - 1): twice the unit roundoff
    bits: int  # significand bits, the implicit one included
    smallest_normal: float
    smallest_subnormal: float
    max: float
    minexp: int  # smallest normal = 2**minexp
    maxexp: int  # max < 2**maxexp


INFO = {
    "float16": Info(2.0**-10, 11, 2.0**-14, 2.0**-24, 65504.0, -14, 16),
    "bfloat16": Info(2.0**-7, 8, 2.0**-126, 2.0**-133, float.fromhex("0x1.fep127"), -126, 128),
    "float32": Info(2.0**-23, 24, 2.0**-126, 2.0**-149, float.fromhex("0x1.fffffep127"), -126, 128),
    "float64": Info(
        2.0**-52, 53, 2.0**-1022, 5e-324, float.fromhex("0x1.fffffffffffffp1023"), -1022, 1024
    ),
}


@dataclass(frozen=True)
class Gradient:
    """A drawn gradient: its dtype's name and its leaves as NumPy arrays, in order."""

    dtype: str
    leaves: tuple[np.ndarray, ...]

    @property
    def size(self) -> int:
        return sum(a.size for a in self.leaves)

    def __repr__(self) -> str:
        return f"[{', '.join(describe_leaf(a) for a in self.leaves)}] ({self.dtype})"


def describe_leaf(a: np.ndarray) -> str:
    """A short, exact text for a leaf: `[0.5] * 100`, `[1.0, -2.0]`, `3.0` (a scalar), `[]`."""
    values = [float(x) for x in np.asarray(a, np.float64).ravel()]
    if a.ndim == 0:
        return repr(values[0])
    for period in range(1, len(values) // 2 + 1):  # a tile repeated: show it once
        if len(values) % period == 0 and values == values[:period] * (len(values) // period):
            return f"{values[:period]!r} * {len(values) // period}"
    return repr(values)


def _window(dtype: str, entries: int) -> tuple[int, int]:
    """Exponents e with every square of (1 + k/16) 2**e, and the sum of `entries` of them,
    normal in the dtype, with SPARE_BITS to spare on both sides."""
    info = INFO[dtype]
    low = -((-info.minexp) // 2) + SPARE_BITS  # (2**low)**2 >= smallest normal
    high = (info.maxexp - 1 - math.ceil(math.log2(max(entries, 1)))) // 2 - 1 - SPARE_BITS
    return low, high


_LEAF_KIND = st.tuples(st.integers(0, 3), st.sampled_from((1, 1, 1, MAX_REPEAT)), st.booleans())


@functools.cache
def _steps(count: int) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(-15, 15), min_size=count, max_size=count)


def _tile(draw, count: int, low: int, high: int) -> list[float]:
    """`count` entries +-(1 + |k|/16) * 2**e sharing one e in [low, high] (k = 0 gives
    2**e): one choice per entry and one per leaf keeps Hypothesis' own work, most of a
    check's time, small."""
    e = draw(st.integers(low, high))
    return [math.copysign((1 + abs(k) / 16) * 2.0**e, k or 1) for k in draw(_steps(count))]


@st.composite
def _gradients(
    draw,
    dtypes=DTYPES,
    *,
    magnitudes: str = "ordinary",
    nonfinite: bool = False,
    min_leaves: int = 1,
    max_leaves: int = 4,
    zeros: bool = True,
) -> Gradient:
    if magnitudes not in MAGNITUDES:
        raise ValueError(f"magnitudes must be one of {', '.join(MAGNITUDES)} (got {magnitudes!r})")
    dtype = draw(st.sampled_from(tuple(dtypes)))
    info = INFO[dtype]
    n = draw(st.integers(min_leaves, max_leaves))
    # A leaf: 0 (scalar), or a tile of 0 to 4 entries repeated `repeat` times.
    kinds = draw(st.lists(_LEAF_KIND, min_size=n, max_size=n))
    shapes = [
        (1, 1, True) if scalar and count == 1 else (count, repeat, False)
        for count, repeat, scalar in kinds
    ]
    entries = sum(c * r for c, r, _ in shapes)
    low, high = _window(dtype, entries)
    huge = draw(st.integers(0, n - 1)) if magnitudes == "overflow" else -1
    if magnitudes == "overflow":
        shapes[huge] = (max(shapes[huge][0], 1), shapes[huge][1], shapes[huge][2])
    leaves = []
    for i, (count, repeat, scalar) in enumerate(shapes):
        if i == huge:  # every square overflows: 2**(2e) > max
            tile = _tile(draw, count, info.maxexp // 2, info.maxexp - 1)
        elif magnitudes == "extreme":
            tile = _tile(draw, count, info.minexp - info.bits + 1, info.maxexp - 1)
        else:  # half the leaves near 1, so products and quotients of norms near 1 come up
            near = draw(st.booleans())
            tile = (
                _tile(draw, count, max(low, -8), min(high, 8))
                if near
                else _tile(draw, count, low, high)
            )
        if (
            zeros and tile and i != huge and draw(st.integers(0, 7)) == 0
        ):  # now and then a leaf of zeros
            tile = [0.0] * count
        values = np.asarray(tile * repeat, np.float64)
        values = np.clip(
            values, -info.max, info.max
        )  # (1 + 15/16) 2**(maxexp-1) would round to inf
        leaf = values.astype(np_dtype(dtype))
        leaves.append(leaf.reshape(()) if scalar else leaf)
    if nonfinite:
        sized = [i for i, a in enumerate(leaves) if a.size]
        if not sized:
            leaves[0] = np.zeros(1, np_dtype(dtype))
            sized = [0]
        i = draw(st.sampled_from(sized))
        j = draw(st.integers(0, leaves[i].size - 1))
        flat = np.array(leaves[i], copy=True).ravel()
        flat[j] = draw(st.sampled_from((math.nan, math.inf, -math.inf)))
        leaves[i] = flat.reshape(leaves[i].shape)
    return Gradient(dtype, tuple(leaves))


def gradient_trees(
    framework: str = "numpy",
    dtypes: tuple[str, ...] = DTYPES,
    *,
    magnitudes: str = "ordinary",
    nonfinite: bool = False,
    min_leaves: int = 1,
    max_leaves: int = 4,
) -> st.SearchStrategy:
    """Gradients for `@given`: 1 to `max_leaves` leaves of one dtype drawn from `dtypes`.

    Returns, by `framework`:
      "numpy": a list of NumPy arrays;
      "torch": a list of `torch.nn.Parameter`s (zeros) whose `.grad` holds the gradient,
               ready for a `clip_grad_norm_`-style function;
      "jax":   a pytree (a dict of leaves, or a dict holding a list) of `jax.Array`s.
    `magnitudes` ("ordinary", "extreme", "overflow") and `nonfinite` are described in the
    module's docstring. Shrinks to few leaves and simple values such as 1.0 and 0.5.
    """
    if framework not in FRAMEWORKS:
        raise ValueError(f"framework must be one of {', '.join(FRAMEWORKS)} (got {framework!r})")
    for d in dtypes:
        np_dtype(d)
    base = _gradients(
        tuple(dtypes),
        magnitudes=magnitudes,
        nonfinite=nonfinite,
        min_leaves=min_leaves,
        max_leaves=max_leaves,
    )
    if framework == "numpy":
        return base.map(lambda g: list(g.leaves))
    if framework == "torch":
        return base.map(lambda g: torch_parameters(g.leaves))
    return st.tuples(base, st.booleans()).map(lambda gn: jax_tree(gn[0].leaves, nested=gn[1]))


def thresholds(kind: str = "ordinary") -> st.SearchStrategy[float]:
    """max_norm values: "ordinary" (1e-3 to 1e3, shrinking to 1.0), "any" (those, and 0,
    subnormal and huge ones), "invalid" (negative, -inf, NaN)."""
    ordinary = st.one_of(st.floats(1e-3, 1e3), st.integers(-10, 9).map(lambda e: 2.0**e))
    if kind == "ordinary":
        return ordinary
    if kind == "any":
        return st.one_of(ordinary, st.sampled_from((0.0, 5e-324, 1e-310, 1e-40, 1e300, 3e38)))
    if kind == "invalid":
        return st.sampled_from((-1.0, math.nan, -0.5, -math.inf, -1e-300))
    raise ValueError(f"kind must be 'ordinary', 'any' or 'invalid' (got {kind!r})")


# ---- the same bits in each framework ------------------------------------------------------


def to_torch(a: np.ndarray):
    import torch

    if (
        dtype_name(a.dtype) == "bfloat16"
    ):  # NumPy has no bfloat16 torch understands: through float32, exactly
        return torch.from_numpy(np.asarray(a, np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.array(a))


def from_torch(t) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.float().numpy().astype(np_dtype("bfloat16"))
    return t.numpy().copy()


def torch_parameters(leaves) -> list:
    """Zero parameters whose `.grad` holds `leaves` (same bits, same dtypes)."""
    import torch

    params = []
    for a in leaves:
        g = to_torch(a)
        p = torch.nn.Parameter(torch.zeros(g.shape, dtype=g.dtype))
        p.grad = g
        params.append(p)
    return params


def jax_tree(leaves, nested: bool = False):
    """A pytree whose leaves (in JAX's order) are `leaves`, as jax.Arrays."""
    import jax.numpy as jnp

    arrays = [jnp.asarray(a) for a in leaves]
    names = [f"w{i:02d}" for i in range(len(arrays))]  # sorted keys keep the order
    if nested and len(arrays) > 1:
        return {"a": arrays[:1], **dict(zip(names[1:], arrays[1:]))}
    return dict(zip(names, arrays))
