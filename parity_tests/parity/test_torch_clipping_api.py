"""charclip.torch.clipping is a drop-in for torch.nn.utils' clipping functions.

What is checked against torch itself: the signatures, the return values (dtype and
device of the norm too), the empty-generator warning, the error types, foreach on and
off, single tensors and empty inputs; Hypothesis shows ours gives torch's bits wherever
torch's answer is right. Where torch is wrong, test_clipping_divergences.py pins the
difference. And `strict=True` keeps the clipped norm <= tau exactly, checked against
rational arithmetic (`fractions.Fraction`, no rounding at all).
"""

import inspect
import math
import warnings
from fractions import Fraction
from unittest import mock

import hypothesis
import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from charclip.testing.oracle import sum_of_squares
from charclip.torch import clip_safeguards
from charclip.torch import clipping as ours
from parity_tests.strategies import (
    FLOAT_DTYPES,
    exact_norm,
    from_torch,
    gradient_trees,
    leaves,
    np_dtype,
    thresholds,
    to_torch,
)

torch.set_num_threads(1)  # on 2 cores, 2 intra-op threads make each tiny op ~1000x slower

LIB = torch.nn.utils
NAMES = ("clip_grad_norm_", "clip_grad_value_", "get_total_norm", "clip_grads_with_norm_")
HIGH = ("float32", "float64")


def params_of(arrays, device="cpu"):
    """Fresh parameters whose .grad holds `arrays` (same bits)."""
    out = []
    for a in arrays:
        grad = to_torch(a).to(device)
        p = torch.zeros(grad.shape, dtype=grad.dtype, device=device, requires_grad=True)
        p.grad = grad
        out.append(p)
    return out


def grads_of(params) -> list[np.ndarray]:
    return [from_torch(p.grad) for p in params]


def assert_same_bits(got, expected, what):
    """Equal dtypes and values (NaN where NaN; compared in float64, which holds every value exactly)."""
    assert len(got) == len(expected), what
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype, f"{what}: dtype {g.dtype} != {e.dtype}"
        np.testing.assert_array_equal(
            np.asarray(g, np.float64), np.asarray(e, np.float64), err_msg=what
        )


@pytest.mark.parametrize("name", NAMES)
def test_signature_is_torchs_plus_keyword_only_extras(name):
    theirs = list(inspect.signature(getattr(LIB, name)).parameters.values())
    mine = list(inspect.signature(getattr(ours, name)).parameters.values())
    assert [(p.name, p.kind, p.default) for p in mine[: len(theirs)]] == [
        (p.name, p.kind, p.default) for p in theirs
    ]
    extras = mine[len(theirs) :]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extras), (
        f"{name}: {extras} not keyword-only"
    )


def test_extras_cannot_be_passed_positionally():
    params = params_of([np.ones(3, np.float32)])
    with pytest.raises(TypeError):
        ours.clip_grad_norm_(params, 1.0, 2.0, False, None, "optax")


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_returns_torchs_norm_dtype_and_device(dtype):
    arrays = [np.array([3.0, 4.0]), np.array([12.0])]
    theirs, mine = (
        params_of([a.astype(str(dtype)[6:]) for a in arrays]),
        params_of([a.astype(str(dtype)[6:]) for a in arrays]),
    )
    expected, got = LIB.clip_grad_norm_(theirs, 1.0), ours.clip_grad_norm_(mine, 1.0)
    assert (got.dtype, got.device, got.shape) == (expected.dtype, expected.device, expected.shape)
    assert float(got) == float(expected) == 13.0
    assert (
        ours.clip_grads_with_norm_(mine, 1.0, got) is None
        and ours.clip_grad_value_(mine, 1.0) is None
    )


def test_low_precision_norm_is_float32_not_rounded():
    """A documented divergence: torch returns the bfloat16 norm (15.8125), ours float32."""
    grads = [to_torch(np.full(1000, 0.5, np_dtype("bfloat16")))]
    assert LIB.get_total_norm(grads).dtype == torch.bfloat16
    norm = ours.get_total_norm(grads)
    assert (norm.dtype, float(norm)) == (torch.float32, float(np.float32(math.sqrt(250.0)))), norm


def _warnings_of(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, caught


def test_empty_generator_warns_like_torch_and_points_at_the_caller():
    _, theirs = _warnings_of(lambda: LIB.clip_grad_norm_((p for p in []), 1.0))
    norm, mine = _warnings_of(lambda: ours.clip_grad_norm_((p for p in []), 1.0))
    assert [(str(w.message), w.category) for w in mine] == [
        (str(w.message), w.category) for w in theirs
    ]
    assert len(mine) == 1 and mine[0].filename == __file__, (
        f"warning attributed to {mine[0].filename}"
    )
    assert float(norm) == 0.0


def test_consumed_generator_warns_and_changes_nothing():
    params = params_of([np.array([3.0, 4.0], np.float32)])
    gen = (p for p in params)
    list(gen)  # a training loop that already iterated model.parameters() once
    norm, caught = _warnings_of(lambda: ours.clip_grad_norm_(gen, 1.0))
    assert [str(w.message) for w in caught] == [
        "`parameters` is an empty generator, no gradient clipping will occur."
    ]
    assert float(norm) == 0.0 and params[0].grad.tolist() == [3.0, 4.0]


def test_a_fresh_generator_and_a_list_do_not_warn():
    for make in (lambda ps: (p for p in ps), list):
        params, theirs = (
            params_of([np.array([3.0, 4.0], np.float32)]),
            params_of([np.array([3.0, 4.0], np.float32)]),
        )
        _, caught = _warnings_of(
            lambda make=make, params=params: ours.clip_grad_norm_(make(params), 1.0)
        )
        assert caught == [], [str(w.message) for w in caught]
        LIB.clip_grad_norm_(make(theirs), 1.0)
        assert_same_bits(grads_of(params), grads_of(theirs), "clipped through a generator")


def test_single_tensor_is_accepted_as_torch_does():
    theirs, mine = (
        params_of([np.array([6.0, 8.0], np.float32)]),
        params_of([np.array([6.0, 8.0], np.float32)]),
    )
    assert float(ours.clip_grad_norm_(mine[0], 1.0)) == float(LIB.clip_grad_norm_(theirs[0], 1.0))
    assert_same_bits(grads_of(mine), grads_of(theirs), "single tensor")
    assert float(ours.get_total_norm(mine[0].grad)) == float(LIB.get_total_norm(theirs[0].grad))


def test_empty_inputs_and_missing_grads():
    without = [torch.zeros(3, requires_grad=True)]  # .grad is None: skipped, as in torch
    for params in ([], without):
        norm = ours.clip_grad_norm_(params, 1.0)
        assert (float(norm), norm.dtype) == (0.0, LIB.clip_grad_norm_(params, 1.0).dtype)
    assert without[0].grad is None
    assert (
        float(ours.get_total_norm([])) == 0.0
        and ours.clip_grads_with_norm_(without, 1.0, torch.tensor(5.0)) is None
    )
    mixed = params_of([np.array([3.0, 4.0], np.float32)]) + without
    assert float(ours.clip_grad_norm_(mixed, 10.0)) == 5.0


@pytest.mark.parametrize("values", ([1.0, math.inf], [math.nan, 2.0]))
def test_error_if_nonfinite_raises_a_runtime_error_before_touching_grads(values):
    with pytest.raises(RuntimeError):
        LIB.clip_grad_norm_(params_of([np.array(values, np.float32)]), 1.0, error_if_nonfinite=True)
    params = params_of([np.array([3.0, 4.0], np.float32), np.array(values, np.float32)])
    with pytest.raises(RuntimeError, match="non-finite"):
        ours.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    assert params[0].grad.tolist() == [3.0, 4.0], "a gradient was touched before raising"
    with pytest.raises(RuntimeError, match="non-finite"):
        ours.get_total_norm([p.grad for p in params], error_if_nonfinite=True)
    with pytest.raises(FloatingPointError):  # nonfinite="error" raises the same error
        ours.clip_grad_norm_(params, 1.0, nonfinite="error")
    with pytest.raises(ValueError, match="contradict"):
        ours.clip_grad_norm_(params, 1.0, error_if_nonfinite=True, nonfinite="skip")


def test_finite_gradient_whose_squares_overflow_is_not_an_error():
    """torch raises for [1e20] * 4 (its norm overflowed); ours measures 2e20 and clips."""
    with pytest.raises(RuntimeError):
        LIB.clip_grad_norm_(params_of([np.full(4, 1e20, np.float32)]), 1.0, error_if_nonfinite=True)
    params = params_of([np.full(4, 1e20, np.float32)])
    assert float(ours.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)) == float(
        np.float32(2e20)
    )


def test_foreach_true_on_an_unsupported_device_raises_as_torch():
    """The meta device has no foreach kernels; None falls back to the per-tensor loop."""
    grads = [torch.empty(3, device="meta")]
    params = [torch.zeros(3, device="meta", requires_grad=True)]
    params[0].grad = torch.empty(3, device="meta")
    calls = [
        lambda m: m.get_total_norm(grads, foreach=True),
        lambda m: m.clip_grad_norm_(params, 1.0, foreach=True),
        lambda m: m.clip_grad_value_(params, 1.0, foreach=True),
        lambda m: m.clip_grads_with_norm_(
            params, 1.0, torch.tensor(2.0, device="meta"), foreach=True
        ),
    ]
    for call in calls:
        with pytest.raises(RuntimeError) as theirs:
            call(LIB)
        with pytest.raises(RuntimeError) as mine:
            call(ours)
        assert str(mine.value) == str(theirs.value)
    for foreach in (None, False):
        norm = ours.clip_grad_norm_(params, 1.0, foreach=foreach)
        assert (
            norm.device.type == "meta"
            and norm.dtype == LIB.get_total_norm(grads, foreach=foreach).dtype
        )


@pytest.mark.parametrize("bad", (-1.0, math.nan))
def test_negative_or_nan_clip_value_raises(bad):
    """torch clamps to [1, -1] for -1: every entry becomes -1 (documented divergence)."""
    theirs = params_of([np.array([0.5, -3.0], np.float32)])
    LIB.clip_grad_value_(theirs, bad)
    if bad < 0:
        assert theirs[0].grad.tolist() == [-1.0, -1.0], theirs[0].grad
    with pytest.raises(ValueError, match="clip_value must be >= 0"):
        ours.clip_grad_value_(params_of([np.array([0.5, -3.0], np.float32)]), bad)


def test_quasi_norm_below_one_is_torchs_and_bounds_the_two_norm():
    """0 < p < 1: torch's p-"norm" of the tensors as one vector; it is >= the 2-norm, so
    clipping by it bounds the step. Ours gives torch's bits."""
    arrays = [np.array([3.0, -4.0], np.float32), np.array([0.25], np.float32)]
    theirs, mine = params_of(arrays), params_of(arrays)
    expected = LIB.clip_grad_norm_(theirs, 1.0, norm_type=0.5)
    assert float(ours.clip_grad_norm_(mine, 1.0, norm_type=0.5)) == float(expected)
    assert_same_bits(grads_of(mine), grads_of(theirs), "p = 0.5")
    assert exact_norm(grads_of(mine)) <= 1.0


# Hypothesis: torch's bits wherever torch is right.

FOREACH = st.sampled_from((None, True, False))
ORDERS = st.sampled_from((2.0, 2.0, 1.0, math.inf, 3.5, 0.5))


def _library_is_right(arrays, p: float, tau: float) -> bool:
    """torch's float32/float64 norm is right when nothing over- or underflowed: the exact
    2-norm (and so every p-norm, up to the dimension's power) far from both ends of the
    dtype, and max_norm / norm a normal number."""
    info = np.finfo(arrays[0].dtype)
    exact = exact_norm(arrays)
    n = sum(a.size for a in arrays)
    low = (float(info.smallest_subnormal) * 2.0**64) ** (
        1 / p if p > 1 and not math.isinf(p) else 1
    ) * n
    return exact == 0 or (
        low < exact / n and exact * n < min(float(info.max) ** 0.5, tau * 2.0 ** (info.maxexp - 3))
    )


@given(tree=gradient_trees(HIGH), tau=thresholds(), p=ORDERS, foreach=FOREACH)
@example(tree=[np.array([6.0, 8.0], np.float32)], tau=1.0, p=2.0, foreach=None)
@example(
    tree=[np.zeros(0, np.float32), np.array([1.0, 2.0], np.float32)], tau=0.5, p=2.0, foreach=True
)
def test_clip_grad_norm_is_torch_bit_for_bit_on_ordinary_gradients(tree, tau, p, foreach):
    arrays = leaves(tree)
    if math.isinf(p):  # torch's foreach inf-norm raises on empty tensors (a pinned divergence)
        arrays = [a for a in arrays if a.size]
        hypothesis.assume(arrays)
    theirs, mine = params_of(arrays), params_of(arrays)
    expected = LIB.clip_grad_norm_(theirs, tau, norm_type=p, foreach=foreach)
    # Finite gradients whose p-th powers overflow give torch an infinite norm: torch is wrong
    # there (the extreme-gradient test below covers it), so those draws are not "ordinary".
    hypothesis.assume(
        math.isfinite(float(expected)) or not all(np.isfinite(a).all() for a in arrays)
    )
    got = ours.clip_grad_norm_(mine, tau, norm_type=p, foreach=foreach)
    assert (got.dtype, float(got)) == (expected.dtype, float(expected)), (
        f"norm {float(got)!r} != torch's {float(expected)!r}"
    )
    assert_same_bits(
        grads_of(mine), grads_of(theirs), f"clipped gradient (p={p}, foreach={foreach})"
    )


@given(
    tree=gradient_trees(HIGH, magnitudes="extreme"),
    tau=thresholds(),
    p=st.sampled_from((2.0, 1.0, math.inf)),
)
@example(tree=[np.full(4, 1e20, np.float32)], tau=1.0, p=2.0)
def test_torch_bits_on_extreme_gradients_wherever_torch_is_right(tree, tau, p):
    arrays = [a for a in leaves(tree) if a.size] if math.isinf(p) else leaves(tree)
    hypothesis.assume(arrays)
    theirs, mine = params_of(arrays), params_of(arrays)
    expected = LIB.clip_grad_norm_(theirs, tau, norm_type=p)
    got = ours.clip_grad_norm_(mine, tau, norm_type=p)
    if _library_is_right(arrays, p, tau):
        assert float(got) == float(expected), f"norm {float(got)!r} != torch's {float(expected)!r}"
        assert_same_bits(grads_of(mine), grads_of(theirs), f"clipped gradient (p={p})")
    else:  # where torch over- or underflowed, ours is still within rounding of the exact norm
        info = np.finfo(arrays[0].dtype)
        exact = exact_norm(arrays) if p == 2 else None
        if exact is not None and exact < float(info.max):
            # A sum of n squares in float64 and a rounding into the dtype (atol: a subnormal norm).
            np.testing.assert_allclose(
                float(got),
                exact,
                rtol=2 * float(info.eps),
                atol=float(info.smallest_subnormal),
                err_msg="norm where torch's over- or underflowed",
            )


@given(tree=gradient_trees(HIGH), p=ORDERS, foreach=FOREACH)
def test_get_total_norm_is_torch_bit_for_bit(tree, p, foreach):
    tensors = [to_torch(a) for a in leaves(tree) if a.size or not math.isinf(p)]
    hypothesis.assume(tensors)
    expected = LIB.get_total_norm(tensors, p, foreach=foreach)
    got = ours.get_total_norm(tensors, p, foreach=foreach)
    assert (got.dtype, float(got)) == (expected.dtype, float(expected)), (
        f"{float(got)!r} != {float(expected)!r}"
    )


@given(tree=gradient_trees(HIGH), tau=thresholds(), total=st.floats(0.0, 1e4), foreach=FOREACH)
def test_clip_grads_with_norm_is_torch_bit_for_bit(tree, tau, total, foreach):
    arrays = leaves(tree)
    theirs, mine = params_of(arrays), params_of(arrays)
    norm = torch.tensor(total, dtype=theirs[0].grad.dtype)
    LIB.clip_grads_with_norm_(theirs, tau, norm, foreach=foreach)
    ours.clip_grads_with_norm_(mine, tau, norm, foreach=foreach)
    assert_same_bits(grads_of(mine), grads_of(theirs), f"given norm {total}")


@given(tree=gradient_trees(magnitudes="extreme"), v=thresholds(), foreach=FOREACH)
def test_clip_grad_value_is_torch_bit_for_bit(tree, v, foreach):
    arrays = leaves(tree)
    theirs, mine = params_of(arrays), params_of(arrays)
    LIB.clip_grad_value_(theirs, v, foreach=foreach)
    ours.clip_grad_value_(mine, v, foreach=foreach)
    assert_same_bits(grads_of(mine), grads_of(theirs), f"value clip at {v}")


# strict=True: the exact norm of the clipped gradient is <= tau.


def _exact_norm_at_most(arrays, tau: float, p: float) -> tuple[bool, float]:
    """Whether ||arrays||_p <= tau in exact rational arithmetic, and the excess (for messages)."""
    values = [Fraction(float(x)) for a in arrays for x in np.asarray(a, np.float64).ravel()]
    t = Fraction(tau)
    if math.isinf(p):
        top = max((abs(x) for x in values), default=Fraction(0))
        return top <= t, float(top / t - 1) if t else float(top)
    if p == 1:
        total = sum((abs(x) for x in values), Fraction(0))
        return total <= t, float(total / t - 1) if t else float(total)
    squares = sum_of_squares(arrays)  # the conformance kit's exact oracle
    return squares <= t * t, float(squares / (t * t) - 1) if t else float(squares)


@given(
    tree=gradient_trees(magnitudes="extreme"),
    tau=thresholds(),
    p=st.sampled_from((2.0, 2.0, 1.0, math.inf)),
    convention=st.sampled_from(("torch", "optax")),
)
@example(
    tree=[np.array([6.0, 8.0], np.float32)], tau=1.0, p=2.0, convention="optax"
)  # optax: an ulp above
@example(tree=[np.full(1000, 0.5, np.float32)], tau=1.0, p=2.0, convention="optax")
@example(tree=[np.full(4, 3e38, np.float32)], tau=1e-3, p=2.0, convention="torch")
@example(  # JAX's mirrored draw: tau / norm = 2.6e-309 is subnormal (the wide path scales first)
    tree=[np.array([3.79e306, 37.5])], tau=0.01, p=2.0, convention="optax"
)
@example(  # JAX's mirrored draw: scaled by 2**-1023 first, XLA flushed -0.333 (torch keeps it)
    tree=[np.array([-0.333, 2.793e307, 2.534e307, 2.321e307, 6.805e306, -6.769e306, -4.303e306])],
    tau=10.0,
    p=2.0,
    convention="optax",
)
def test_strict_clipped_norm_is_at_most_tau_exactly(tree, tau, p, convention):
    arrays = leaves(tree)
    params = params_of(arrays)
    ours.clip_grad_norm_(params, tau, norm_type=p, convention=convention, strict=True)
    clipped = grads_of(params)
    ok, excess = _exact_norm_at_most(clipped, tau, p)
    assert ok, f"strict: exact clipped {p}-norm above tau = {tau!r} by {excess:.3e} (relative)"
    for before, after in zip(arrays, clipped):  # no entry grows, no sign flips
        b, a = np.asarray(before, np.float64), np.asarray(after, np.float64)
        assert np.all(np.abs(a) <= np.abs(b)) and np.all(a * b >= 0), f"{b} -> {a}"


def test_hypothesis_finds_default_float32_clips_above_tau_that_strict_fixes():
    """Why strict exists: the default rounds as torch does, a few ulps above tau at times."""
    arrays = st.lists(st.floats(-1e3, 1e3, width=32), min_size=2, max_size=6).map(
        lambda xs: [np.asarray(xs, np.float32)]
    )

    def above(tree):
        params = params_of(tree)
        ours.clip_grad_norm_(params, 1.0, convention="optax")
        return not _exact_norm_at_most(grads_of(params), 1.0, 2.0)[0]

    found = hypothesis.find(
        arrays, above, settings=hypothesis.settings(database=None, max_examples=500)
    )
    params = params_of(found)
    ours.clip_grad_norm_(params, 1.0, convention="optax", strict=True)
    assert _exact_norm_at_most(grads_of(params), 1.0, 2.0)[0], (
        f"strict left {grads_of(params)} above tau"
    )


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_strict_keeps_the_default_within_a_few_ulps(dtype):
    """strict moves the result by the rounding it corrects, not more."""
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(n).astype(np_dtype(dtype)) for n in (100, 7, 30)]
    plain, strict = params_of(arrays), params_of(arrays)
    ours.clip_grad_norm_(plain, 0.5)
    ours.clip_grad_norm_(strict, 0.5, strict=True)
    eps = float(torch.finfo(getattr(torch, dtype)).eps)
    for a, b in zip(grads_of(plain), grads_of(strict)):
        # The fix scales by at most a few ulps of the dtype and rounds toward zero once more.
        np.testing.assert_allclose(
            np.asarray(b, np.float64),
            np.asarray(a, np.float64),
            rtol=4 * eps,
            atol=float(torch.finfo(getattr(torch, dtype)).tiny),
            err_msg=f"strict vs default ({dtype})",
        )


# The accelerator path: no value is read on the host; choices are made with torch.where.


@given(
    tree=gradient_trees(magnitudes="extreme"),
    tau=thresholds(),
    convention=st.sampled_from(("torch", "optax")),
    nonfinite=st.sampled_from(("propagate", "skip")),
    poison=st.booleans(),
)
def test_branch_free_path_gives_the_cpu_paths_bits(tree, tau, convention, nonfinite, poison):
    """CPU tensors, but clipped as on a GPU (`_host_readable` says no): the same bits, except
    for norms within a factor 4 of where max_norm / norm turns subnormal (see divergences)."""
    arrays = leaves(tree)
    if poison:
        arrays = arrays[:-1] + [
            np.append(arrays[-1].ravel(), np.asarray(math.nan, arrays[-1].dtype))
        ]
    dtype = torch.finfo(to_torch(arrays[0]).dtype)
    # A poisoned gradient has no exact norm (the oracle takes finite entries only) and is kept.
    finite = all(np.isfinite(np.asarray(a, np.float64)).all() for a in arrays)
    hypothesis.assume(
        not finite
        or not exact_norm(arrays) * 4 >= 2.0 ** (math.frexp(dtype.max)[1] - 2) * min(1.0, tau)
    )
    host, device = params_of(arrays), params_of(arrays)
    expected = ours.clip_grad_norm_(host, tau, convention=convention, nonfinite=nonfinite)
    with mock.patch.object(clip_safeguards, "_host_readable", lambda d: False):
        got = ours.clip_grad_norm_(device, tau, convention=convention, nonfinite=nonfinite)
    np.testing.assert_array_equal(float(got), float(expected), err_msg="norm")
    assert_same_bits(grads_of(device), grads_of(host), "branch-free path vs CPU path")


@pytest.mark.parametrize("convention", ("torch", "optax"))
def test_compiles_with_fullgraph_as_torchs_own(convention):
    """torch.compile(fullgraph=True) captures the drop-in in one graph, as it does torch's own
    clip_grad_norm_: no branch on a tensor's value while tracing (the branch-free path runs).
    backend="eager" runs the captured graph op by op: the capture is what a data-dependent
    branch breaks; inductor's code generation would add ~100 s here and prove nothing more."""
    arrays = [np.linspace(-3, 5, 12, dtype=np.float32).reshape(4, 3), np.full(5, 2.0, np.float32)]
    compiled_fn = torch.compile(ours.clip_grad_norm_, fullgraph=True, backend="eager")
    for tau in (1.0, 100.0):  # clipped, then kept
        compiled, eager = params_of(arrays), params_of(arrays)
        got = compiled_fn(compiled, tau, convention=convention)
        with mock.patch.object(clip_safeguards, "_host_readable", lambda d: False):
            expected = ours.clip_grad_norm_(eager, tau, convention=convention)
        assert float(got) == float(expected), f"norm {float(got)!r} vs {float(expected)!r}"
        assert_same_bits(grads_of(compiled), grads_of(eager), f"compiled vs eager, tau={tau}")
    if convention == "torch":
        theirs = params_of(arrays)
        LIB.clip_grad_norm_(theirs, 1.0)
        mine = params_of(arrays)
        compiled_fn(mine, 1.0)
        assert_same_bits(grads_of(mine), grads_of(theirs), "compiled drop-in vs torch")


def test_huge_norm_keeps_direction_in_torch_convention():
    """tau / (n + 1e-6) is subnormal for n = 6e38 (above float32's max anyway): torch zeroes."""
    theirs, mine = (
        params_of([np.full(4, 3e38, np.float32)]),
        params_of([np.full(4, 3e38, np.float32)]),
    )
    LIB.clip_grad_norm_(theirs, 1.0)
    assert float(ours.clip_grad_norm_(mine, 1.0)) == math.inf
    np.testing.assert_array_equal(grads_of(theirs)[0], 0.0, err_msg="torch no longer zeroes it")
    np.testing.assert_array_equal(grads_of(mine)[0], 0.5, err_msg="direction lost")


def test_strict_fixes_torchs_float32_norm_of_a_large_tensor():
    """torch's CPU float32 norm keeps one float32 accumulator per thread (pytorch#169237):
    for 2**22 N(0, 1) entries it comes out about 8e-5 low, so its clipped norm is as much
    above tau. The default reproduces torch's bits; strict=True measures again and fixes it."""
    grad = torch.randn(2**22, generator=torch.Generator().manual_seed(0))
    theirs, mine, strict = (torch.zeros(2**22, requires_grad=True) for _ in range(3))
    theirs.grad, mine.grad, strict.grad = grad.clone(), grad.clone(), grad.clone()
    LIB.clip_grad_norm_([theirs], 1.0)
    ours.clip_grad_norm_([mine], 1.0)
    ours.clip_grad_norm_([strict], 1.0, strict=True)
    assert torch.equal(mine.grad, theirs.grad), "default differs from torch"
    # float64 norms of float32 entries: within 1e-12 of exact here, far inside the 1e-5 margins.
    excess = float(torch.linalg.vector_norm(theirs.grad.double())) - 1.0
    assert excess > 1e-5, (
        f"torch's norm is accurate now (clipped norm 1 + {excess:.2e}): update docs/divergences.md"
    )
    after = float(torch.linalg.vector_norm(strict.grad.double()))
    assert 1.0 - 1e-5 < after <= 1.0, f"strict clipped norm {after!r}"
