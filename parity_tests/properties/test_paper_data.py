"""The temporal-order task's data and initial weights are those of Pascanu, Mikolov & Bengio (2013),
section 4.1.1 (positions as in the authors' tempOrder.py), and the bifurcation view's fixed points,
fold curve and basin boundary satisfy their defining equations. NumPy only."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from charclip.explode.paper import (
    N_CLASSES,
    basin_boundary,
    fixed_points,
    fold_curve,
    temporal_order_batch,
    temporal_order_init,
    wilson_interval,
)


@given(length=st.integers(10, 120), seed=st.integers(0, 2**32 - 1))
def test_each_sequence_has_one_relevant_symbol_in_each_window_and_distractors_elsewhere(
    length, seed
):
    x, y = temporal_order_batch(np.random.default_rng(seed), 64, length)
    assert x.shape == (64, length) and y.shape == (64,)
    span = length // 10
    first, second = slice(span, 2 * span), slice(5 * span, 6 * span)
    relevant = x < 2  # A = 0, B = 1
    assert (relevant[:, first].sum(axis=1) == 1).all(), "not exactly one A/B in [L/10, 2L/10)"
    assert (relevant[:, second].sum(axis=1) == 1).all(), "not exactly one A/B in [5L/10, 6L/10)"
    assert relevant.sum() == 2 * 64, f"{relevant.sum() - 128} A/B symbols outside the two windows"
    assert ((x >= 0) & (x < 6)).all()
    a = x[:, first][relevant[:, first]]
    b = x[:, second][relevant[:, second]]
    np.testing.assert_array_equal(
        y, a + 2 * b, err_msg="class is not first + 2 * second (AA, BA, AB, BB)"
    )


def test_classes_positions_and_distractors_are_uniform():
    n, length = 40_000, 50
    x, y = temporal_order_batch(np.random.default_rng(0), n, length)
    # 4 classes, n = 40000: each count's sd is sqrt(n * 1/4 * 3/4) ~ 87; 5 sd is 433 (one in a million by chance).
    counts = np.bincount(y, minlength=N_CLASSES)
    assert np.abs(counts - n / 4).max() < 5 * np.sqrt(n * 0.25 * 0.75), f"class counts {counts}"
    pos = np.argmax(
        x[:, : length // 2] < 2, axis=1
    )  # the first relevant position, 5 possible values
    counts = np.bincount(pos, minlength=length // 2)[5:10]
    assert np.abs(counts - n / 5).max() < 5 * np.sqrt(n * 0.2 * 0.8), (
        f"first-position counts {counts}"
    )
    d = x[x >= 2]
    counts = np.bincount(d - 2, minlength=4)
    assert np.abs(counts - d.size / 4).max() < 5 * np.sqrt(d.size * 0.25 * 0.75), (
        f"distractor counts {counts}"
    )


def test_the_task_refuses_lengths_without_room_for_its_windows():
    with pytest.raises(ValueError, match="10 or more"):
        temporal_order_batch(np.random.default_rng(0), 2, 9)


@pytest.mark.parametrize(
    "kind, std", [("sigmoid", 0.01), ("basic_tanh", 0.1), ("smart_tanh", 0.01)]
)
def test_initialisations_are_the_papers(kind, std):
    p = temporal_order_init(kind, 50, np.random.default_rng(1))
    assert p["W_uh"].shape == (6, 50) and p["W_hh"].shape == (50, 50) and p["W_hy"].shape == (50, 4)
    np.testing.assert_array_equal(p["b_hh"], 0.0)
    np.testing.assert_array_equal(p["b_hy"], 0.0)
    # 2700 draws of N(0, std): the sample sd is within 5% of std except with probability ~1e-6.
    sample = np.concatenate(
        [p["W_uh"].ravel(), p["W_hy"].ravel()]
        + ([p["W_hh"].ravel()] if kind != "smart_tanh" else [])
    )
    assert abs(sample.std() / std - 1) < 0.05, f"{kind}: sd {sample.std():.4g}, want {std}"
    if kind == "smart_tanh":
        assert ((p["W_hh"] != 0).sum(axis=1) == 15).all(), (
            "not 15 non-zero incoming weights per unit"
        )
        rho = np.max(np.abs(np.linalg.eigvals(p["W_hh"])))
        assert abs(rho - 0.95) < 1e-12, (
            f"spectral radius {rho}"
        )  # one eigvals call on 50 x 50: ~1e-14


@given(w=st.floats(-10, 15), b=st.floats(-10, 5))
def test_fixed_points_solve_the_map_with_the_right_stability(w, b):
    pts = fixed_points(w, b)
    assert 1 <= len(pts) <= 3
    for x, stable in pts:
        s = 1 / (1 + np.exp(-x))
        assert abs(x - (w * s + b)) < 1e-9 * (1 + abs(x)), (
            f"x* = {x} is not a fixed point"
        )  # bisection to 2^-80
        assert stable == (abs(w * s * (1 - s)) < 1)


def test_two_attractors_exactly_inside_the_fold_wedge():
    fw, fb = fold_curve()
    for w in (5.0, 8.0):
        upper = np.interp(w, *_branch(fw, fb, upper=True))
        lower = np.interp(w, *_branch(fw, fb, upper=False))
        assert lower < upper
        assert sum(s for _, s in fixed_points(w, (lower + upper) / 2)) == 2, (
            "inside the wedge: two attractors"
        )
        assert sum(s for _, s in fixed_points(w, upper + 0.05)) == 1
        assert sum(s for _, s in fixed_points(w, lower - 0.05)) == 1


def _branch(fw, fb, *, upper):
    """The fold curve's two branches (s > 1/2 gives the lower b), each sorted by w."""
    half = len(fw) // 2
    w, b = (fw[:half], fb[:half]) if upper else (fw[half:], fb[half:])
    order = np.argsort(w)
    return w[order], b[order]


def test_on_the_basin_boundary_x0_is_the_unstable_fixed_point():
    for w in (5.0, 9.0):
        b = float(basin_boundary(0.5, np.array(w)))
        unstable = [x for x, s in fixed_points(w, b) if not s]
        assert unstable and abs(unstable[0] - 0.5) < 1e-9, fixed_points(w, b)


def test_wilson_interval_contains_the_rate_and_shrinks_with_n():
    for k, n in ((0, 5), (5, 5), (2, 5), (20, 50)):
        lo, hi = wilson_interval(k, n)
        assert 0 <= lo <= k / n <= hi <= 1
    assert np.diff(wilson_interval(2, 5)) > np.diff(wilson_interval(20, 50))
