"""`charclip explode --paper` computes the same thing in both backends: the one-unit network's error
surface and gradient, each gradient-descent step of the paths, and the temporal-order updates; and
the rescaled path never steps further than lr * tau (Pascanu, Mikolov & Bengio 2013, Algorithm 1)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from charclip.explode.paper import temporal_order_batch, temporal_order_init
from charclip.jax import explode as jax_explode
from charclip.torch import explode as torch_explode

BACKENDS = {"torch": torch_explode, "jax": jax_explode}
KW = {"x0": 0.5, "steps": 50, "target": 0.7}


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_surface_and_gradient_agree_across_backends_and_with_numpy():
    w, b = np.meshgrid(np.linspace(0, 12, 13), np.linspace(-8, 2, 11))
    b = (
        b + 1e-3
    )  # off the grid lines, and a few points right at the wall (b = 0.5 - w sigmoid(0.5)):
    w = np.concatenate([w.ravel(), [6.0, 8.0, 10.0]])
    b = np.concatenate([b.ravel(), 0.5 - np.array([6.0, 8.0, 10.0]) * _sigmoid(0.5) + 1e-6])
    t = torch_explode.one_unit_loss_grad(w, b, **KW)
    j = jax_explode.one_unit_loss_grad(w, b, **KW)
    x = np.full_like(w, 0.5)
    for _ in range(50):
        x = w * _sigmoid(x) + b
    # 50 steps of a few float64 operations each: relative rounding ~1e-14 (measured 4e-14 on a 241 x 241 grid);
    # 1e-10 leaves room for the conditioning at the wall, where dE/dtheta is ~1e5 times its size elsewhere.
    np.testing.assert_allclose(
        t[0], (_sigmoid(x) - 0.7) ** 2, rtol=1e-10, atol=1e-300, err_msg="torch E vs NumPy"
    )
    for name, a, c in zip(("E", "dE/dw", "dE/db"), t, j):
        np.testing.assert_allclose(a, c, rtol=1e-10, atol=1e-300, err_msg=f"{name}: torch vs JAX")
    assert np.hypot(t[1], t[2])[-3] > 1e2, (
        "1e-6 from the wall at w = 6 the gradient should have exploded"
    )


@pytest.mark.parametrize("threshold", [None, 0.1])
def test_each_step_of_a_path_agrees_across_backends(threshold):
    # From (6, -2.5) with lr 2 the unclipped path hits the wall (a step of ~1 in (w, b), docs/paper-rerun.md).
    kw = {"lr": 2.0, "updates": 22, "threshold": threshold, **KW}
    pt, nt = torch_explode.one_unit_path(6.0, -2.5, **kw)
    pj, nj = jax_explode.one_unit_path(6.0, -2.5, **kw)
    # Step by step from torch's own points: JAX's gradient there, rescaled, gives torch's next point. The
    # gradients agree to ~1e-14 relative (test above); a step adds one rounding of |theta| ~ 10.
    _, gw, gb = jax_explode.one_unit_loss_grad(pt[:-1, 0], pt[:-1, 1], **KW)
    g = np.stack([gw, gb], axis=1)
    np.testing.assert_allclose(
        np.linalg.norm(g, axis=1), nt, rtol=1e-10, err_msg="pre-clip norms at torch's points"
    )
    if threshold is not None:
        g = g * np.minimum(1.0, threshold / np.linalg.norm(g, axis=1))[:, None]
    np.testing.assert_allclose(
        pt[:-1] - 2.0 * g, pt[1:], rtol=1e-10, atol=1e-12, err_msg="torch's steps vs JAX's"
    )
    # The whole paths: rounding differences are multiplied by the wall's gradient at each crossing (measured
    # 7.5e-9 over 60 updates); 1e-7 is far below the ~1 length of a step at the wall.
    np.testing.assert_allclose(pj, pt, atol=1e-7, err_msg="the paths drifted apart")
    np.testing.assert_allclose(nj, nt, rtol=1e-6, err_msg="the norms along the paths drifted apart")
    if threshold is None:
        assert np.linalg.norm(np.diff(pt, axis=0), axis=1).max() > 0.5, (
            "the unclipped path should jump at the wall"
        )


@settings(max_examples=8, deadline=None)
@given(
    w0=st.floats(0.5, 11.5),
    b0=st.floats(-9.0, 1.5),
    tau=st.sampled_from([1e-3, 0.03, 0.1, 1.0]),
    lr=st.sampled_from([0.5, 2.0, 10.0]),
)
def test_the_rescaled_path_never_steps_further_than_lr_times_tau(w0, b0, tau, lr):
    for name, m in BACKENDS.items():
        p, norms = m.one_unit_path(w0, b0, lr=lr, updates=8, threshold=tau, **KW)
        steps = np.linalg.norm(np.diff(p, axis=0), axis=1)
        # theta - lr * g rounds once per coordinate, and so does the difference of two points: 2 ulps of |theta|.
        slack = 4 * np.finfo(float).eps * np.abs(p).max()
        assert (steps <= lr * tau + slack).all(), (
            f"{name}: step {steps.max()} > lr * tau = {lr * tau}"
        )
        small = norms < tau  # below the threshold the step is the plain one, lr * ||g||
        np.testing.assert_allclose(
            steps[small],
            lr * norms[small],
            rtol=1e-12,
            atol=slack,
            err_msg=f"{name}: a gradient under tau was changed",
        )


@pytest.mark.parametrize(
    "kind, threshold", [("sigmoid", None), ("basic_tanh", 1.0), ("smart_tanh", 1.0)]
)
def test_temporal_order_updates_agree_across_backends(kind, threshold):
    rng = np.random.default_rng(5)
    params = temporal_order_init(kind, 16, rng)
    xs, ys = zip(*(temporal_order_batch(rng, 4, 12) for _ in range(4)))
    act = "sigmoid" if kind == "sigmoid" else "tanh"
    # lr 3 so that the unclipped norms exceed the threshold and the clipping branch runs too.
    out = {
        n: m.temporal_order_updates(
            params, np.stack(xs), np.stack(ys), lr=3.0, threshold=threshold, activation=act
        )
        for n, m in BACKENDS.items()
    }
    # float64, 4 updates of 12-step BPTT with width-16 matmuls: ~1e-15 unclipped. Clipped, each backend's
    # strict mode shrinks the factor by its own margin of a few n * eps (n ~ 1000 entries; docs/clipping.md),
    # times lr = 3, over 4 updates: measured 2.3e-12 absolute; 1e-10 bounds it with room, far below any step.
    for k in params:
        np.testing.assert_allclose(
            out["torch"][0][k], out["jax"][0][k], rtol=0, atol=1e-10, err_msg=k
        )
    np.testing.assert_allclose(out["torch"][1], out["jax"][1], rtol=1e-10, err_msg="losses")
    np.testing.assert_allclose(out["torch"][2], out["jax"][2], rtol=1e-10, err_msg="gradient norms")
    x, y = temporal_order_batch(rng, 200, 12)
    assert torch_explode.temporal_order_errors(
        out["torch"][0], x, y, activation=act
    ) == jax_explode.temporal_order_errors(out["jax"][0], x, y, activation=act)
