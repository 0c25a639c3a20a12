"""charclip's own clipping guards, pinned (issue 23, item 7).

A mutation pass over torch_impl/clipping.py and jax_impl/clipping.py found checks whose
behaviour no test pinned: the code was right, but a change could have broken it
silently. Each case below pins one, through the public functions only; where a case is
a promise of the conformance kit, the kit's exact oracle (`norm_at_most`) decides it.
"""

import math
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from charclip.jax import clipping as jclip
from charclip.testing import exact_norm, norm_at_most
from charclip.testing.strategies import INFO, from_torch, np_dtype, to_torch
from charclip.torch import clipping as tclip

torch.set_num_threads(1)  # on 2 cores, 2 intra-op threads make each tiny op ~1000x slower


def _params(*arrays):
    params = []
    for a in arrays:
        g = to_torch(np.asarray(a))
        p = torch.nn.Parameter(torch.zeros(g.shape, dtype=g.dtype))
        p.grad = g
        params.append(p)
    return params


def _assert_clipped_onto_tau(before, after, tau, dtype, what, low=None):
    """Non-zero, same direction, norm within two roundings of tau (or at least `low`, for strict's
    margin) and (exactly) at most tau (1 + 2 eps)."""
    eps = INFO[dtype].eps
    b = np.concatenate([np.asarray(a, np.float64).ravel() for a in before])
    a = np.concatenate([np.asarray(x, np.float64).ravel() for x in after])
    assert np.all(np.isfinite(a)) and np.any(a != 0), f"{what}: {a} (lost the gradient)"
    norm = exact_norm([a])
    # A divide and a multiply (or one float64 factor and one rounding into the dtype): 2 eps.
    if low is None:
        assert abs(norm - tau) <= 2 * eps * tau, f"{what}: ||g'|| = {norm!r}, tau = {tau!r}"
    else:
        assert low <= norm, f"{what}: ||g'|| = {norm!r}, below {low!r} (tau = {tau!r})"
    bound = tau if low is not None else tau * (1 + 2 * eps)  # strict promises tau exactly
    assert norm_at_most([a], bound), f"{what}: ||g'|| = {norm!r} above {bound!r}"
    np.testing.assert_allclose(
        a / norm, b / exact_norm([b]), rtol=2 * eps, err_msg=f"{what}: direction changed"
    )


@pytest.mark.parametrize("kwargs", [dict(convention="pytorch"), dict(nonfinite="ignore")])
def test_torch_refuses_unknown_convention_and_nonfinite_strings(kwargs):
    with pytest.raises(ValueError, match="must be one of"):
        tclip.clip_grad_norm_(_params([3.0, 4.0]), 1.0, **kwargs)


def test_torch_clip_grads_with_norm_refuses_an_unknown_convention():
    with pytest.raises(ValueError, match="convention must be one of"):
        tclip.clip_grads_with_norm_(_params([3.0, 4.0]), 1.0, torch.tensor(5.0), convention="keras")


def test_jax_refuses_an_unknown_nonfinite_string():
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        jclip.clip_tree_by_global_norm([jnp.ones(2)], 1.0, nonfinite="zero")
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        jclip.clip_by_global_norm(1.0, nonfinite="zero")


@pytest.mark.parametrize("exponent, tau", [(124, 0.125), (126, 1.0)])
def test_torch_convention_on_a_huge_float32_norm_keeps_a_nonzero_gradient_torch(exponent, tau):
    """tau / (n + 1e-6) is subnormal or 0 in float32 there; the clip must still land on tau."""
    g = np.array([2.0**exponent], np.float32)
    params = _params(g)
    tclip.clip_grad_norm_(params, tau, convention="torch")
    _assert_clipped_onto_tau(
        [g], [from_torch(params[0].grad)], tau, "float32", f"[2**{exponent}], tau={tau}"
    )


def test_torch_convention_on_float32_two_to_the_127_jax():
    g = np.array([2.0**127], np.float32)
    clipped, _ = jclip.clip_tree_by_global_norm([jnp.asarray(g)], 4.0, convention="torch")
    _assert_clipped_onto_tau([g], [np.asarray(clipped[0])], 4.0, "float32", "[2**127], tau=4 (JAX)")


def test_tiny_tau_on_a_huge_gradient_clips_to_tau_torch():
    g = np.array([5e37, 1e37], np.float32)
    params = _params(g)
    tclip.clip_grad_norm_(params, 1e-5)
    _assert_clipped_onto_tau(
        [g], [from_torch(params[0].grad)], 1e-5, "float32", "[5e37, 1e37], tau=1e-5"
    )


@pytest.mark.parametrize("value, tau", [(2.0**1021, 0.5), (2.0**1021, 0.25), (1.5e308, 1.0)])
def test_strict_float64_near_overflow_keeps_a_nonzero_gradient(value, tau):
    g = np.array([value], np.float64)
    params = _params(g)
    tclip.clip_grad_norm_(params, tau, strict=True)
    # strict scales by tau over a proven upper bound of the norm (a margin of ~1e-12 measured here),
    # so the clipped norm is not tau to rounding; what the guard protects is a gradient kept at
    # the clipping scale instead of zeroed or subnormal: at least tau / 2, at most tau exactly.
    _assert_clipped_onto_tau(
        [g], [from_torch(params[0].grad)], tau, "float64", f"torch strict [{value}]", tau / 2
    )
    clipped, _ = jclip.clip_tree_by_global_norm([jnp.asarray(g)], tau, strict=True)
    _assert_clipped_onto_tau(
        [g], [np.asarray(clipped[0])], tau, "float64", f"JAX strict [{value}]", tau / 2
    )


@pytest.mark.parametrize("given, meant", [("inf", math.inf), ("3", 3.0), (np.int64(3), 3.0)])
def test_norm_type_given_as_a_string_or_numpy_integer(given, meant):
    g = np.array([3.0, -4.0, 12.0], np.float32)
    a, b = _params(g), _params(g)
    na = tclip.clip_grad_norm_(a, 1.0, norm_type=given)
    nb = tclip.clip_grad_norm_(b, 1.0, norm_type=meant)
    assert float(na) == float(nb), f"norm_type={given!r}: {float(na)!r} != {float(nb)!r}"
    np.testing.assert_array_equal(from_torch(a[0].grad), from_torch(b[0].grad))
    c = _params(g)
    torch.nn.utils.clip_grad_norm_(c, 1.0, norm_type=meant)
    np.testing.assert_array_equal(
        from_torch(a[0].grad), from_torch(c[0].grad), err_msg="not torch's bits"
    )


def test_a_zero_dim_float32_tensor_max_norm_keeps_torchs_bits():
    g = np.array([0.3, -7.1, 2.2], np.float32)
    tau = torch.tensor(0.7, dtype=torch.float32)
    ours, theirs = _params(g), _params(g)
    n_ours = tclip.clip_grad_norm_(ours, tau)
    n_theirs = torch.nn.utils.clip_grad_norm_(theirs, tau)
    assert float(n_ours) == float(n_theirs)
    np.testing.assert_array_equal(from_torch(ours[0].grad), from_torch(theirs[0].grad))


@pytest.mark.parametrize("mantissa", [1.0, 1.25, 1.5, 1.9990234375])
def test_single_entry_float32_in_two_to_the_125_keeps_torchs_bits(mantissa):
    g = np.array([mantissa * 2.0**125], np.float32)
    ours, theirs = _params(g), _params(g)
    n_ours = tclip.clip_grad_norm_(ours, 1.0)
    n_theirs = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert math.isfinite(float(n_theirs)), (
        "torch's norm is finite here (the single entry is its own norm)"
    )
    assert float(n_ours) == float(n_theirs)
    np.testing.assert_array_equal(from_torch(ours[0].grad), from_torch(theirs[0].grad))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_low_precision_with_tau_equal_to_the_rounded_norm(dtype, backend):
    """tau = the norm rounded into the dtype (here above the true norm): at most tau, exactly."""
    g = np.array([0.3, -0.5, 0.7, 0.11], np.float64).astype(np_dtype(dtype))
    tau = float(np.asarray(exact_norm([g]), np_dtype(dtype)))
    for scale in (1.0, 3.0):  # at the threshold, and a gradient three times longer
        x = (np.asarray(g, np.float64) * scale).astype(np_dtype(dtype))
        if backend == "torch":
            params = _params(x)
            tclip.clip_grad_norm_(params, tau)
            out = from_torch(params[0].grad)
        else:
            out = np.asarray(jclip.clip_tree_by_global_norm([jnp.asarray(x)], tau)[0][0])
        assert norm_at_most([out], tau), (
            f"{backend} {dtype} x{scale}: ||g'|| = {exact_norm([out])!r} > tau = {tau!r}"
        )
        assert np.all(np.asarray(out, np.float64) * np.asarray(x, np.float64) >= 0) and np.any(
            out != 0
        )


def test_get_total_norm_zero_norm_type_raises_on_nan():
    with pytest.raises(RuntimeError, match="non-finite|nan|NaN"):
        tclip.get_total_norm([torch.tensor([1.0, math.nan])], norm_type=0, error_if_nonfinite=True)


def test_the_empty_generator_warning_points_at_the_callers_line():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = _line_of_next_call()
        tclip.clip_grad_norm_((p for p in []), 1.0)
    (w,) = [w for w in caught if "empty generator" in str(w.message)]
    assert w.filename == __file__ and w.lineno == line + 1, (
        f"warning points at {w.filename}:{w.lineno}"
    )


def _line_of_next_call() -> int:
    import inspect

    return inspect.currentframe().f_back.f_lineno


def test_clip_tree_with_norm_takes_a_python_float_norm():
    tree = [jnp.asarray(np.array([3.0, 4.0], np.float32))]
    with_float = jclip.clip_tree_with_norm(tree, 1.0, 5.0)
    with_array = jclip.clip_tree_with_norm(tree, 1.0, jnp.asarray(5.0, jnp.float32))
    np.testing.assert_array_equal(np.asarray(with_float[0]), np.asarray(with_array[0]))
    np.testing.assert_allclose(
        np.asarray(with_float[0], np.float64), [0.6, 0.8], rtol=2**-23
    )  # one float32 rounding
