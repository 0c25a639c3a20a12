"""The promises a global-norm clipper can make, each named and checked on its own.

For a gradient g (all leaves as one vector), a threshold tau and the clipper's output
g' (and the norm it returns, if it returns one):

  norm_at_most_tau   ||g'|| <= tau (1 + k eps), measured exactly; k = `ulps` (default 0:
                     exactly), eps the input dtype's machine epsilon
  direction_kept     g' = c g with 0 <= c <= 1: every entry's ratio g'_i / g_i is the
                     same up to two roundings in the dtype
  identity_below     ||g|| <= tau (tau representable in the dtype) leaves g' == g, bit for bit
  idempotent         clip(clip(g)) == clip(g), up to two roundings
  scale_invariant    above the threshold, clip(2**k g) == clip(g), up to two roundings
  order_invariant    clipping the leaves in another order gives the same leaves, up to
                     the rounding of a sum in another order
  returns_true_norm  the returned norm is the exact norm of g, rounded in its own dtype
                     (inf where the true norm exceeds that dtype), also for subnormal and
                     huge gradients; not applicable when nothing is returned
  overflow_safe      finite gradients whose squares overflow the dtype still clip: g' is
                     finite, ||g'|| <= tau up to rounding, and the direction is kept
  tau_zero           tau = 0 gives zeros, never NaN (also for an all-zero gradient)
  bad_tau_refused    a negative, -inf or NaN tau raises an exception
  nonfinite_reported a NaN or infinite entry is reported as the clipper says it is:
                     "propagate" (the returned norm, or else some entry of g', is not
                     finite), "skip" (g' all zeros) or "error" (raises)

Rounding slack is stated in units of eps of the input dtype; every entry may also be off
by the dtype's smallest normal number, since many platforms (XLA on CPUs, GPUs) flush
subnormal results to zero (in `direction_kept` and `overflow_safe`, by max(1, tau) of them:
in (g / n) * tau a flushed g_i / n is multiplied by tau).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

from charclip.testing.oracle import exact_norm, norm_at_most, round_up
from charclip.testing.strategies import (
    INFO,
    Gradient,
    _gradients,
    thresholds,
)

NONFINITE = ("propagate", "skip", "error")


class Broken(AssertionError):
    """A promise does not hold on one input; the message says how far off it is."""


@dataclass(frozen=True)
class Output:
    """What a clipper returned, in NumPy: the clipped leaves and the norm (None if none)."""

    clipped: list[np.ndarray]
    norm: float | None = None
    norm_dtype: str | None = None


Clipper = Callable[[list[np.ndarray], float], Output]


@dataclass(frozen=True)
class Options:
    ulps: float = 0.0
    nonfinite: str = "propagate"


@dataclass(frozen=True)
class Case:
    """One drawn input of a promise: a gradient, a threshold and what else the promise draws."""

    gradient: Gradient
    tau: float
    extra: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        more = "".join(f", {k}={v!r}" for k, v in self.extra.items())
        return f"g = {self.gradient!r}, tau = {self.tau!r}{more}"


@dataclass(frozen=True)
class Promise:
    name: str
    says: str
    inputs: Callable[[str], st.SearchStrategy[Case]]
    check: Callable[[Clipper, Case, Options], None]


# ---- helpers ----------------------------------------------------------------------------


def _flat(arrays) -> np.ndarray:
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays] + [np.zeros(0)])


def _call(clipper: Clipper, g: Gradient, tau: float) -> Output:
    out = clipper([a.copy() for a in g.leaves], tau)
    shapes = [a.shape for a in g.leaves]
    got = [a.shape for a in out.clipped]
    if got != shapes:
        raise Broken(f"returned leaves of shapes {got} for leaves of shapes {shapes}")
    return out


def _finite(out: Output) -> np.ndarray:
    flat = _flat(out.clipped)
    if not np.all(np.isfinite(flat)):
        raise Broken(f"g' has non-finite entries: {flat[~np.isfinite(flat)][:4].tolist()}")
    return flat


def _assert_direction(
    g: np.ndarray, gc: np.ndarray, dtype: str, rtol: float, want_nonzero: bool, tau: float = 1.0
) -> None:
    """gc = c g with 0 <= c <= 1 + rtol, each entry within rtol (relative) of c g_i, or
    within max(1, tau) smallest normal numbers absolutely (flushed subnormals, times tau)."""
    info = INFO[dtype]
    floor = info.smallest_normal * max(1.0, tau)
    if np.any((g == 0) & (gc != 0)):
        raise Broken(f"a zero entry became {gc[(g == 0) & (gc != 0)][:4].tolist()}")
    nz = g != 0
    if not nz.any():
        return
    g, gc = g[nz], gc[nz]
    if np.any(g * gc < 0):
        i = int(np.argmax(g * gc < 0))
        raise Broken(f"an entry changed sign: g_i = {float(g[i])!r} -> {float(gc[i])!r}")
    big = int(np.argmax(np.abs(gc)))  # the largest result carries the factor most precisely
    if gc[big] == 0:  # c = 0
        if want_nonzero:
            raise Broken("g' is all zeros: the direction is lost")
        return
    # gc / g may be far below the smallest normal (a huge gradient clipped to a small tau): a
    # subnormal c has too few bits to measure 2 eps. So every term is multiplied by 2**k, with
    # k chosen so that the scaled factor c_k = c 2**k lies in (1/8, 1/2] and no scaled entry
    # can overflow. The factor itself is taken exactly (fractions): 2**k gc[big] in floats
    # would round where gc[big] is subnormal and k < 0 (38 units of 2**-1074 times 2**-2 is
    # 9.5 units, rounded to 10: an unchanged entry read as c = 40/38).
    k = math.frexp(float(g[big]))[1] - math.frexp(float(gc[big]))[1] - 2
    ratio = Fraction(float(gc[big])) / Fraction(float(g[big]))
    c_k = float(ratio * Fraction(2) ** k)
    if ratio > 1 + Fraction(rtol):
        c = float(ratio) if ratio < 2**1000 else math.inf
        raise Broken(f"g' = c g with c = {c!r} > 1: clipping made the gradient longer")
    c = float(ratio)  # may read 0.0 for the tiniest factors: only shown
    with np.errstate(over="ignore"):  # a slack beyond float64's range accepts every entry
        slack = rtol * c_k * np.abs(g) + np.ldexp(floor, k)
        off = np.abs(np.ldexp(gc, k) - c_k * g) - slack
    if np.any(off > 0):
        i = int(np.argmax(off))
        raise Broken(
            f"not one factor: entry {float(g[i])!r} -> {float(gc[i])!r} (ratio {float(gc[i] / g[i])!r}), "
            f"while entry {float(g[big])!r} -> {float(gc[big])!r} has ratio {c!r}"
        )


def _assert_close(
    a: list[np.ndarray], b: list[np.ndarray], dtype: str, rtol: float, what: str
) -> None:
    x, y = _flat(a), _flat(b)
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise Broken(f"{what}: non-finite entries ({x.tolist()[:4]} against {y.tolist()[:4]})")
    off = np.abs(x - y) - (rtol * np.abs(y) + INFO[dtype].smallest_normal)
    if np.any(off > 0):
        i = int(np.argmax(off))
        raise Broken(
            f"{what}: entry {i} is {float(x[i])!r}, expected {float(y[i])!r} (relative difference "
            f"{abs(x[i] - y[i]) / abs(y[i]) if y[i] else math.inf:.3g}, allowed {rtol:.3g})"
        )


def _two_roundings(dtype: str, o: Options) -> float:
    """Each entry g_i (n / tau)-style: a divide and a multiply, each rounded (eps / 2 each)."""
    return (2 + o.ulps) * INFO[dtype].eps


def _sum_rounding(dtype: str, n: int, o: Options) -> float:
    """A norm summed over n squares (n u), its square root, a divide, a multiply (u each)."""
    return (n + 4 + o.ulps) * INFO[dtype].eps


def _ordinary(dtype: str, **kw) -> st.SearchStrategy[Gradient]:
    return _gradients((dtype,), magnitudes="ordinary", **kw)


def _cases(dtype: str, tau=None, magnitudes: str = "ordinary", **kw) -> st.SearchStrategy[Case]:
    return st.builds(
        Case,
        _gradients((dtype,), magnitudes=magnitudes, **kw),
        thresholds() if tau is None else tau,
    )


# ---- the promises ------------------------------------------------------------------------------


def _norm_at_most_tau(clip: Clipper, case: Case, o: Options) -> None:
    g = case.gradient
    out = _call(clip, g, case.tau)
    _finite(out)
    bound = Fraction(case.tau) * (1 + Fraction(o.ulps) * Fraction(INFO[g.dtype].eps))
    if not norm_at_most(out.clipped, bound):
        after = exact_norm(out.clipped)
        raise Broken(
            f"||g'|| = {after!r} > tau = {case.tau!r} (excess {after / case.tau - 1:.3g}"
            + (f", allowed {o.ulps:g} eps)" if o.ulps else ", exact bound)")
        )


def _positive_taus() -> st.SearchStrategy[float]:
    return thresholds("any").filter(lambda t: t > 0)


def _direction_kept(clip: Clipper, case: Case, o: Options) -> None:
    g = case.gradient
    out = _call(clip, g, case.tau)
    _assert_direction(
        _flat(g.leaves),
        _finite(out),
        g.dtype,
        _two_roundings(g.dtype, o),
        want_nonzero=False,
        tau=case.tau,
    )


@st.composite
def _below_cases(draw, dtype: str) -> Case:
    g = draw(_ordinary(dtype))
    norm = exact_norm(g.leaves)
    factor = draw(st.one_of(st.just(1.0), st.floats(1.0, 1000.0)))
    bits = INFO[dtype].bits
    tau = round_up(round_up(norm, bits) * factor, bits) if norm > 0 else factor
    while not norm_at_most(g.leaves, tau):  # the rounded norm was below the true one
        tau = round_up(math.nextafter(tau, math.inf), bits)
    return Case(g, tau)


def _identity_below(clip: Clipper, case: Case, o: Options) -> None:
    g = case.gradient
    out = _call(clip, g, case.tau)
    x, y = _flat(out.clipped), _flat(g.leaves)
    if not np.array_equal(x, y):
        i = int(np.argmax(x != y))
        raise Broken(
            f"||g|| = {exact_norm(g.leaves)!r} <= tau, yet entry {i} changed: {float(y[i])!r} -> {float(x[i])!r}"
        )


def _idempotent(clip: Clipper, case: Case, o: Options) -> None:
    g = case.gradient
    once = _call(clip, g, case.tau)
    twice = _call(clip, Gradient(g.dtype, tuple(once.clipped)), case.tau)
    _assert_close(
        twice.clipped, once.clipped, g.dtype, _two_roundings(g.dtype, o), "clip(clip(g)) != clip(g)"
    )


@st.composite
def _scale_cases(draw, dtype: str) -> Case:
    g = draw(_ordinary(dtype, zeros=False))
    k = draw(st.sampled_from((1, -1, 2, -2, 3, -3, 4, -4)))
    norm = exact_norm(g.leaves)
    assume(norm > 0)
    tau = min(norm, norm * 2.0**k) / draw(st.floats(2.0, 1000.0))
    return Case(g, float(tau), {"scale": f"2**{k}"})


def _scale_invariant(clip: Clipper, case: Case, o: Options) -> None:
    g = case.gradient
    k = int(case.extra["scale"][3:])
    scaled = Gradient(
        g.dtype, tuple(np.ldexp(np.asarray(a, np.float64), k).astype(a.dtype) for a in g.leaves)
    )
    base = _call(clip, g, case.tau).clipped
    other = _call(clip, scaled, case.tau).clipped
    _assert_close(other, base, g.dtype, _two_roundings(g.dtype, o), f"clip(2**{k} g) != clip(g)")


@st.composite
def _order_cases(draw, dtype: str) -> Case:
    g = draw(_ordinary(dtype, min_leaves=2))
    order = draw(st.permutations(range(len(g.leaves))))
    return Case(g, draw(thresholds()), {"order": list(order)})


def _order_invariant(clip: Clipper, case: Case, o: Options) -> None:
    g = case.gradient
    order = case.extra["order"]
    base = _call(clip, g, case.tau).clipped
    other = _call(clip, Gradient(g.dtype, tuple(g.leaves[i] for i in order)), case.tau).clipped
    _assert_close(
        other,
        [base[i] for i in order],
        g.dtype,
        _sum_rounding(g.dtype, g.size, o),
        f"leaves in order {order} clip differently",
    )


def _returns_true_norm(clip: Clipper, case: Case, o: Options) -> None:
    g = case.gradient
    out = _call(clip, g, case.tau)
    if out.norm is None:
        raise NotApplicable("returns no norm")
    expected = exact_norm(g.leaves)
    info = INFO.get(out.norm_dtype or "float64", INFO["float64"])
    if expected > info.max:
        if out.norm != math.inf:
            raise Broken(
                f"norm {out.norm!r}; the true norm {expected!r} exceeds {out.norm_dtype}: expected inf"
            )
        return
    allowed = (
        _sum_rounding(out.norm_dtype or "float64", g.size, o) * expected + info.smallest_subnormal
    )
    if not abs(out.norm - expected) <= allowed:
        raise Broken(
            f"returned norm {out.norm!r} ({out.norm_dtype}), true norm {expected!r} "
            f"(relative error {abs(out.norm - expected) / expected if expected else math.inf:.3g})"
        )


def _overflow_safe(clip: Clipper, case: Case, o: Options) -> None:
    g = case.gradient
    out = _call(clip, g, case.tau)
    flat = _finite(out)
    rtol = _sum_rounding(g.dtype, g.size, o)
    if not norm_at_most(out.clipped, Fraction(case.tau) * (1 + Fraction(rtol))):
        raise Broken(f"||g'|| = {exact_norm(out.clipped)!r} > tau = {case.tau!r} beyond rounding")
    _assert_direction(
        _flat(g.leaves), flat, g.dtype, _two_roundings(g.dtype, o), want_nonzero=True, tau=case.tau
    )


def _half_zero(dtype: str) -> st.SearchStrategy[Gradient]:
    """Ordinary gradients, half of them all zeros (0 / 0 is where tau = 0 goes wrong)."""
    zeroed = lambda g: Gradient(g.dtype, tuple(np.zeros_like(a) for a in g.leaves))
    return st.tuples(_ordinary(dtype), st.booleans()).map(
        lambda gz: zeroed(gz[0]) if gz[1] else gz[0]
    )


def _tau_zero(clip: Clipper, case: Case, o: Options) -> None:
    out = _call(clip, case.gradient, 0.0)
    flat = _flat(out.clipped)
    if not np.all(flat == 0):
        bad = flat[flat != 0]  # NaN != 0 too
        raise Broken(f"tau = 0 left entries {bad[:4].tolist()}")


def _bad_tau_refused(clip: Clipper, case: Case, o: Options) -> None:
    try:
        out = _call(clip, case.gradient, case.tau)
    except Broken:
        raise
    except Exception:  # noqa: BLE001  (any exception refuses the threshold)
        return
    raise Broken(f"accepted tau = {case.tau!r} and returned {[describe(a) for a in out.clipped]}")


def _nonfinite_reported(clip: Clipper, case: Case, o: Options) -> None:
    try:
        out = _call(clip, case.gradient, case.tau)
    except Broken:
        raise
    except Exception as e:  # noqa: BLE001
        if o.nonfinite == "error":
            return
        raise Broken(
            f"raised {type(e).__name__}: {e}; the promised policy is {o.nonfinite!r}"
        ) from None
    flat = _flat(out.clipped)
    if o.nonfinite == "error":
        raise Broken("returned instead of raising (policy 'error')")
    if o.nonfinite == "skip":
        if not np.all(flat == 0):
            raise Broken(f"policy 'skip': g' should be zeros, has {flat[flat != 0][:4].tolist()}")
        return
    reported = (
        not math.isfinite(out.norm) if out.norm is not None else not np.all(np.isfinite(flat))
    )
    if not reported:
        where = "the returned norm" if out.norm is not None else "g'"
        raise Broken(
            f"policy 'propagate': {where} is finite ({out.norm if out.norm is not None else flat[:4].tolist()})"
        )


class NotApplicable(Exception):
    """The promise does not apply to this clipper (it returns no norm, say)."""


def describe(a: np.ndarray) -> str:
    from charclip.testing.strategies import describe_leaf

    return describe_leaf(a)


PROMISES: dict[str, Promise] = {
    p.name: p
    for p in (
        Promise(
            "norm_at_most_tau",
            "||g'|| <= tau, exactly (or within `ulps` eps)",
            lambda d: st.builds(Case, _ordinary(d), _positive_taus()),
            _norm_at_most_tau,
        ),
        Promise("direction_kept", "g' = c g, 0 <= c <= 1", lambda d: _cases(d), _direction_kept),
        Promise("identity_below", "||g|| <= tau leaves g unchanged", _below_cases, _identity_below),
        Promise("idempotent", "clip(clip(g)) == clip(g)", lambda d: _cases(d), _idempotent),
        Promise(
            "scale_invariant", "clip(2**k g) == clip(g) above tau", _scale_cases, _scale_invariant
        ),
        Promise("order_invariant", "leaf order does not matter", _order_cases, _order_invariant),
        Promise(
            "returns_true_norm",
            "the returned norm is the true norm",
            lambda d: _cases(d, magnitudes="extreme"),
            _returns_true_norm,
        ),
        Promise(
            "overflow_safe",
            "squares that overflow still clip",
            lambda d: _cases(d, magnitudes="overflow"),
            _overflow_safe,
        ),
        Promise(
            "tau_zero",
            "tau = 0 gives zeros, not NaN",
            lambda d: st.builds(Case, _half_zero(d), st.just(0.0)),
            _tau_zero,
        ),
        Promise(
            "bad_tau_refused",
            "negative or NaN tau raises",
            lambda d: _cases(d, tau=thresholds("invalid")),
            _bad_tau_refused,
        ),
        Promise(
            "nonfinite_reported",
            "NaN/inf reported as the policy says",
            lambda d: _cases(d, nonfinite=True),
            _nonfinite_reported,
        ),
    )
}
