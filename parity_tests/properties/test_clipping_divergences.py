"""Where PyTorch, optax and ours differ: each library behaviour pinned, ours shown right.

Every case here has a minimal input and appears in docs/divergences.md with the three
outputs. If a library changes, its pin fails and the document must be updated.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from charclip.jax import clipping as jclip
from charclip.torch import clipping as tclip

torch.set_num_threads(1)  # on 2 cores, 2 intra-op threads make each tiny op ~1000x slower

JAX_DTYPES = {torch.float16: jnp.float16, torch.bfloat16: jnp.bfloat16, torch.float32: jnp.float32}


def torch_library(values, tau, dtype=torch.float32, **options):
    param = torch.zeros(len(values), dtype=dtype, requires_grad=True)
    param.grad = torch.tensor(values, dtype=dtype)
    norm = torch.nn.utils.clip_grad_norm_([param], tau, **options)
    return param.grad.double().numpy(), float(norm)


def optax_library(values, tau, dtype=torch.float32):
    grad = jnp.asarray(values, JAX_DTYPES[dtype])
    clipped, _ = optax.clip_by_global_norm(tau).update(grad, optax.EmptyState())
    return np.asarray(clipped, np.float64), float(optax.tree.norm(grad))


def ours_torch(values, tau, dtype=torch.float32, **options):
    param = torch.zeros(len(values), dtype=dtype, requires_grad=True)
    param.grad = torch.tensor(values, dtype=dtype)
    # The optax convention, as in ours_jax by default, so each test treats both backends alike.
    norm = tclip.clip_grad_norm_([param], tau, **{"convention": "optax", **options})
    return param.grad.double().numpy(), float(norm)


def ours_jax(values, tau, dtype=torch.float32, **options):
    clipped, norm = jclip.clip_tree_by_global_norm(
        jnp.asarray(values, JAX_DTYPES[dtype]), tau, **options
    )
    return np.asarray(clipped, np.float64), float(norm)


OURS = (ours_torch, ours_jax)


def _norm(x) -> float:
    return math.hypot(*map(float, x))


@pytest.mark.parametrize("ours", OURS)
def test_finite_float32_gradient_whose_squares_overflow(ours):
    values = [1e20] * 4  # each square is 1e40 > float32's 3.4e38
    for library in (torch_library, optax_library):
        clipped, norm = library(values, 1.0)
        assert norm == math.inf, f"{library.__name__}: norm {norm}"
        np.testing.assert_array_equal(
            clipped, 0.0, err_msg=f"{library.__name__} no longer zeroes the gradient"
        )
    clipped, norm = ours(values, 1.0)
    # The true norm 2e20 rounded to float32.
    assert norm == float(np.float32(2e20)), f"norm {norm}"
    np.testing.assert_array_equal(clipped, 0.5, err_msg="direction lost")


@pytest.mark.parametrize("ours", OURS)
def test_float32_norm_beyond_the_dtype_keeps_direction(ours):
    values = [3e38] * 4  # the norm 6e38 is not a float32
    for library in (torch_library, optax_library):
        clipped, _ = library(values, 1.0)
        np.testing.assert_array_equal(
            clipped, 0.0, err_msg=f"{library.__name__} no longer zeroes the gradient"
        )
    clipped, norm = ours(values, 1.0)
    assert norm == math.inf
    np.testing.assert_array_equal(clipped, 0.5, err_msg="direction lost")


@pytest.mark.parametrize("ours", OURS)
@pytest.mark.parametrize(
    ("dtype", "library_after"),
    [(torch.bfloat16, 1.0036525776901595), (torch.float16, 0.9997923754682743)],
)
def test_low_precision_clipped_norm_exceeds_tau_in_libraries(ours, dtype, library_after):
    values = [0.5] * 1000  # norm 15.811
    for library in (torch_library, optax_library):
        clipped, norm = library(values, 1.0, dtype)
        # Both compute the norm in the gradient's dtype: 15.8125, not 15.8114.
        assert norm == 15.8125, f"{library.__name__}: norm {norm}"
        assert _norm(clipped) == library_after, (
            f"{library.__name__}: clipped norm {_norm(clipped)!r}"
        )
    clipped, norm = ours(values, 1.0, dtype)
    assert norm == float(np.float32(math.sqrt(250.0))), f"norm {norm} not accumulated in float32"
    assert _norm(clipped) <= 1.0, f"clipped norm {_norm(clipped)!r} > tau"


@pytest.mark.parametrize("ours", OURS)
def test_float16_square_overflows_in_optax_not_torch(ours):
    clipped, norm = optax_library([300.0], 1.0, torch.float16)  # 300**2 > 65504
    assert norm == math.inf and clipped.tolist() == [0.0], f"optax: {clipped}, {norm}"
    clipped, norm = torch_library([300.0], 1.0, torch.float16)  # torch accumulates in float32
    assert norm == 300.0 and clipped.tolist() == [1.0], f"torch: {clipped}, {norm}"
    clipped, norm = ours([300.0], 1.0, torch.float16)
    assert norm == 300.0 and clipped.tolist() == [1.0], f"ours: {clipped}, {norm}"


@pytest.mark.parametrize("ours", OURS)
def test_zero_threshold_with_zero_gradient(ours):
    clipped, _ = optax_library([0.0, 0.0], 0.0)
    assert np.isnan(clipped).all(), f"optax now gives {clipped} (0 / 0 fixed upstream?)"
    clipped, _ = torch_library([0.0, 0.0], 0.0)
    np.testing.assert_array_equal(clipped, 0.0, err_msg="torch")
    clipped, _ = ours([0.0, 0.0], 0.0)
    np.testing.assert_array_equal(clipped, 0.0, err_msg="ours")


@pytest.mark.parametrize("tau", [-1.0, math.nan])
def test_negative_or_nan_threshold(tau):
    torch_clipped, _ = torch_library([3.0, 4.0], tau)
    optax_clipped, _ = optax_library([3.0, 4.0], tau)
    if tau < 0:  # both flip the sign
        np.testing.assert_allclose(
            torch_clipped, [-0.6, -0.8], rtol=1e-6, err_msg="torch"
        )  # float32 divide and multiply
        np.testing.assert_allclose(
            optax_clipped, [-0.6, -0.8], rtol=1e-6, err_msg="optax"
        )  # float32 divide and multiply
    else:  # both return NaN everywhere
        assert np.isnan(torch_clipped).all() and np.isnan(optax_clipped).all()
    with pytest.raises(ValueError, match="max_norm must be >= 0"):
        ours_torch([3.0, 4.0], tau)
    with pytest.raises(ValueError, match="max_norm must be >= 0"):
        ours_jax([3.0, 4.0], tau)
    with pytest.raises(ValueError, match="max_norm must be >= 0"):
        jclip.clip_by_global_norm(tau)


def test_norm_type_zero_counts_tensors_in_torch():
    params = [torch.zeros(n, requires_grad=True) for n in (3, 2, 1)]
    for param, values in zip(params, ([1.0, 2.0, 3.0], [0.0, 0.0], [5.0])):
        param.grad = torch.tensor(values)
    # 4 non-zero entries, but 2 non-zero tensors.
    assert float(torch.nn.utils.get_total_norm([p.grad for p in params], 0)) == 2.0
    # Ours counts the 4 entries, in both backends; clipping by a count (which no scaling
    # changes) or by p < 0 raises, in both, through the one check (charclip.clipspec).
    assert float(tclip.get_total_norm([p.grad for p in params], 0)) == 4.0
    assert float(jclip.global_norm([jnp.asarray(p.grad.numpy()) for p in params], 0)) == 4.0
    for bad in (0, -1, math.nan):
        with pytest.raises(ValueError, match="norm_type must be > 0") as torch_error:
            tclip.clip_grad_norm_(params, 1.0, norm_type=bad)
        with pytest.raises(ValueError, match="norm_type must be > 0") as jax_error:
            jclip.clip_tree_by_global_norm([jnp.ones(3, jnp.float32)], 1.0, norm_type=bad)
        assert str(torch_error.value) == str(jax_error.value)


def test_quasi_norms_below_one_are_accepted_alike():
    """torch clips by p = 0.5 (its vector_norm takes any order), and so do both of ours: the
    quasi-norm is >= the 2-norm, so clipping by it still bounds the step."""
    values = np.array([3.0, -4.0, 0.25, 0.0])
    grad = torch.tensor(values)
    expected = float(np.sum(np.sqrt(np.abs(values))) ** 2)  # 10.6... ; float64 throughout
    got_torch = float(tclip.get_total_norm([grad], 0.5))
    got_jax = float(jclip.global_norm([jnp.asarray(values)], 0.5))
    # 4 roots (2 u each) summed (3 u), squared (doubling that: 10 u, then 2 u): 12 u; 16 u allowed
    for name, got in (("charclip.torch", got_torch), ("charclip.jax", got_jax)):
        np.testing.assert_allclose(
            got, expected, rtol=16 * 2.0**-53, err_msg=f"{name}: 0.5-quasi-norm"
        )
    clipped, _ = jclip.clip_tree_by_global_norm([jnp.asarray(values)], 1.0, norm_type=0.5)
    param = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    param.grad = grad.clone()
    tclip.clip_grad_norm_([param], 1.0, norm_type=0.5)
    for name, result in (
        ("charclip.torch", param.grad.numpy()),
        ("charclip.jax", np.asarray(clipped[0])),
    ):
        after = float(np.sum(np.sqrt(np.abs(result))) ** 2)
        # scaled by 1 / 10.6 (optax) or 1 / (10.6 + 1e-6) (torch): 1 within a few ulps
        assert after <= 1.0 + 16 * 2.0**-53, f"{name}: clipped 0.5-quasi-norm {after!r} above 1"


@pytest.mark.parametrize("convention", ("optax", "torch"))
def test_conventions_differ_above_threshold(convention):
    """g = 10, tau = 1: torch's epsilon leaves the result a hair below tau, optax's an ulp above."""
    torch_clipped, _ = torch_library([6.0, 8.0], 1.0)
    optax_clipped, _ = optax_library([6.0, 8.0], 1.0)
    assert _norm(torch_clipped) == 0.9999999403953552 and _norm(optax_clipped) == 1.000000023841858
    expected = optax_clipped if convention == "optax" else torch_clipped
    for ours in OURS:
        clipped, _ = ours([6.0, 8.0], 1.0, convention=convention)
        np.testing.assert_array_equal(clipped, expected, err_msg=f"{ours.__name__} ({convention})")


def test_torch_epsilon_matters_for_small_norms():
    """g = 2e-6, tau = 1e-6: torch scales by tau / (g + 1e-6) = 1/3, optax by tau / g = 1/2."""
    torch_clipped, _ = torch_library([2e-6], 1e-6)
    optax_clipped, _ = optax_library([2e-6], 1e-6)
    np.testing.assert_allclose(
        torch_clipped, [2e-6 / 3], rtol=1e-6, err_msg="torch"
    )  # float32 arithmetic
    np.testing.assert_allclose(
        optax_clipped, [1e-6], rtol=1e-6, err_msg="optax"
    )  # float32 arithmetic
    np.testing.assert_array_equal(
        ours_jax([2e-6], 1e-6)[0], optax_clipped, err_msg="ours (optax convention)"
    )


def test_torch_epsilon_scales_just_below_tau():
    """The boundary: g == tau. optax keeps g (strict <, then tau / g = 1); torch scales by
    tau / (tau + 1e-6), and keeps scaling for norms in (tau - 1e-6, tau]."""
    values = [0.6, 0.8]  # norm 1.0 in float32
    optax_clipped, _ = optax_library(values, 1.0)
    torch_clipped, _ = torch_library(values, 1.0)
    np.testing.assert_array_equal(
        optax_clipped, np.float32(values), err_msg="optax changed g at g == tau"
    )
    assert torch_clipped[0] < np.float32(0.6), (
        f"torch no longer scales at g == tau: {torch_clipped}"
    )
    np.testing.assert_allclose(
        torch_clipped, np.float32(values) / (1 + 1e-6), rtol=2e-7, err_msg="torch"
    )  # float32 ulp
    for ours in OURS:
        np.testing.assert_array_equal(ours(values, 1.0)[0], optax_clipped, err_msg=ours.__name__)
        np.testing.assert_array_equal(
            ours(values, 1.0, convention="torch")[0], torch_clipped, err_msg=ours.__name__
        )


def test_optax_boundary_rescales_at_g_equal_tau():
    """At n == tau optax's strict < takes the (g / n) * tau branch: 1 in exact arithmetic,
    but the roundings move an entry. Both backends of ours keep that branch; they differ
    from each other by one ulp because XLA on the CPU divides by a broadcast scalar as a
    multiplication by its reciprocal (two roundings), while torch divides exactly."""
    values = [0.07500000298023224, 1.0125000476837158]  # float32 values
    tau = 1.0152740478515625  # their float32 norm, exactly
    optax_clipped, optax_norm = optax_library(values, tau)
    assert optax_norm == tau
    assert optax_clipped.tolist() == [0.07499999552965164, 1.0125000476837158], (
        f"optax: {optax_clipped}"
    )
    np.testing.assert_array_equal(ours_jax(values, tau)[0], optax_clipped, err_msg="ours_jax")
    ieee = (
        np.float32(values) / np.float32(tau) * np.float32(tau)
    )  # correctly rounded divide, multiply
    assert ieee[0] == np.float32(0.07500001043081284)
    np.testing.assert_array_equal(ours_torch(values, tau)[0], ieee, err_msg="ours_torch")


def test_torch_clipping_twice_shrinks_again():
    once, _ = torch_library([3.0], 1.0)
    twice, _ = torch_library(once.tolist(), 1.0)
    assert once.tolist() == [0.9999996423721313] and twice.tolist() == [0.9999990463256836], (
        f"{once}, {twice}"
    )
    for ours in OURS:
        o, _ = ours([3.0], 1.0)
        t, _ = ours(o.tolist(), 1.0)
        np.testing.assert_array_equal(
            t, o, err_msg=f"{ours.__name__}: optax convention is idempotent here"
        )


def test_infinity_norm_of_empty_tensors():
    with pytest.raises(RuntimeError, match="empty tensor"):
        torch_library([], 1.0, norm_type=math.inf)
    assert float(optax.tree.norm([jnp.zeros(0, jnp.float32)], ord=math.inf)) == -math.inf
    assert float(tclip.get_total_norm([torch.zeros(0)], math.inf)) == 0.0
    assert float(jclip.global_norm([jnp.zeros(0, jnp.float32)], math.inf)) == 0.0


def test_torch_general_p_norm_of_one_entry_and_a_zero():
    """||(x, 0)||_3.5 is x; torch's general-p path (x**p summed, then s**(1/p)) misses it by
    14 eps in float64 for x = 4.4e-24. Ours measures with the same kernel, so the property
    tests allow 16 eps for p outside {1, 2, inf}."""
    x = 4.40078953e-24
    got = float(torch.linalg.vector_norm(torch.tensor([x, 0.0], dtype=torch.float64), 3.5))
    assert got == 4.400789530000013e-24, f"torch now gives {got!r} for {x!r}"
    assert abs(got / x - 1) < 16 * np.finfo(np.float64).eps


def test_subnormal_gradients():
    """torch's squares of 1e-40 underflow (norm 0); XLA on the CPU flushes subnormals (0);
    ours in torch gets the norm right; ours in JAX inherits XLA's flush."""
    values = [1e-40] * 4
    assert torch_library(values, 1.0)[1] == 0.0
    assert optax_library(values, 1.0)[1] == 0.0
    np.testing.assert_allclose(
        ours_torch(values, 1.0)[1], 2e-40, rtol=1e-4, err_msg="ours-torch"
    )  # subnormal: ~5 digits
    assert ours_jax(values, 1.0)[1] == 0.0
    assert (
        float(optax.clip(1.0).update(jnp.asarray([1e-40], jnp.float32), optax.EmptyState())[0][0])
        == 0.0
    )


# Non-finite gradients: each policy does what it says, in both backends.


@pytest.mark.parametrize("values", [[1.0, math.inf], [1.0, math.nan]])
def test_nonfinite_propagate_is_what_the_libraries_do(values):
    expected, _ = torch_library(values, 1.0)
    np.testing.assert_array_equal(optax_library(values, 1.0)[0], expected, err_msg="optax vs torch")
    for ours in OURS:
        np.testing.assert_array_equal(ours(values, 1.0)[0], expected, err_msg=ours.__name__)


@pytest.mark.parametrize("values", [[1.0, math.inf], [1.0, math.nan]])
def test_nonfinite_skip_gives_a_zero_update_and_a_nonfinite_norm(values):
    for ours in OURS:
        clipped, norm = ours(values, 1.0, nonfinite="skip")
        np.testing.assert_array_equal(clipped, 0.0, err_msg=ours.__name__)
        assert not math.isfinite(norm), f"{ours.__name__}: norm {norm} hides the skip"


def test_nonfinite_error_raises_before_touching_any_grad():
    params = [torch.zeros(2, requires_grad=True), torch.zeros(1, requires_grad=True)]
    params[0].grad, params[1].grad = torch.tensor([3.0, 4.0]), torch.tensor([math.nan])
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        tclip.clip_grad_norm_(params, 1.0, nonfinite="error")
    assert params[0].grad.tolist() == [3.0, 4.0], "a gradient was touched before raising"
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        jclip.clip_tree_by_global_norm(
            [jnp.asarray([3.0, math.nan], jnp.float32)], 1.0, nonfinite="error"
        )


def test_nonfinite_error_under_jit_zeroes_and_the_loop_raises():
    step = jax.jit(lambda g: jclip.clip_tree_by_global_norm(g, 1.0, nonfinite="error"))
    clipped, norm = step([jnp.asarray([3.0, math.inf], jnp.float32)])
    np.testing.assert_array_equal(
        np.asarray(clipped[0]), 0.0, err_msg="update not zeroed under jit"
    )
    with pytest.raises(FloatingPointError):
        jclip.raise_if_nonfinite(norm)


def test_transformation_counts_skipped_steps():
    transform = optax.chain(
        jclip.count_nonfinite(), jclip.clip_by_global_norm(1.0, nonfinite="skip")
    )
    params = [jnp.zeros(2, jnp.float32)]
    state = transform.init(params)
    update = jax.jit(transform.update)
    for grad in ([3.0, 4.0], [1.0, math.nan], [math.inf, 0.0], [0.1, 0.1]):
        clipped, state = update([jnp.asarray(grad, jnp.float32)], state)
        assert np.isfinite(np.asarray(clipped[0])).all(), f"{grad}: the skip let {clipped} through"
    assert int(state[0].count) == 2, f"counted {int(state[0].count)} skipped steps"
