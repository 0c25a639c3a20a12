"""The exact oracle: sums of squares of floating-point numbers as exact rationals.

Every float of every dtype the kit draws (float16, bfloat16, float32, float64) is a
float64 exactly, and a float64 is m * 2**e with integer m and e. Their squares and the
sum of the squares are then an exact integer times a power of two, so "is the clipped
norm at most tau?" is answered exactly, with no rounding at all (`norm_at_most`), and
the norm itself is given correctly rounded to float64 (`exact_norm`). Python integers
have no overflow, so entries near float64's maximum and subnormals are exact too.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np


def _integer_parts(x: float) -> tuple[int, int]:
    """x = m * 2**e with integer m (53 bits at most)."""
    mantissa, exponent = math.frexp(x)
    return int(math.ldexp(mantissa, 53)), exponent - 53


def sum_of_squares(arrays) -> Fraction:
    """The exact sum of squares of every entry of `arrays` (any float dtype; NaN/inf refused)."""
    terms = []
    for a in arrays:
        values = np.asarray(a, np.float64).ravel()
        if not np.all(np.isfinite(values)):
            raise ValueError("the exact oracle takes finite entries only")
        unique, counts = np.unique(
            np.abs(values[values != 0]), return_counts=True
        )  # tiled leaves repeat values
        for v, c in zip(unique.tolist(), counts.tolist()):
            m, e = _integer_parts(v)
            terms.append((c * m * m, 2 * e))
    if not terms:
        return Fraction(0)
    low = min(e for _, e in terms)
    total = sum(s << (e - low) for s, e in terms)
    return Fraction(total) * Fraction(2) ** low


def exact_norm(arrays) -> float:
    """The 2-norm, rounded once (to nearest) into float64; inf beyond float64's range."""
    s = sum_of_squares(arrays)
    if s == 0:
        return 0.0
    # sqrt(p / q) with q a power of two: scale to an integer with 128 more bits than needed,
    # take the integer square root (exact floor), and let int -> float round it.
    p, q = s.numerator, s.denominator
    shift = 256 - (p.bit_length() - q.bit_length())
    shift += shift % 2  # an even power of two, so its square root is exact
    scaled = p << shift if shift >= 0 else p >> -shift
    root = math.isqrt(scaled // q)  # about 128 bits; int -> float rounds it once more
    try:
        return math.ldexp(float(root), -(shift // 2))
    except OverflowError:
        return math.inf


def norm_at_most(arrays, bound: Fraction | float) -> bool:
    """Whether the exact 2-norm of `arrays` is <= `bound` (compared as squares, exactly)."""
    bound = Fraction(bound)
    return bound >= 0 and sum_of_squares(arrays) <= bound * bound


def round_up(x: float, dtype_bits: int) -> float:
    """The smallest float with `dtype_bits` significant bits that is >= x > 0 (normal range)."""
    mantissa, exponent = math.frexp(x)
    scaled = math.ldexp(mantissa, dtype_bits)
    return math.ldexp(math.ceil(scaled), exponent - dtype_bits)
