"""The rules both reference clipping implementations share, written once.

`charclip.torch.clipping` and `charclip.jax.clipping` implement the same algorithm in
their frameworks' idioms; the constants of the two conventions and the checks
of their arguments are framework-neutral, so they live here.
"""

from __future__ import annotations

import math

TORCH_EPS = 1e-6  # the epsilon PyTorch adds to the norm before dividing
LOW_PRECISION_MARGIN = 2.0**-24  # shrink for float16/bfloat16 results, far below their ulp
CONVENTIONS = ("optax", "torch")
NONFINITE_POLICIES = ("propagate", "skip", "error")


def check_threshold(name: str, value: float) -> float:
    value = float(value)
    if not value >= 0:  # NaN too; a comparison, not math.isnan, which torch.compile cannot trace
        raise ValueError(
            f"{name} must be >= 0 (got {value}); a negative threshold would flip the gradient's sign."
        )
    return value


def check_norm_type(norm_type: float, *, clipping: bool = True) -> float:
    """p as a float, as both backends accept it: p > 0 or inf, and p = 0 only to measure.

    torch accepts every p (its `vector_norm` takes any order). 0 < p < 1 is a quasi-norm,
    computed right by torch and by ours, and >= the 2-norm, so clipping by it bounds the
    step. p = 0 counts non-zero entries, which no scaling changes, so it cannot clip; p < 0
    measures the smallest entries and NaN nothing: both raise.
    """
    p = float(norm_type)
    if math.isnan(p) or p < 0 or (p == 0 and clipping):
        raise ValueError(
            f"norm_type must be > 0 or inf (got {norm_type}): below 0 it measures the smallest entries, "
            "and norm_type=0 counts non-zero entries, which no scaling changes, so neither can bound a gradient."
        )
    return p


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))} (got {value!r}).")
    return value
