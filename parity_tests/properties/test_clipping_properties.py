"""Invariants of gradient clipping, checked for every implementation they apply to.

Implementations: torch's `clip_grad_norm_` ("torch"), `optax.clip_by_global_norm`
("optax"), and ours in each backend and each convention ("ours-torch/optax", ...).
The promises the conformance kit states (the bound, the direction, identity below the
threshold, idempotence, scale invariance) are checked with the kit's own checks on the
kit's gradients (`charclip.testing`), so the suite and the kit share one copy of each;
what the kit does not state (torch's epsilon band, bit-for-bit equalities, norms of norms,
value clipping, agreement between implementations) is checked here. The libraries are
checked on `ordinary` float32/float64 gradients, where they are exact; ours on `extreme`
gradients of every dtype as well. Where a library breaks an invariant, the break is pinned
in test_clipping_divergences.py instead.

Tolerances are in units of eps = finfo(dtype).eps (= 2u, twice the unit roundoff); n
is the number of entries in the gradient.
"""

import functools
import math

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from charclip.clipspec import TORCH_EPS
from charclip.jax import clipping as jclip
from charclip.testing import adapters
from charclip.testing import gradient_trees as kit_gradients
from charclip.testing import thresholds as kit_thresholds
from charclip.testing.promises import PROMISES, Case, Options
from charclip.testing.strategies import INFO, Gradient, dtype_name
from charclip.torch import clipping as tclip
from parity_tests.strategies import (
    FLOAT_DTYPES,
    LOW_PRECISION,
    exact_norm,
    finfo,
    from_torch,
    gradient_trees,
    leaves,
    nonzero,
    np_dtype,
    thresholds,
    to_torch,
)

torch.set_num_threads(1)  # on 2 cores, 2 intra-op threads make each tiny op ~1000x slower

HIGH = ("float32", "float64")
OURS = ("ours-torch/optax", "ours-torch/torch", "ours-jax/optax", "ours-jax/torch")
LIBRARIES = ("torch", "optax")


def _eps(dtype) -> float:
    return float(finfo(_dtype_name(dtype)).eps)


def _acc_eps(dtype) -> float:
    """eps of the dtype the norm is accumulated in (float32 for float16/bfloat16)."""
    return _eps(np.float32) if _dtype_name(dtype) in LOW_PRECISION else _eps(dtype)


def _dtype_name(dtype) -> str:
    return "bfloat16" if np.dtype(dtype) == np_dtype("bfloat16") else str(np.dtype(dtype))


def _size(arrays) -> int:
    return sum(a.size for a in arrays)


def clip(impl: str, tree, tau: float, norm_type: float = 2, **options):
    """Clip `tree` with `impl`; return (clipped arrays in tree order, norm as float)."""
    arrays = leaves(tree)
    if impl == "torch" or impl.startswith("ours-torch"):
        params = [torch.zeros(a.shape, dtype=to_torch(a).dtype, requires_grad=True) for a in arrays]
        for param, a in zip(params, arrays):
            param.grad = to_torch(a)
        if impl == "torch":
            # torch's foreach inf-norm raises on empty tensors (pinned as a divergence).
            used = [p for p in params if p.numel() > 0] if norm_type == math.inf else params
            norm = torch.nn.utils.clip_grad_norm_(used, tau, norm_type=norm_type)
        else:
            convention = impl.split("/")[1]
            norm = tclip.clip_grad_norm_(
                params, tau, norm_type=norm_type, convention=convention, **options
            )
        return [from_torch(p.grad) for p in params], float(norm)
    jtree = jax.tree.map(jnp.asarray, tree)
    if impl == "optax":
        clipped, _ = optax.clip_by_global_norm(tau).update(jtree, optax.EmptyState())
        norm = optax.tree.norm(jtree)
    else:
        convention = impl.split("/")[1]
        clipped, norm = jclip.clip_tree_by_global_norm(
            jtree, tau, norm_type=norm_type, convention=convention, **options
        )
    return [np.asarray(c) for c in jax.tree.leaves(clipped)], float(norm)


def _rounding_bound(dtype, n: int) -> float:
    """Relative error of a clipped norm in a float32/float64 convention: an n-term sum of
    squares (n u), its sqrt, the divide, the multiply and tau's rounding (u each)."""
    return (n + 4) * _eps(dtype)


# 1 to 5: the promises the conformance kit states, checked by the kit's own checks
# (charclip.testing.promises) on the kit's gradients, against ours and the libraries. The
# kit's slack for rounding is (2 + ulps) eps per entry (idempotence, scale invariance) and
# tau (1 + ulps eps) for the bound: each call below states its ulps from the slack the
# implementation's own rounding allows, as the comment beside it says.


def _kit_clipper(impl: str):
    """`impl` as a kit clipper: NumPy leaves and tau in, an `Output` (clipped leaves, norm) out."""
    if impl == "torch":
        return adapters.inplace_torch(torch.nn.utils.clip_grad_norm_)
    if impl == "optax":
        return adapters.optax_transformation(optax.clip_by_global_norm)
    convention = impl.split("/")[1]
    if impl.startswith("ours-torch"):
        ours = functools.partial(tclip.clip_grad_norm_, convention=convention)
        return adapters.inplace_torch(ours)
    return adapters.functional(
        lambda leaves, tau: jclip.clip_tree_by_global_norm(leaves, tau, convention=convention),
        "jax",
    )


KIT_CLIPPERS = {impl: _kit_clipper(impl) for impl in OURS + LIBRARIES}


class _Once:
    """A clipper that runs once per input: several kit checks of one input share its result
    (the kit hands each call fresh copies and only reads what comes back)."""

    def __init__(self, clipper):
        self.clipper, self.last = clipper, None

    def __call__(self, leaves, tau):
        key = (tau, tuple((a.dtype.name, a.shape, a.tobytes()) for a in leaves))
        if self.last is None or self.last[0] != key:
            self.last = (key, self.clipper(leaves, tau))
        return self.last[1]


def _promise(name: str, clipper, impl: str, g, tau: float, ulps: float = 0.0, **extra) -> None:
    """The kit's check of promise `name` on gradient `g` (NumPy leaves) and threshold `tau`."""
    case = Case(Gradient(dtype_name(g[0].dtype), tuple(g)), tau, extra)
    try:
        PROMISES[name].check(clipper, case, Options(ulps=ulps))
    except AssertionError as e:  # the kit's message says how far off; say who and where
        raise AssertionError(f"{impl}, {name} (ulps {ulps:.6g}) on {case!r}: {e}") from None


def _assert_not_zeroed(clipper, impl: str, g, tau: float) -> None:
    """A non-zero gradient keeps a non-zero clipped gradient (c > 0): the kit's
    direction_kept allows c = 0, these implementations promise more."""
    if any(np.any(a != 0) for a in g):
        clipped = clipper(g, tau).clipped
        assert any(np.any(c != 0) for c in clipped), f"{impl}: {g} with tau={tau} became zeros"


# 1 and 2. The clipped global norm is at most tau, and the direction is kept:
# clipped = c * g with 0 < c <= 1.


@given(g=kit_gradients(magnitudes="extreme"), tau=kit_thresholds())
@example(g=[np.full(4, 1e20, np.float32)], tau=1.0)
@example(g=[np.full(1000, 0.5, np_dtype("bfloat16"))], tau=1.0)
@example(g=[np.array([300.0], np.float16)], tau=1.0)
@example(g=[np.full(4, 3e38, np.float32), np.zeros(0, np.float32)], tau=1e-3)
@example(g=[np.array([0, 1, 4096], np_dtype("bfloat16"))], tau=1.0)
@example(g=[np.array([2.0**26, 1.0], np_dtype("bfloat16"))], tau=1.0)
@example(g=[np.array([1.0], np.float32), np.full(2, 2.0**126, np.float32)], tau=2.0)
# The thorough profile's draw: a float64 subnormal (38 units of 2**-1074) far below tau comes
# back unchanged, and the kit's direction check once measured it as c = 40/38 (its scaled
# factor rounded); the kit now takes the factor exactly.
@example(g=[np.array([], np.float64), np.array([1.9e-322])], tau=1.0)
def test_ours_clips_onto_the_ball_and_keeps_direction(g, tau):
    eps = INFO[dtype_name(g[0].dtype)].eps
    low = dtype_name(g[0].dtype) in LOW_PRECISION
    for impl in OURS:
        clipper = _Once(KIT_CLIPPERS[impl])
        # Low precision: tau (1 + 2**-52), the float64 ulp this bound has always allowed: the
        # exact oracle sees bfloat16 [2**26, 1] clipped to [1, 2**-26], of norm
        # sqrt(1 + 2**-52) > tau = 1, which a float64 norm rounds to 1 (strict=True keeps the
        # bound exactly). Otherwise the conventions' own rounding (they match the libraries bit
        # for bit): n squares summed, a sqrt, a divide, a multiply, tau's rounding: (n + 4) eps.
        ulps = 2.0**-52 / eps if low else _size(g) + 4
        _promise("norm_at_most_tau", clipper, impl, g, tau, ulps)
        # Each entry is rounded once or twice against the factor: the kit's 2 eps (ulps 0).
        _promise("direction_kept", clipper, impl, g, tau)
        _assert_not_zeroed(clipper, impl, g, tau)


@given(g=kit_gradients(dtypes=HIGH), tau=kit_thresholds())
@example(g=[np.array([6.0, 8.0], np.float32)], tau=1.0)
def test_libraries_clip_onto_the_ball_and_keep_direction(g, tau):
    for impl in LIBRARIES:
        clipper = _Once(KIT_CLIPPERS[impl])
        # A divide and a multiply per entry, plus the norm's rounding, as for ours: (n + 4) eps.
        _promise("norm_at_most_tau", clipper, impl, g, tau, ulps=_size(g) + 4)
        _promise("direction_kept", clipper, impl, g, tau)  # 2 eps per entry, as for ours
        _assert_not_zeroed(clipper, impl, g, tau)


# 3. Below the threshold nothing changes (bit for bit: the kit's identity_below check).


@given(g=kit_gradients(), factor=st.floats(1.001, 1000.0))
@example(g=[np.zeros(3, np.float32)], factor=1.5)
def test_below_threshold_unchanged(g, factor):
    for impl in OURS + (LIBRARIES if dtype_name(g[0].dtype) in HIGH else ()):
        # torch's factor is tau / (n + 1e-6): below tau = n + 1e-6 it still scales (the band is
        # pinned in test_clipping_divergences.py::test_torch_epsilon_scales_just_below_tau).
        # The kit's own inputs put tau at the norm rounded up, where both conventions scale.
        margin = TORCH_EPS if impl.endswith("torch") else 0.0
        tau = (exact_norm(g) + margin) * factor or factor  # a zero gradient: any tau > 0
        _promise("identity_below", KIT_CLIPPERS[impl], impl, g, tau)


# 4. Idempotence: clipping twice is clipping once.


@given(
    ours_g=kit_gradients(magnitudes="extreme"),
    library_g=kit_gradients(dtypes=HIGH),
    tau=kit_thresholds(),
)
def test_clipping_twice_is_clipping_once(ours_g, library_g, tau):
    for impl in OURS + LIBRARIES:
        g = library_g if impl in LIBRARIES else ours_g
        eps = INFO[dtype_name(g[0].dtype)].eps
        # The second pass sees a norm within the first pass's rounding of tau and may rescale
        # by that much: (n + 4) eps, i.e. ulps n + 2 over the kit's 2 eps; in float16/bfloat16
        # at most one ulp of the result (the kit's 2 eps, ulps 0).
        ulps = 0.0 if dtype_name(g[0].dtype) in LOW_PRECISION else _size(g) + 2.0
        if impl.endswith("torch"):
            # tau / (n + 1e-6) shrinks again on every pass, by up to 1e-6 / tau (pinned in
            # test_clipping_divergences.py::test_torch_clipping_twice_shrinks_again).
            ulps += TORCH_EPS / tau / eps
        _promise("idempotent", KIT_CLIPPERS[impl], impl, g, tau, ulps)


# 5. Scale invariance: above the threshold, clip(a * g) == clip(g).


def _one_formula(g, tau: float, *norms: float) -> bool:
    """Whether ours takes every norm in `norms` with the fast formula (optax's sum of squares
    in the gradient's dtype, then tau / n). Beyond that range, where the squares' sum
    overflows, may have lost digits to subnormals, or tau / n is subnormal, ours measures
    again in float64 or on g * 2**-e: a more accurate norm, not the fast one's bits, so
    clip(2**k g) and clip(g) agree within the kit's two roundings only. Factors of 2 keep
    clear of each switch's edge, which the fast sum's own rounding could cross."""
    info = INFO[dtype_name(g[0].dtype)]
    size = max(_size(g), 1)
    torch_floor = 2.0 ** ((math.log2(info.smallest_normal * info.eps) + 56) / 2)  # p = 2
    jax_floor = math.sqrt(size * info.smallest_normal / info.eps)  # the JAX fast sum's
    floor = max(torch_floor, jax_floor)
    top = min(math.sqrt(info.max), 2.0 ** (info.maxexp - 2) * min(1.0, tau))
    return all(2 * floor <= n <= top / 2 for n in norms)


@given(g=kit_gradients(dtypes=HIGH), tau=kit_thresholds(), exponent=st.integers(-8, 8))
@example(g=[np.full(2, 2.0**56, np.float32)], tau=1.0, exponent=8)
@example(  # CI's random pass: 64 g's squares overflow float32, so ours measured it in float64
    g=[
        np.array([1.231453e14], np.float32),
        np.array([], np.float32),
        np.array([1.4411519e17, 1.4411519e17, 2.3418718e17], np.float32),
        np.array([], np.float32),
    ],
    tau=1.0,
    exponent=6,
)
def test_scale_invariance_power_of_two(g, tau, exponent):
    norm = exact_norm(g)
    a = 2.0**exponent
    hypothesis.assume(min(norm, a * norm) > 2 * tau)  # a zero gradient is never above tau
    for impl in OURS + LIBRARIES:
        if impl in LIBRARIES and a * norm >= math.sqrt(INFO[dtype_name(g[0].dtype)].max):
            continue  # the libraries' squares overflow (pinned in test_clipping_divergences.py)
        if impl.endswith("optax") and _one_formula(g, tau, norm, a * norm):
            # (a g) / (a n) is g / n bit for bit when a is a power of two and both norms come
            # from one formula: more than the kit's promise (two roundings), so asserted here.
            scaled = [np.ldexp(np.asarray(x, np.float64), exponent).astype(x.dtype) for x in g]
            base = KIT_CLIPPERS[impl](g, tau).clipped
            other = KIT_CLIPPERS[impl](scaled, tau).clipped
            for x, y in zip(base, other):
                np.testing.assert_array_equal(
                    y, x, err_msg=f"{impl}: clip(2**{exponent} g) != clip(g)"
                )
            continue
        # The convention's own rounding (n + 4) eps, in ulps over the kit's 2 eps; torch's
        # epsilon: tau / (n + 1e-6) and tau / (a n + 1e-6) differ by 1e-6 / min(n, a n).
        eps = INFO[dtype_name(g[0].dtype)].eps
        ulps = _size(g) + 2
        if impl.endswith("torch"):
            ulps += TORCH_EPS / min(norm, a * norm) / eps
        _promise("scale_invariant", KIT_CLIPPERS[impl], impl, g, tau, ulps, scale=f"2**{exponent}")


@given(tree=nonzero(gradient_trees(HIGH)), tau=thresholds(), a=st.floats(1e-3, 1e3))
def test_scale_invariance_any_factor(tree, tau, a):
    arrays = leaves(tree)
    scaled = jax.tree.map(lambda x: (x * a).astype(x.dtype), tree)
    norm, scaled_norm = exact_norm(arrays), exact_norm(leaves(scaled))
    hypothesis.assume(min(norm, scaled_norm) > 2 * tau)
    for impl in OURS:
        base, _ = clip(impl, tree, tau)
        other, _ = clip(impl, scaled, tau)
        # a * g is rounded once per entry (eps) before clipping; torch's epsilon adds
        # 1e-6 / min(n, a n) for its convention.
        rtol = _rounding_bound(arrays[0].dtype, _size(arrays)) + 2 * _eps(arrays[0].dtype)
        if impl.endswith("torch"):
            rtol += TORCH_EPS / min(norm, scaled_norm)
        scale = max(float(np.max(np.abs(np.asarray(x, np.float64)), initial=0)) for x in base)
        for x, y in zip(base, other):
            np.testing.assert_allclose(
                y, x, rtol=rtol, atol=rtol * scale, err_msg=f"{impl}: clip({a} g) != clip(g)"
            )


# 6. The global norm is the norm of the per-tensor norms, whatever the tree's shape.


def _norm(impl: str, arrays, norm_type: float = 2) -> float:
    if impl == "ours-torch":
        return float(tclip.get_total_norm([to_torch(a) for a in arrays], norm_type))
    if impl == "ours-jax":
        return float(jclip.global_norm([jnp.asarray(a) for a in arrays], norm_type))
    if impl == "torch":
        return float(torch.nn.utils.get_total_norm([to_torch(a) for a in arrays], norm_type))
    return float(optax.tree.norm([jnp.asarray(a) for a in arrays], ord=norm_type))


@given(tree=gradient_trees(magnitudes="extreme"))
@example(tree=[np.full(4, 1e20, np.float32)])
@example(tree=[np.full(2, 1e-40, np.float32)])
def test_ours_global_norm_is_exact_norm(tree):
    arrays = leaves(tree)
    expected = exact_norm(arrays)
    acc = np.float64 if arrays[0].dtype == np.float64 else np.float32
    info = np.finfo(acc)
    for impl in ("ours-torch", "ours-jax"):
        got = _norm(impl, arrays)
        if expected > info.max:
            assert got == math.inf, (
                f"{impl}: norm {got} of a gradient whose norm {expected} overflows {acc}"
            )
            continue
        # An n-term sum of squares and a sqrt in the accumulation dtype. Absolute slack: XLA on
        # the CPU flushes subnormals to zero (up to sqrt(n) smallest normals lost); torch keeps
        # them, and a subnormal norm is exact only to one smallest subnormal.
        atol = (
            math.sqrt(_size(arrays)) * float(info.smallest_normal)
            if impl == "ours-jax"
            else float(info.smallest_subnormal)
        )
        np.testing.assert_allclose(
            got,
            expected,
            rtol=(_size(arrays) + 2) * _acc_eps(arrays[0].dtype),
            atol=atol,
            err_msg=f"{impl}: global norm",
        )


POW_ULPS = 2  # x**p and s**q in float32/float64, in units of u: at most 1.75 u and 1.9 u on 2,000
# draws each, against mpmath at 200 bits (XLA's and libm's alike), scaled and unscaled inputs


def _pnorm_error(k: int, p: float, norm: float, impl: str) -> float:
    """A first-order bound, in units of u, on the relative error of a computed ||v||_p of k entries.

    p = inf: a maximum, exact. p = 1: a sum of k terms, (k - 1) u in any order (Higham, 4.2).
    p = 2: k squares (u each) summed ((k - 1) u), then a sqrt (u/2 plus half the sum's error):
    below (k + 1) u. Other p: k powers x**p (POW_ULPS each) summed, S within (k - 1 + POW_ULPS) u,
    then S**q with q = 1/p rounded (q (1 + d), |d| <= u): the root passes S's error on times q,
    adds POW_ULPS, and q's rounding adds |q ln S| u = |ln(S**q)| u, the log of the root it takes.
    torch takes the root of the unscaled S (|ln norm|: 53 u at 4e-24, 139 u at 1e-60); ours-jax
    of S for v * 2**-e with max |v| * 2**-e in [0.5, 1), so its root lies in [0.5, k**q].
    """
    if p == math.inf or k == 0 or norm == 0:
        return 0.0
    if p in (1, 2):
        return k + 1.0
    root = max(math.log(2), math.log(k) / p) if impl == "ours-jax" else abs(math.log(norm))
    return (k - 1 + POW_ULPS) / p + POW_ULPS + root


@pytest.mark.parametrize("impl", ("ours-torch", "ours-jax", "torch", "optax"))
@given(tree=gradient_trees(HIGH), norm_type=st.sampled_from((1, 2, 3.5, math.inf)), data=st.data())
@example(tree=[np.array(4.00249476e-36)], norm_type=3.5, data=None).via(
    "issue 20: ours-jax 40 u off"
)
def test_global_norm_is_norm_of_tensor_norms(impl, tree, norm_type, data):
    if impl == "optax" and norm_type == 3.5:
        norm_type = 2  # optax.tree.norm knows 1, 2 and inf only
    arrays = leaves(tree)
    if impl in LIBRARIES and norm_type == math.inf:
        # Empty tensors: torch raises and optax gives -inf (both pinned as divergences).
        arrays = [a for a in arrays if a.size]
        hypothesis.assume(arrays)
    whole = _norm(impl, arrays, norm_type)
    # each norm is in the leaves' dtype already: the cast is exact
    per_tensor = [np.asarray(_norm(impl, [a], norm_type), arrays[0].dtype) for a in arrays]
    shuffled = arrays if data is None else data.draw(st.permutations(arrays))
    flat = [np.concatenate([np.ravel(a) for a in arrays])]
    # Each side is within its own _pnorm_error of the exact norm; a p-norm moves by at most the
    # largest relative change of its entries, so the norm of the per-tensor norms is within
    # (largest per-tensor error + the outer norm's) of it. Second-order terms are below 1e-27.
    n, u = _size(arrays), _eps(arrays[0].dtype) / 2
    err_whole = _pnorm_error(n, norm_type, whole, impl)
    err_inner = max(
        _pnorm_error(a.size, norm_type, float(v), impl) for a, v in zip(arrays, per_tensor)
    )
    outer = _norm(impl, per_tensor, norm_type)
    rtol_nested = (err_whole + err_inner + _pnorm_error(len(arrays), norm_type, outer, impl)) * u
    np.testing.assert_allclose(outer, whole, rtol=rtol_nested, err_msg=f"{impl}: norm of norms")
    rtol = 2 * err_whole * u  # the same n entries, in another order or another layout
    np.testing.assert_allclose(
        _norm(impl, shuffled, norm_type), whole, rtol=rtol, err_msg=f"{impl}: order"
    )
    np.testing.assert_allclose(
        _norm(impl, flat, norm_type), whole, rtol=rtol, err_msg=f"{impl}: one flat tensor"
    )


# 7. Value clipping keeps every entry in [-v, v], and it can turn the gradient.


def clip_value(impl: str, tree, v: float) -> list[np.ndarray]:
    arrays = leaves(tree)
    if impl in ("torch", "ours-torch"):
        params = [torch.zeros(a.shape, dtype=to_torch(a).dtype, requires_grad=True) for a in arrays]
        for param, a in zip(params, arrays):
            param.grad = to_torch(a)
        (torch.nn.utils.clip_grad_value_ if impl == "torch" else tclip.clip_grad_value_)(params, v)
        return [from_torch(p.grad) for p in params]
    jtree = [jnp.asarray(a) for a in arrays]
    if impl == "optax":
        clipped, _ = optax.clip(v).update(jtree, optax.EmptyState())
    else:
        clipped = jclip.clip_tree_by_value(jtree, v)
    return [np.asarray(c) for c in clipped]


@given(tree=gradient_trees(magnitudes="extreme"), v=thresholds())
def test_value_clipping_bounds_every_entry(tree, v):
    arrays = leaves(tree)
    # v itself is rounded into the gradient's dtype before the comparison.
    bound = float(np.asarray(v, arrays[0].dtype))
    for impl in ("torch", "optax", "ours-torch", "ours-jax"):
        for before, after in zip(arrays, clip_value(impl, tree, v)):
            b, a = np.asarray(before, np.float64), np.asarray(after, np.float64)
            assert np.all(np.abs(a) <= bound), (
                f"{impl}: entries {a[np.abs(a) > bound]} outside [-{bound}, {bound}]"
            )
            inside = np.abs(b) <= bound
            if impl in ("optax", "ours-jax"):
                # XLA on the CPU flushes float32/float64 subnormals to zero (bfloat16 ones too,
                # computed in float32; float16 ones are normal in float32). Pinned as a divergence.
                wide = np.float64 if before.dtype == np.float64 else np.float32
                b = np.where(np.abs(b) < float(np.finfo(wide).smallest_normal), 0.0, b)
            np.testing.assert_array_equal(
                a[inside], b[inside], err_msg=f"{impl}: changed an entry already inside"
            )


def _cosine(x: np.ndarray, y: np.ndarray) -> float:
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


@pytest.mark.parametrize("impl", ("ours-torch", "ours-jax"))
def test_hypothesis_finds_a_gradient_whose_direction_value_clipping_changes(impl):
    """The teaching point: value clipping bounds each entry but may turn the gradient."""
    vectors = st.lists(st.floats(-10, 10), min_size=2, max_size=2).map(
        lambda xs: np.asarray(xs, np.float64)
    )

    def turned(g):
        clipped = clip_value(impl, [g], 1.0)[0]
        return np.linalg.norm(g) > 0 and _cosine(g, clipped) < 1 - 1e-3

    found = hypothesis.find(
        vectors, turned, settings=hypothesis.settings(database=None, max_examples=200)
    )
    clipped = clip_value(impl, [found], 1.0)[0]
    assert _cosine(found, clipped) < 1 - 1e-3, f"{found} -> {clipped} kept its direction"
    norm_clipped, _ = clip(
        "ours-jax/optax" if impl == "ours-jax" else "ours-torch/optax", [found], 1.0
    )
    assert _cosine(found, norm_clipped[0]) > 1 - 1e-12, "norm clipping turned the gradient"


# 8. Ours reproduces each library; our two backends agree.


@given(tree=gradient_trees(HIGH), tau=thresholds(), norm_type=st.sampled_from((2, 2, 1, math.inf)))
@example(tree={"w": np.array([6.0, 8.0], np.float32)}, tau=1.0, norm_type=2)
@example(tree={"w": np.array([2e-6], np.float32)}, tau=1e-6, norm_type=2)
@example(tree=[np.zeros(0), np.array(0.99999), np.array([1.5, 47.5])], tau=1.0, norm_type=2)
def test_reference_is_library_bit_for_bit(tree, tau, norm_type):
    # optax's clip_by_global_norm knows the 2-norm only.
    pairs = [("ours-torch/torch", "torch", norm_type), ("ours-jax/optax", "optax", 2)]
    for ours, library, p in pairs:
        expected, expected_norm = clip(library, tree, tau, p)
        got, got_norm = clip(ours, tree, tau, p)
        assert got_norm == expected_norm, (
            f"{ours}: norm {got_norm!r} != {library}'s {expected_norm!r} (p={p})"
        )
        for x, y in zip(expected, got):
            np.testing.assert_array_equal(y, x, err_msg=f"{ours} != {library} (p={p})")


@pytest.mark.parametrize("convention", ("optax", "torch"))
@given(tree=gradient_trees(), tau=thresholds())
def test_torch_and_jax_references_agree(convention, tree, tau):
    from_torch_side, torch_norm = clip(f"ours-torch/{convention}", tree, tau)
    from_jax_side, jax_norm = clip(f"ours-jax/{convention}", tree, tau)
    dtype = leaves(tree)[0].dtype
    n = _size(leaves(tree))
    # The backends sum the same n squares in different orders: each within (n + 2) eps.
    np.testing.assert_allclose(
        jax_norm, torch_norm, rtol=2 * (n + 2) * _acc_eps(dtype), err_msg="norms differ"
    )
    low = _dtype_name(dtype) in LOW_PRECISION
    # float16/bfloat16: float32 results a few ulps apart may round to neighbouring values (one
    # ulp of the dtype); otherwise the norms' difference carries into every entry.
    rtol = _eps(dtype) if low else 2 * _rounding_bound(dtype, n)
    for x, y in zip(from_torch_side, from_jax_side):
        np.testing.assert_allclose(
            np.asarray(y, np.float64),
            np.asarray(x, np.float64),
            rtol=rtol,
            atol=float(finfo(_dtype_name(dtype)).smallest_normal),
            err_msg=f"torch and JAX references differ ({convention} convention)",
        )


# The jitted path: same bits as optax under jit, and one compilation for many calls.


FIXED = gradient_trees(("float32",), min_leaves=2, max_leaves=2, shapes=((4, 4),))


def test_jitted_reference_is_optax_and_compiles_once():
    traces = []

    @jax.jit
    def ours(tree):
        traces.append(1)  # a Python side effect runs only while tracing
        return jclip.clip_tree_by_global_norm(tree, 1.0)

    library = jax.jit(
        lambda tree: optax.clip_by_global_norm(1.0).update(tree, optax.EmptyState())[0]
    )

    @given(tree=FIXED)
    def check(tree):
        tree = [jnp.asarray(a) for a in leaves(tree)]
        clipped, norm = ours(tree)
        for x, y in zip(library(tree), clipped):
            np.testing.assert_array_equal(
                np.asarray(y), np.asarray(x), err_msg="jitted reference != jitted optax"
            )

    check()
    assert len(traces) == 1, f"traced {len(traces)} times for one shape and dtype"


def test_transformation_stands_in_optax_chain():
    traces = []
    ours = optax.chain(jclip.clip_by_global_norm(1.0), optax.sgd(0.1))
    library = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1))
    rng = np.random.default_rng(0)
    params = [jnp.zeros((4, 4), jnp.float32), jnp.zeros((3,), jnp.float32)]

    @jax.jit
    def step(grads, state):
        traces.append(1)
        return ours.update(grads, state, params)

    state, library_state = ours.init(params), library.init(params)
    for scale in (0.01, 10.0, 1e4):
        grads = [jnp.asarray(rng.normal(size=p.shape) * scale, jnp.float32) for p in params]
        updates, state = step(grads, state)
        expected, library_state = jax.jit(library.update)(grads, library_state, params)
        for x, y in zip(expected, updates):
            np.testing.assert_array_equal(
                np.asarray(y), np.asarray(x), err_msg=f"chain differs at scale {scale}"
            )
        assert state[0] == library_state[0] == optax.EmptyState(), (
            f"state {state[0]} is not optax's empty state"
        )
    assert len(traces) == 1, f"traced {len(traces)} times for one shape and dtype"


# 9. One SGD step after clipping moves the parameters by at most lr * tau.


@pytest.mark.parametrize("backend", ("torch", "jax"))
@given(tree=gradient_trees(HIGH, magnitudes="extreme"), tau=thresholds(), lr=st.floats(1e-4, 1.0))
def test_sgd_step_moves_at_most_lr_tau(backend, tree, tau, lr):
    arrays = leaves(tree)
    if backend == "torch":
        params = [torch.zeros(a.shape, dtype=to_torch(a).dtype, requires_grad=True) for a in arrays]
        for param, a in zip(params, arrays):
            param.grad = to_torch(a)
        tclip.clip_grad_norm_(params, tau)
        torch.optim.SGD(params, lr=lr).step()
        moved = [from_torch(p.detach()) for p in params]
    else:
        params = [jnp.zeros(a.shape, a.dtype) for a in arrays]
        chain = optax.chain(jclip.clip_by_global_norm(tau), optax.sgd(lr))
        updates, _ = chain.update([jnp.asarray(a) for a in arrays], chain.init(params), params)
        moved = [np.asarray(u) for u in optax.apply_updates(params, updates)]
    # From zero, the step is lr * clipped rounded once (eps) on top of the clipped norm's bound.
    bound = lr * tau * (1 + _rounding_bound(arrays[0].dtype, _size(arrays)) + _eps(arrays[0].dtype))
    distance = exact_norm(moved)
    assert distance <= bound, f"moved {distance!r} > lr * tau = {lr * tau!r}"


def test_every_dtype_is_drawn():
    """The strategies reach every dtype the properties claim to cover."""
    seen = set()

    @given(tree=gradient_trees(magnitudes="extreme"))
    @hypothesis.settings(max_examples=100, derandomize=True, database=None)
    def collect(tree):
        seen.add(_dtype_name(leaves(tree)[0].dtype))

    collect()
    assert seen == set(FLOAT_DTYPES), f"drew only {sorted(seen)}"
