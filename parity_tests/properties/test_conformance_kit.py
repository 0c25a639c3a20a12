"""The conformance kit (charclip.testing) checked: its controls, its report, its strategies.

A kit that calls everything correct proves nothing, so: a correct clipper keeps every
promise, each deliberately wrong clipper fails exactly the promises its mistake breaks,
and the kit finds the divergences docs/divergences.md lists by itself.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import hypothesis
import jax
import numpy as np
import pytest
import torch
from hypothesis import given

from charclip.testing import PROMISES, check_clipper, gradient_trees, sum_of_squares
from charclip.testing.check import clipper_for
from charclip.testing.command import DIVERGENCES
from charclip.testing.controls import CONTROLS, exact_clip
from charclip.testing.oracle import exact_norm, norm_at_most
from charclip.testing.promises import Case, Options
from charclip.testing.strategies import Gradient, dtype_name
from charclip.testing.targets import TARGETS

ROOT = Path(__file__).resolve().parents[2]
ALL = set(PROMISES)

# What each mistake breaks, and why (float64 gradients, where no rounding hides a mistake: in float32,
# rounding toward zero absorbs the wrong-side epsilon's excess 1e-6 / n for norms n above ~8).
BREAKS = {
    # Leaves above tau are each cut to tau: the whole is up to sqrt(k) tau, the leaves' factors differ,
    # and scaling changes which leaves are cut. Idempotent, order-free, identity below tau still hold.
    "per_tensor": {"norm_at_most_tau", "direction_kept", "scale_invariant", "overflow_safe"},
    # Entries cut to tau: the same four, for the same reasons.
    "value_clip": {"norm_at_most_tau", "direction_kept", "scale_invariant", "overflow_safe"},
    # n**2 for n: the reported norm is wrong, n <= tau < n**2 clips, tau / n**2 is not scale-free,
    # sqrt(tau) < n < 1 leaves ||g'|| = tau / n > tau, and near float64's maximum n**2 overflows and
    # the factor tau / inf zeroes the gradient.
    "missing_sqrt": {
        "norm_at_most_tau",
        "identity_below",
        "returns_true_norm",
        "scale_invariant",
        "overflow_safe",
    },
    # The other leaves keep their entries: longer than tau, turned, clipped again, leaf order matters,
    # tau = 0 leaves them non-zero.
    "first_leaf_only": {
        "norm_at_most_tau",
        "direction_kept",
        "idempotent",
        "order_invariant",
        "overflow_safe",
        "scale_invariant",
        "tau_zero",
    },
    # tau / (n - 1e-6): the clipped norm is tau n / (n - 1e-6) > tau, and the factor depends on n's scale;
    # min(1, .) keeps it idempotent.
    "epsilon_wrong_side": {"norm_at_most_tau", "scale_invariant"},
}
# Broken only on inputs a short search may miss, so allowed but not required: the missing square
# root exceeds tau only when sqrt(tau) < n < 1 (then tau / n > tau).
MAY_BREAK = {"missing_sqrt": {"norm_at_most_tau"}}


def test_a_correct_clipper_keeps_every_promise_in_every_dtype():
    report = check_clipper(exact_clip, max_examples=10, shrink_budget=0)
    assert report.ok, report.table()
    assert {(r.promise, r.dtype) for r in report.rows} == {
        (p, d) for p in PROMISES for d in ("float16", "bfloat16", "float32", "float64")
    }


@pytest.mark.parametrize("name", sorted(CONTROLS))
def test_each_wrong_clipper_fails_exactly_the_promises_it_breaks(name):
    report = check_clipper(CONTROLS[name], dtypes=("float64",), max_examples=25, shrink_budget=0)
    failed = {r.promise for r in report.rows if r.verdict == "fails"} - MAY_BREAK.get(name, set())
    expected = BREAKS[name] - MAY_BREAK.get(name, set())
    assert failed == expected, (
        f"{name}: fails {sorted(failed)}; expected {sorted(expected)}; "
        f"missed {sorted(expected - failed)}, unexpected {sorted(failed - expected)}"
    )


def test_a_failure_shrinks_to_a_small_counterexample():
    """Value clipping exceeds tau with two entries at least; shrinking finds a gradient of two."""
    report = check_clipper(
        CONTROLS["value_clip"],
        dtypes=("float64",),
        promises=["norm_at_most_tau"],
        max_examples=50,
        shrink_budget=200,
    )
    (row,) = report.rows
    assert row.verdict == "fails" and row.promise == "norm_at_most_tau" and row.dtype == "float64"
    assert "> tau" in row.message, row.message
    entries = (
        row.counterexample.split("(float64)")[0].count(",") + 1
    )  # "g = [[a, b]] (float64), ..."
    assert entries <= 3, f"not shrunk: {row.counterexample}"


def test_report_ok_ok_except_and_table():
    report = check_clipper(
        CONTROLS["epsilon_wrong_side"], dtypes=("float64",), max_examples=20, shrink_budget=0
    )
    assert not report.ok
    assert report.ok_except({"norm_at_most_tau", "scale_invariant"})
    assert not report.ok_except({"norm_at_most_tau"})
    assert report.ok_except({"norm_at_most_tau:float64", "scale_invariant"})
    with pytest.raises(ValueError, match="unknown promises"):
        report.ok_except({"norm_below_tau"})
    table = report.table()
    assert table.count("\n| ") == len(PROMISES) + 1, table  # header and one line per promise
    for row in report.rows:
        assert row.verdict in ("holds", "fails", "n/a")
        assert (row.verdict == "fails") == bool(row.counterexample), row


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(framework="tensorflow"), "framework must be one of"),
        (dict(dtypes=("float8",)), "dtype must be one of"),
        (dict(promises=("norm_below_tau",)), "unknown promises"),
        (dict(nonfinite="ignore"), "nonfinite must be one of"),
        (dict(ulps=-1), "ulps must be >= 0"),
    ],
)
def test_check_clipper_refuses_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_clipper(exact_clip, **kwargs)


def test_ulps_loosens_only_the_bound():
    """optax-style (g / n) * tau in float32 exceeds tau by an ulp: exact fails, 2 ulps pass."""

    def library_style(leaves, tau):
        n = math.sqrt(float(sum_of_squares(leaves)))
        if n < tau:
            return leaves
        return [((a / np.float32(n)) * np.float32(tau)).astype(a.dtype) for a in leaves]

    exact = check_clipper(
        library_style,
        dtypes=("float32",),
        promises=["norm_at_most_tau"],
        max_examples=100,
        shrink_budget=0,
    )
    loose = check_clipper(
        library_style,
        dtypes=("float32",),
        promises=["norm_at_most_tau"],
        max_examples=100,
        ulps=2,
        shrink_budget=0,
    )
    assert not exact.ok and loose.ok, (exact.table(), loose.table())


def test_direction_is_measured_when_the_factor_is_subnormal():
    """[9e307, 9e307] clipped to 0.5 has the factor c = 3.9e-309, a float64 subnormal with
    too few bits to measure 2 eps: the exact clipper keeps the direction there, and a result
    with one entry 4 eps off still breaks it."""
    case = Case(Gradient("float64", (np.full(2, 8.98846567431158e307),)), 0.5)
    direction = PROMISES["direction_kept"]
    direction.check(clipper_for(exact_clip, "numpy"), case, Options())

    def bent(leaves, tau):
        clipped, norm = exact_clip(leaves, tau)
        clipped[0][1] *= 1 + 4 * 2.0**-52
        return clipped, norm

    with pytest.raises(AssertionError, match="not one factor"):
        direction.check(clipper_for(bent, "numpy"), case, Options())


@pytest.mark.parametrize("framework", ("numpy", "torch", "jax"))
def test_gradient_trees_in_each_framework(framework):
    seen = []

    @hypothesis.settings(max_examples=15, database=None, deadline=None)
    @given(gradient_trees(framework=framework, dtypes=("bfloat16",)))
    def collect(tree):
        if framework == "torch":
            assert all(
                isinstance(p, torch.nn.Parameter) and p.grad.dtype == torch.bfloat16 for p in tree
            )
            seen.append(len(tree))
        else:
            leaves = jax.tree.leaves(tree) if framework == "jax" else tree
            assert leaves and all(dtype_name(a.dtype) == "bfloat16" for a in leaves), leaves
            if framework == "jax":
                assert all(isinstance(a, jax.Array) for a in leaves)
            seen.append(len(leaves))

    collect()
    assert seen and min(seen) >= 1 and max(seen) <= 4, seen


def test_nonfinite_policies_are_checked_as_declared():
    def skip(leaves, tau):
        if not all(np.all(np.isfinite(np.asarray(a, np.float64))) for a in leaves):
            return [np.zeros_like(a) for a in leaves], math.nan
        return exact_clip(leaves, tau)

    for policy, ok in (("skip", True), ("propagate", True), ("error", False)):
        report = check_clipper(
            skip,
            dtypes=("float32",),
            promises=["nonfinite_reported"],
            nonfinite=policy,
            max_examples=10,
            shrink_budget=0,
        )
        assert report.ok is ok, (policy, report.table())


@pytest.mark.parametrize("target", sorted({t for _, _, t, _, _ in DIVERGENCES}))
def test_the_kit_finds_the_documented_divergences(target):
    """Every divergence docs/divergences.md pins for this target, found by the kit on its own."""
    from charclip.testing.targets import run_target  # noqa: F401  (the same entry the CLI uses)

    cases = [(p, d) for _, _, t, p, d in DIVERGENCES if t == target]
    kwargs = TARGETS[target].make()
    missed = []
    for promise, dtype in cases:
        report = check_clipper(
            max_examples=25, shrink_budget=0, promises=[promise], dtypes=[dtype], **kwargs
        )
        (row,) = report.rows
        if (
            row.verdict != "fails"
            or row.message.startswith("raised")
            and promise != "nonfinite_reported"
        ):
            missed.append((promise, dtype, row.message))
    assert not missed, f"{target}: the kit did not find {missed}"


def test_conform_command_small_profile():
    """The front door on the cheapest target, and its one-line error."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    bad = subprocess.run(
        [sys.executable, "-m", "charclip", "conform", "--max-examples", "0"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert (
        bad.returncode == 2
        and bad.stderr.strip() == "charclip: error: --max-examples must be 1 or more, got 0"
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "charclip",
            "conform",
            "--target",
            "torch-loop",
            "--max-examples",
            "3",
            "--shrink-budget",
            "0",
            "--seed",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if x.startswith("| torch-loop |"))
    assert "bad_tau_refused" in out.stdout and line.count("|") == len(PROMISES) + 2, out.stdout


def test_the_exact_clipper_ends_on_a_subnormal_threshold():
    """With tau subnormal, c = tau / ||g|| is subnormal and c * (1 - 2**-50) rounds back to c:
    a fixed shrink step never ended (the draw below hung the suite); a doubling one does."""
    g = [
        np.array([2.22823491923209e181]),
        np.array([-1.8760439706833728e180, -6.1287423532014656e181, -4.591170880978641e179]),
    ]
    tau = 1.2132699368087e-311
    clipped, norm = exact_clip(g, tau)
    assert norm_at_most(clipped, tau), [a.tolist() for a in clipped]
    assert norm == exact_norm(g)


def test_a_divergence_the_table_missed_is_reported_by_its_focused_run():
    """`rediscovered`: yes from the table's run, else from the focused run, else NO; not run when
    the target did not run (or was skipped)."""
    from charclip.testing.command import DIVERGENCES, FOCUSED_EXAMPLES, rediscovered

    _, _, target, promise, dtype = next(d for d in DIVERGENCES if d[0] == "15")

    def report(verdict):
        return {
            "target": target,
            "rows": [{"promise": promise, "dtype": dtype, "verdict": verdict}],
        }

    def verdict(reports, focused=None):
        rows = rediscovered(reports, focused)
        return next(v for row, _, where, v in rows if row == "15")

    assert verdict([report("fails")]) == "yes"
    assert verdict([report("holds")]) == "NO"
    focused = {(target, promise, dtype): report("fails")}
    assert verdict([report("holds")], focused) == (
        f"yes, in a focused run ({FOCUSED_EXAMPLES} examples)"
    )
    assert verdict([report("holds")], {(target, promise, dtype): report("holds")}) == "NO"
    assert verdict([]) == "not run"
    assert verdict([{"target": target, "skipped": "not installed", "rows": []}]) == "not run"
