"""Promises for the rest of the clipping family: AGC, block RMS, per-example clipping.

Each family member has its own promises, named `<family>_<promise>` and checked one by one
with the same runner as the global-norm promises (`check.run_promise`); `check_family`
returns the same `Report`. The clippers are called on NumPy arrays:

  "agc":          fn(grads, params, clipping) -> clipped grads   (eps = 1e-3, the default)
  "block_rms":    fn(leaves, threshold) -> clipped leaves
  "per_example":  fn(leaves, l2_norm_clip) -> (summed leaves, num_clipped); each leaf's
                  axis 0 is the batch

Adapters for optax transformations and torch's in-place convention are below. The
promises (g' the clipped gradient, slack s = (n + 4 + ulps) eps of the dtype for a unit or
leaf of n entries: a sum of n squares, a square root, a max, a divide, a multiply):

  agc_unit_bound         each unit's ||g'_u|| <= clipping * max(||w_u||, eps) (1 + s)
  agc_identity_below     a unit with ||g_u|| <= that bound (1 - s) is unchanged, bit for bit
  agc_direction_kept     each unit's g'_u = c_u g_u, 0 <= c_u <= 1
  agc_bad_clipping_refused      a negative or NaN `clipping` raises
  block_rms_bound        each leaf's rms(g') <= threshold (1 + s)
  block_rms_identity_below      a leaf with rms(g) <= threshold (1 - s) is unchanged
  block_rms_direction_kept      each leaf's g' = c g, 0 <= c <= 1
  block_rms_threshold_zero      threshold 0 gives zeros, never NaN (also for zero leaves)
  block_rms_bad_threshold_refused  a negative or NaN threshold raises
  per_example_bound      each example alone (a batch of one) sums to norm <= C (1 + s)
  per_example_sum        the sum is sum_b min(1, C / ||g_b||) g_b, within rounding
  per_example_count      num_clipped is #{b : ||g_b|| > C} (examples within s of C may count
                         either way)
  per_example_bad_clip_refused   a negative or NaN C raises

A unit is a slice of a leaf along its output axis, which depends on the layout the clipper
reads: "out_first" (torch: (out, in, *kernel)) or "out_last" (optax/Flax: (*kernel, in,
out)); a leaf with at most one dimension larger than 1 is one unit. Gradients are drawn
with entries k/16 * 2**e (|k| <= 16, one e per leaf, ordinary magnitudes), so a failure
shrinks to small exact numbers; leaves are scalars, vectors, matrices and rank-4
(convolution-like) tensors. Rank 3 is left out: optax reads it as multi-head, not Conv1D.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from hypothesis import strategies as st

from charclip.testing.oracle import exact_norm, sum_of_squares
from charclip.testing.promises import Broken, Options, Promise, _assert_direction, _flat
from charclip.testing.strategies import INFO, describe_leaf, np_dtype

FAMILIES = ("agc", "block_rms", "per_example")
LAYOUTS = ("out_first", "out_last")
AGC_EPS = 1e-3  # the eps every AGC clipper is called with (optax's default)
SHAPES = ((), (3,), (2, 3), (3, 2), (1, 4), (2, 2, 1, 3))
INVALID = (-1.0, math.nan, -0.5, -math.inf)
# float32 and float64 by default: the family's checks compile JAX programs per shape and
# dtype, and its low-precision behaviour is the global norm's (the main table has it).
FAMILY_DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class FamilyCase:
    """One drawn input: the leaves (grads), the params (AGC only) and the threshold."""

    dtype: str
    leaves: tuple[np.ndarray, ...]
    threshold: float
    params: tuple[np.ndarray, ...] = ()

    def __repr__(self) -> str:
        def show(arrays):
            return "[" + ", ".join(f"{describe_leaf(a)} {tuple(a.shape)}" for a in arrays) + "]"

        more = f", params = {show(self.params)}" if self.params else ""
        return f"g = {show(self.leaves)} ({self.dtype}){more}, threshold = {self.threshold!r}"


# ---- strategies -------------------------------------------------------------------------


@st.composite
def _leaf(draw, dtype: str, shape: tuple[int, ...], zero: bool = False) -> np.ndarray:
    n = int(np.prod(shape))
    if zero:
        return np.zeros(shape, np_dtype(dtype))
    e = draw(st.integers(-3, 3))
    ks = draw(st.lists(st.integers(-16, 16), min_size=n, max_size=n))
    return (np.array(ks, np.float64).reshape(shape) / 16 * 2.0**e).astype(np_dtype(dtype))


@st.composite
def _agc_cases(draw, dtype: str, threshold=None) -> FamilyCase:
    # An invalid threshold needs no varied shapes (each new shape costs JAX a compilation).
    few = (SHAPES[2],) if threshold is not None else SHAPES
    shapes = draw(st.lists(st.sampled_from(few), min_size=1, max_size=1 if len(few) == 1 else 3))
    grads = tuple(draw(_leaf(dtype, s)) for s in shapes)
    params = tuple(
        draw(_leaf(dtype, s, zero=draw(st.booleans()) and i == 0)) for i, s in enumerate(shapes)
    )
    clipping = draw(
        threshold if threshold is not None else st.sampled_from((0.01, 0.1, 1.0, 1000.0))
    )
    return FamilyCase(dtype, grads, clipping, params)


@st.composite
def _block_cases(draw, dtype: str, threshold=None, zeros: bool = False) -> FamilyCase:
    few = (SHAPES[2],) if threshold is not None and not zeros else SHAPES
    shapes = draw(st.lists(st.sampled_from(few), min_size=1, max_size=1 if len(few) == 1 else 3))
    leaves = tuple(draw(_leaf(dtype, s, zero=zeros and draw(st.booleans()))) for s in shapes)
    taus = st.sampled_from((0.05, 0.25, 1.0, 3.0))
    return FamilyCase(dtype, leaves, draw(threshold if threshold is not None else taus))


@st.composite
def _batch_cases(draw, dtype: str, threshold=None) -> FamilyCase:
    batch = 2 if threshold is not None else draw(st.sampled_from((1, 3)))
    few = (SHAPES[1],) if threshold is not None else SHAPES[1:4]
    shapes = draw(st.lists(st.sampled_from(few), min_size=1, max_size=1 if len(few) == 1 else 2))
    leaves = tuple(draw(_leaf(dtype, (batch, *s))) for s in shapes)
    taus = st.sampled_from((0.1, 0.5, 1.0, 2.0, 8.0))
    return FamilyCase(dtype, leaves, draw(threshold if threshold is not None else taus))


# ---- units and checks -----------------------------------------------------------------------


def units(a: np.ndarray, layout: str) -> list[np.ndarray]:
    """The units of a leaf in `layout` (each as a flat float64 array)."""
    a = np.asarray(a, np.float64)
    if sum(d != 1 for d in a.shape) <= 1:
        return [a.ravel()]
    if layout == "out_first":
        return [a[i].ravel() for i in range(a.shape[0])]
    return [a[..., j].ravel() for j in range(a.shape[-1])]


def _slack(dtype: str, n: int, o: Options) -> Fraction:
    return Fraction(n + 4 + o.ulps) * Fraction(INFO[dtype].eps)


def _shapes_kept(got: list[np.ndarray], want: Iterable[np.ndarray]) -> list[np.ndarray]:
    got = [np.asarray(a) for a in got]
    if [a.shape for a in got] != [a.shape for a in want]:
        raise Broken(f"returned shapes {[a.shape for a in got]} for {[a.shape for a in want]}")
    return got


def _norm_text(arrays) -> str:
    """The exact norm, or the entries themselves when some are not finite."""
    flat = _flat(arrays)
    return repr(exact_norm([flat])) if np.all(np.isfinite(flat)) else repr(flat.tolist())


def _refused(call: Callable[[], object], what: str, value: float) -> None:
    try:
        call()
    except Broken:
        raise
    except Exception:  # noqa: BLE001  (any exception refuses the value)
        return
    raise Broken(f"accepted {what} = {value!r}")


def _agc_bounds(case: FamilyCase, layout: str) -> list[list[float]]:
    return [
        [case.threshold * max(exact_norm([w]), AGC_EPS) for w in units(p, layout)]
        for p in case.params
    ]


def _agc_call(fn, case: FamilyCase) -> list[np.ndarray]:
    out = fn([a.copy() for a in case.leaves], [a.copy() for a in case.params], case.threshold)
    return _shapes_kept(out, case.leaves)


def agc_promises(layout: str) -> dict[str, Promise]:
    """The AGC promises for a clipper that reads `layout` ("out_first" or "out_last")."""

    def unit_bound(fn, case: FamilyCase, o: Options) -> None:
        out = _agc_call(fn, case)
        for leaf, (g, bounds) in enumerate(zip(out, _agc_bounds(case, layout))):
            for u, (gu, m) in enumerate(zip(units(g, layout), bounds)):
                limit = Fraction(m) * (1 + _slack(case.dtype, gu.size, o))
                if not np.all(np.isfinite(gu)) or sum_of_squares([gu]) > limit * limit:
                    raise Broken(
                        f"leaf {leaf}, unit {u}: ||g'_u|| = {_norm_text([gu])}"
                        f" > clipping * max(||w_u||, eps) = {m!r}"
                    )

    def identity_below(fn, case: FamilyCase, o: Options) -> None:
        out = _agc_call(fn, case)
        for leaf, (g, g0, bounds) in enumerate(zip(out, case.leaves, _agc_bounds(case, layout))):
            for u, (gu, g0u, m) in enumerate(zip(units(g, layout), units(g0, layout), bounds)):
                below = Fraction(m) * (1 - _slack(case.dtype, g0u.size, o))
                if sum_of_squares([g0u]) <= below * below and not np.array_equal(gu, g0u):
                    raise Broken(
                        f"leaf {leaf}, unit {u}: ||g_u|| = {exact_norm([g0u])!r} < {m!r}, "
                        f"yet it changed: {g0u.tolist()} -> {gu.tolist()}"
                    )

    def direction_kept(fn, case: FamilyCase, o: Options) -> None:
        out = _agc_call(fn, case)
        for g, g0 in zip(out, case.leaves):
            for gu, g0u in zip(units(g, layout), units(g0, layout)):
                _assert_direction(g0u, gu, case.dtype, float(_slack(case.dtype, 0, o)), False)

    def bad_refused(fn, case: FamilyCase, o: Options) -> None:
        _refused(lambda: _agc_call(fn, case), "clipping", case.threshold)

    return _named(
        "agc",
        (
            (
                "unit_bound",
                "each unit's norm <= clipping * max(||w_u||, eps)",
                _agc_cases,
                unit_bound,
            ),
            ("identity_below", "a unit below its bound is unchanged", _agc_cases, identity_below),
            (
                "direction_kept",
                "each unit g'_u = c_u g_u, 0 <= c_u <= 1",
                _agc_cases,
                direction_kept,
            ),
            (
                "bad_clipping_refused",
                "negative or NaN clipping raises",
                lambda d: _agc_cases(d, st.sampled_from(INVALID)),
                bad_refused,
            ),
        ),
    )


def _block_call(fn, case: FamilyCase, threshold: float | None = None) -> list[np.ndarray]:
    t = case.threshold if threshold is None else threshold
    return _shapes_kept(fn([a.copy() for a in case.leaves], t), case.leaves)


def _rms_at_most(a: np.ndarray, bound: Fraction) -> bool:
    return a.size == 0 or sum_of_squares([a]) <= bound * bound * a.size


def _block_bound(fn, case: FamilyCase, o: Options) -> None:
    for i, g in enumerate(_block_call(fn, case)):
        limit = Fraction(case.threshold) * (1 + _slack(case.dtype, g.size, o))
        if not np.all(np.isfinite(g)) or not _rms_at_most(np.asarray(g, np.float64), limit):
            raise Broken(f"leaf {i}: rms(g') = {_rms(g)!r} > threshold = {case.threshold!r}")


def _rms(a) -> float:
    a = np.asarray(a, np.float64)
    return exact_norm([a]) / math.sqrt(a.size) if np.all(np.isfinite(a)) and a.size else math.nan


def _block_identity(fn, case: FamilyCase, o: Options) -> None:
    for i, (g, g0) in enumerate(zip(_block_call(fn, case), case.leaves)):
        below = Fraction(case.threshold) * (1 - _slack(case.dtype, g0.size, o))
        if _rms_at_most(np.asarray(g0, np.float64), below) and not np.array_equal(g, g0):
            raise Broken(f"leaf {i}: rms(g) = {_rms(g0)!r} below threshold, yet it changed")


def _block_direction(fn, case: FamilyCase, o: Options) -> None:
    for g, g0 in zip(_block_call(fn, case), case.leaves):
        _assert_direction(
            _flat([g0]), _flat([g]), case.dtype, float(_slack(case.dtype, 0, o)), False
        )


def _block_zero(fn, case: FamilyCase, o: Options) -> None:
    flat = _flat(_block_call(fn, case, 0.0))
    if not np.all(flat == 0):
        raise Broken(f"threshold 0 left entries {flat[flat != 0][:4].tolist()}")


def _block_refused(fn, case: FamilyCase, o: Options) -> None:
    _refused(lambda: _block_call(fn, case), "threshold", case.threshold)


def _example(case: FamilyCase, b: int) -> list[np.ndarray]:
    return [np.asarray(a[b], np.float64) for a in case.leaves]


def _per_example_call(fn, leaves, c: float):
    out, count = fn([a.copy() for a in leaves], c)
    return [np.asarray(a) for a in out], count


def _pe_bound(fn, case: FamilyCase, o: Options) -> None:
    for b in range(case.leaves[0].shape[0]):
        one = [a[b : b + 1] for a in case.leaves]
        out, _ = _per_example_call(fn, one, case.threshold)
        limit = Fraction(case.threshold) * (1 + _slack(case.dtype, sum(a.size for a in one), o))
        if not np.all(np.isfinite(_flat(out))) or sum_of_squares(out) > limit * limit:
            raise Broken(
                f"example {b} alone: ||clipped|| = {_norm_text(out)}"
                f" > l2_norm_clip = {case.threshold!r}"
            )


def _pe_sum(fn, case: FamilyCase, o: Options) -> None:
    out, _ = _per_example_call(fn, case.leaves, case.threshold)
    out = _shapes_kept(out, [a[0] for a in case.leaves])
    batch = case.leaves[0].shape[0]
    c = [
        min(1.0, case.threshold / n) if (n := exact_norm(_example(case, b))) else 1.0
        for b in range(batch)
    ]
    want = [sum(c[b] * np.asarray(a[b], np.float64) for b in range(batch)) for a in case.leaves]
    size = sum(a[0].size for a in case.leaves)
    rtol = float(_slack(case.dtype, size + batch, o))
    for i, (got, w, a) in enumerate(zip(out, want, case.leaves)):
        scale = sum(c[b] * np.abs(np.asarray(a[b], np.float64)) for b in range(batch))
        off = np.abs(np.asarray(got, np.float64) - w) - (
            rtol * scale + INFO[case.dtype].smallest_normal
        )
        if not np.all(np.isfinite(got)) or np.any(off > 0):
            raise Broken(
                f"leaf {i}: sum {np.asarray(got).tolist()}, expected {w.tolist()} (factors {c})"
            )


def _pe_count(fn, case: FamilyCase, o: Options) -> None:
    _, count = _per_example_call(fn, case.leaves, case.threshold)
    size = sum(a[0].size for a in case.leaves)
    s = float(_slack(case.dtype, size, o))
    norms = [exact_norm(_example(case, b)) for b in range(case.leaves[0].shape[0])]
    surely = sum(n > case.threshold * (1 + s) for n in norms)
    maybe = sum(n > case.threshold * (1 - s) for n in norms)
    if not surely <= int(count) <= maybe:
        raise Broken(
            f"num_clipped = {int(count)}; example norms {norms} against "
            f"l2_norm_clip = {case.threshold!r}"
        )


def _pe_refused(fn, case: FamilyCase, o: Options) -> None:
    _refused(
        lambda: _per_example_call(fn, case.leaves, case.threshold), "l2_norm_clip", case.threshold
    )


def _named(family: str, specs) -> dict[str, Promise]:
    return {
        f"{family}_{n}": Promise(f"{family}_{n}", says, inputs, check)
        for n, says, inputs, check in specs
    }


BLOCK_RMS = _named(
    "block_rms",
    (
        ("bound", "each leaf's rms <= threshold", _block_cases, _block_bound),
        (
            "identity_below",
            "a leaf below the threshold is unchanged",
            _block_cases,
            _block_identity,
        ),
        ("direction_kept", "each leaf g' = c g, 0 <= c <= 1", _block_cases, _block_direction),
        (
            "threshold_zero",
            "threshold 0 gives zeros, not NaN",
            lambda d: _block_cases(d, st.just(0.0), zeros=True),
            _block_zero,
        ),
        (
            "bad_threshold_refused",
            "negative or NaN threshold raises",
            lambda d: _block_cases(d, st.sampled_from(INVALID)),
            _block_refused,
        ),
    ),
)

PER_EXAMPLE = _named(
    "per_example",
    (
        ("bound", "each example's clipped norm <= l2_norm_clip", _batch_cases, _pe_bound),
        ("sum", "the sum of min(1, C/||g_b||) g_b", _batch_cases, _pe_sum),
        ("count", "num_clipped counts examples above C", _batch_cases, _pe_count),
        (
            "bad_clip_refused",
            "negative or NaN l2_norm_clip raises",
            lambda d: _batch_cases(d, st.sampled_from(INVALID)),
            _pe_refused,
        ),
    ),
)


def family_promises(family: str, layout: str = "out_last") -> dict[str, Promise]:
    if family == "agc":
        return agc_promises(layout)
    return {"block_rms": BLOCK_RMS, "per_example": PER_EXAMPLE}[family]


FAMILY_PROMISES: dict[str, Promise] = {
    **agc_promises("out_last"),
    **BLOCK_RMS,
    **PER_EXAMPLE,
}  # names and sayings (the AGC checks depend on the layout: `agc_promises`)


def check_family(
    clippers: dict[str, Callable],
    *,
    layout: str = "out_last",
    dtypes: Iterable[str] = FAMILY_DTYPES,
    promises: Iterable[str] | None = None,
    ulps: float = 0,
    max_examples: int = 20,
    seed: int | None = None,
    shrink_budget: int = 200,
    name: str = "family",
):
    """Check family clippers (`{"agc": fn, "block_rms": fn, "per_example": fn}`, any subset,
    called as the module docstring says) against their promises in each of `dtypes`.

    Returns:
      A `Report` (as `check_clipper`'s), one row per promise and dtype.
    """
    from charclip.testing.check import Report, run_promise

    unknown = sorted(set(clippers) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown families {unknown}; the families are {', '.join(FAMILIES)}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)} (got {layout!r})")
    dtypes = tuple(dtypes)
    for d in dtypes:
        np_dtype(d)
    wanted = None if promises is None else set(promises)
    if wanted is not None and wanted - set(FAMILY_PROMISES):
        raise ValueError(f"unknown promises {sorted(wanted - set(FAMILY_PROMISES))}")
    options = Options(ulps=ulps)
    start = time.perf_counter()
    rows = tuple(
        run_promise(fn, p, d, options, max_examples, seed, shrink_budget)
        for family, fn in clippers.items()
        for p in family_promises(family, layout).values()
        if wanted is None or p.name in wanted
        for d in dtypes
    )
    return Report(name, rows, time.perf_counter() - start)


# ---- adapters: optax transformations, torch in place ------------------------------------------


def _jax(arrays):
    import jax.numpy as jnp

    return [jnp.asarray(a) for a in arrays]


def _numpy(arrays) -> list[np.ndarray]:
    from charclip.testing.adapters import to_numpy

    return [to_numpy(a) for a in arrays]


def optax_agc(factory: Callable) -> Callable:
    """`factory(clipping, eps=...)` -> an AGC GradientTransformation (reads "out_last")."""
    return lambda grads, params, c: _numpy(
        factory(c, eps=AGC_EPS).update(_jax(grads), None, _jax(params))[0]
    )


def optax_leafwise(factory: Callable) -> Callable:
    """`factory(threshold)` -> a GradientTransformation that needs no params (block RMS)."""
    return lambda leaves, t: _numpy(factory(t).update(_jax(leaves), None)[0])


def jax_per_example(fn: Callable) -> Callable:
    """`fn(list of arrays, l2_norm_clip) -> (summed, num_clipped)` on JAX arrays."""

    def clipper(leaves, c):
        out, count = fn(_jax(leaves), c)
        return _numpy(out), int(count)

    return clipper


def torch_agc(fn: Callable) -> Callable:
    """`fn(parameters, clipping, eps=...)` clipping each `.grad` in place (reads "out_first")."""
    from charclip.testing.strategies import from_torch, to_torch

    def clipper(grads, params, c):
        import torch

        tensors = [torch.nn.Parameter(to_torch(p)) for p in params]
        for t, g in zip(tensors, grads):
            t.grad = to_torch(g)
        fn(tensors, c, eps=AGC_EPS)
        return [from_torch(t.grad) for t in tensors]

    return clipper


def torch_leafwise(fn: Callable) -> Callable:
    """`fn(parameters, threshold)` clipping each `.grad` in place (block RMS)."""
    from charclip.testing.strategies import from_torch, torch_parameters

    def clipper(leaves, t):
        params = torch_parameters(leaves)
        fn(params, t)
        return [from_torch(p.grad) for p in params]

    return clipper


def torch_per_example(fn: Callable) -> Callable:
    """`fn(list of tensors, l2_norm_clip) -> (summed tensors, num_clipped)`."""
    from charclip.testing.strategies import from_torch, to_torch

    def clipper(leaves, c):
        out, count = fn([to_torch(a) for a in leaves], c)
        return [from_torch(t) for t in out], int(count)

    return clipper


# ---- negative controls ---------------------------------------------------------------------------


def agc_wrong_axis(layout: str) -> Callable:
    """A correct AGC in float64 on the units of the *other* layout: (out, in) read as (in, out)."""
    other = LAYOUTS[1 - LAYOUTS.index(layout)]

    def clip(grads, params, c):
        if not c >= 0:
            raise ValueError("clipping must be >= 0")
        out = []
        for g, p in zip(grads, params):
            g64 = np.asarray(g, np.float64)
            res = g64.copy()
            axis_units = units(g64, other)
            for u, (gu, pu) in enumerate(zip(axis_units, units(p, other))):
                m = c * max(exact_norm([pu]), AGC_EPS)
                n = exact_norm([gu])
                scaled = gu * (m / n) if n > m else gu
                if len(axis_units) == 1:
                    res = scaled.reshape(g.shape)
                elif other == "out_first":
                    res[u] = scaled.reshape(g.shape[1:])
                else:
                    res[..., u] = scaled.reshape(g.shape[:-1])
            out.append(_toward_zero(res, g.dtype))
        return out

    return clip


def block_rms_global(leaves, threshold):
    """Block RMS on the rms of all leaves together instead of each leaf's own."""
    if not threshold >= 0:
        raise ValueError("threshold must be >= 0")
    flat = _flat(leaves)
    rms = exact_norm([flat]) / math.sqrt(flat.size) if flat.size else 0.0
    c = min(1.0, threshold / rms) if rms else 1.0
    return [_toward_zero(np.asarray(a, np.float64) * c, a.dtype) for a in leaves]


def per_example_clip_after_sum(leaves, l2_norm_clip):
    """Sums the examples first, then clips the sum: no example is bounded on its own."""
    if not l2_norm_clip >= 0:
        raise ValueError("l2_norm_clip must be >= 0")
    total = [np.asarray(a, np.float64).sum(axis=0) for a in leaves]
    n = exact_norm(total)
    c = min(1.0, l2_norm_clip / n) if n else 1.0
    return [_toward_zero(t * c, a.dtype) for t, a in zip(total, leaves)], int(c < 1)


def _toward_zero(x, dtype):
    from charclip.testing.controls import _toward_zero as toward_zero

    return toward_zero(x, dtype)


# control -> (its family, the promises its mistake breaks); agc_wrong_axis checked as "out_last"
FAMILY_CONTROLS = {
    "agc_wrong_axis": ("agc", {"agc_unit_bound"}),
    "block_rms_global": ("block_rms", {"block_rms_bound", "block_rms_identity_below"}),
    "per_example_clip_after_sum": ("per_example", {"per_example_sum"}),
}
