"""Deliberately wrong clippers (negative controls) and one right one, in NumPy.

Each is `fn(leaves, tau) -> (clipped, norm)` built on one correct clip, so that it
differs from it in the one mistake its name says. `EXPECTED_FAILURES` lists, for each,
the promises that mistake breaks; the suite checks that the kit reports exactly those
(parity_tests/properties/test_conformance_kit.py).

`exact_clip` is the correct one (the positive control): the norm from the exact oracle,
the factor applied in float64 to a power-of-two-scaled gradient (no overflow), each
entry rounded toward zero into its dtype, so every promise holds exactly.
"""

from __future__ import annotations

import math

import numpy as np

from charclip.clipspec import TORCH_EPS
from charclip.testing.oracle import exact_norm, norm_at_most
from charclip.testing.strategies import INFO, dtype_name


def _check_tau(tau: float) -> None:
    if not tau >= 0:
        raise ValueError(f"max_norm must be >= 0 (got {tau})")


def _toward_zero(x: np.ndarray, dtype) -> np.ndarray:
    """float64 values rounded into `dtype`, toward zero."""
    x = np.asarray(x, np.float64)
    y = x.astype(dtype)
    wide = y.astype(np.float64)
    over = np.abs(wide) > np.abs(x)
    if np.any(over):
        info = INFO[dtype_name(dtype)]
        exponent = np.floor(np.log2(np.abs(wide[over])))
        ulp = np.maximum(2.0 ** (exponent - info.bits + 1), info.smallest_subnormal)
        wide[over] -= np.sign(wide[over]) * ulp
        y = wide.astype(dtype)
    return np.asarray(y)


def _scaled(leaves) -> tuple[list[np.ndarray], int]:
    """The leaves in float64, times 2**-s so that the largest entry is near 1 (exact)."""
    wide = [np.asarray(a, np.float64) for a in leaves]
    biggest = max((float(np.max(np.abs(a), initial=0.0)) for a in wide), default=0.0)
    s = math.frexp(biggest)[1] if biggest > 0 else 0
    return [np.ldexp(a, -s) for a in wide], s


def _nonfinite(leaves) -> bool:
    return not all(np.all(np.isfinite(np.asarray(a, np.float64))) for a in leaves)


def _scale_by(leaves, tau: float, norm_of_scaled: float, scaled) -> list[np.ndarray]:
    """g * tau / ||g||, computed as (g 2**-s) * (tau / ||g 2**-s||), rounded toward zero."""
    c = tau / norm_of_scaled
    out = [_toward_zero(a * c, leaf.dtype) for a, leaf in zip(scaled, leaves)]
    # Rounding can leave the exact norm a hair above tau. Shrink c by a step that doubles each
    # time: a fixed 2**-50 step needed up to 2**39 exact norms when a float16 entry sat on its
    # grid (the result changes only when c * g_i crosses the next float16 below), and hung the
    # suite. Doubling ends within about 50 tries and shrinks at most twice as much as needed.
    step = 2.0**-52
    while not norm_at_most(out, tau):
        c *= 1 - step
        step = min(2 * step, 0.5)
        out = [_toward_zero(a * c, leaf.dtype) for a, leaf in zip(scaled, leaves)]
    return out


def exact_clip(leaves, tau):
    """Correct global-norm clipping: every promise holds."""
    _check_tau(tau)
    if _nonfinite(leaves):
        return [np.asarray(a) * np.nan for a in leaves], math.nan
    scaled, s = _scaled(leaves)
    n_scaled = exact_norm(scaled)
    try:
        norm = math.ldexp(n_scaled, s) if n_scaled else 0.0
    except OverflowError:  # the true norm is beyond float64
        norm = math.inf
    if norm_at_most(leaves, tau):
        return [np.array(a) for a in leaves], norm
    return _scale_by(leaves, tau, n_scaled, scaled), norm


def _exact_clip_each(leaves, tau):
    return [exact_clip([a], tau)[0][0] for a in leaves]


def per_tensor(leaves, tau):
    """Each leaf clipped by its own norm instead of the global norm."""
    _check_tau(tau)
    return _exact_clip_each(leaves, tau), exact_clip(leaves, tau)[1]


def value_clip(leaves, tau):
    """Value clipping (every entry into [-tau, tau]) sold as norm clipping."""
    _check_tau(tau)
    return [np.clip(a, -tau, tau).astype(a.dtype) for a in leaves], exact_clip(leaves, tau)[1]


def missing_sqrt(leaves, tau):
    """The sum of squares used as the norm."""
    _check_tau(tau)
    norm = exact_clip(leaves, tau)[1]
    squares = norm * norm
    if not squares > tau:  # also NaN: nothing to clip
        return [np.array(a) for a in leaves], squares
    c = tau / squares
    return [_toward_zero(np.asarray(a, np.float64) * c, a.dtype) for a in leaves], squares


def first_leaf_only(leaves, tau):
    """The right factor, applied to the first leaf only."""
    clipped, norm = exact_clip(leaves, tau)
    return [clipped[0], *[np.array(a) for a in leaves[1:]]], norm


def epsilon_wrong_side(leaves, tau):
    """torch's epsilon subtracted instead of added: g * min(1, tau / (n - 1e-6))."""
    _check_tau(tau)
    norm = exact_clip(leaves, tau)[1]
    if not norm > tau:
        return [np.array(a) for a in leaves], norm
    scaled, s = _scaled(leaves)  # g 2**-s: n may be beyond float64, n 2**-s is not
    keep = 2.0**s if s < 1024 else math.inf  # min(1, .) in units of the scaled gradient
    c = min(keep, tau / (exact_norm(scaled) - math.ldexp(TORCH_EPS, -s)))
    return [_toward_zero(a * c, leaf.dtype) for a, leaf in zip(scaled, leaves)], norm


CONTROLS = {
    f.__name__: f
    for f in (per_tensor, value_clip, missing_sqrt, first_leaf_only, epsilon_wrong_side)
}
