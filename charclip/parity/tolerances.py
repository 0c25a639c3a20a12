"""The parity ladder's tolerances and error metrics: one table, each bound with its reason.

Errors are measured relative to the largest magnitude in the compared array
(`max|a - b| / max(|a|, |b|)`), so entries that happen to be near zero do not
turn rounding into huge relative errors. docs/parity.md explains the tolerances.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from charclip import witness  # the float64 reference with the hand-written backward
from charclip.clipspec import TORCH_EPS  # torch scales by tau / (norm + 1e-6); optax by tau / norm


@dataclass(frozen=True)
class Tolerance:
    rel: float  # bound on max|a - b| / max(|a|, |b|)
    reason: str  # one line: why this bound


# Float64 rounding is 1.1e-16; a step of these small models is at most ~1e4 dependent
# operations, so even a linear growth of rounding stays below 1e-11.
# Float32 rounding is 6e-8; its bounds sit about ten times above the errors measured
# over all cells, depths and the Hypothesis-drawn shapes (docs/parity.md).
TOLERANCES: dict[str, dict[str, Tolerance]] = {
    "float64": {
        "forward": Tolerance(
            1e-10,
            "float64 (1.1e-16) rounding over a forward pass of matmuls (T steps x L layers for the RNN): ~1e-14 expected",
        ),
        "loss": Tolerance(1e-10, "float64: a mean of B*T log-softmaxes, ~1e-15 expected"),
        "grad": Tolerance(
            1e-10, "float64: backpropagation (BPTT through T steps for the RNN), ~1e-14 expected"
        ),
        "norm": Tolerance(1e-10, "float64: one sum of squares over all gradients, ~1e-15 expected"),
        "clipped": Tolerance(
            1e-10, "float64: gradient times one scalar; same convention on both sides"
        ),
        "adam": Tolerance(
            1e-10, "float64: elementwise Adam formula, ~1e-14 after cancellation in p_new - p"
        ),
        "sgd_step": Tolerance(
            1e-10, "float64: parameters after p - lr * g, one multiply-add on a gradient ~1e-15 off"
        ),
        "sgd_trajectory": Tolerance(
            1e-10, "float64: rounding fed back through K plain SGD steps, which do not amplify it"
        ),
        "trajectory": Tolerance(
            1e-10, "float64: rounding fed back through 50+ Adam steps; 1e-15 to 6e-13 measured"
        ),
    },
    "float32": {
        "forward": Tolerance(
            1e-5,
            "float32 (6e-8) rounding over T recurrent steps of H-term dot products; ~1e-7 measured",
        ),
        "loss": Tolerance(
            1e-5, "float32: log-softmax of float32 logits averaged over B*T; ~1e-7 measured"
        ),
        "grad": Tolerance(1e-5, "float32: BPTT sums T*B outer products per weight; ~1e-6 measured"),
        "norm": Tolerance(
            1e-6, "float32: one sum of squares of gradients each ~1e-7 off; ~1e-7 measured"
        ),
        "clipped": Tolerance(1e-5, "float32: the gradient's error and one scalar multiply more"),
        "adam": Tolerance(
            1e-4, "float32: p_new - p cancels ~2 digits of a weight moving by lr; ~3e-6 measured"
        ),
        "sgd_step": Tolerance(
            1e-5,
            "float32: parameters after p - lr * g, relative to max|p|: one rounding plus lr x grad error",
        ),
        "sgd_trajectory": Tolerance(
            1e-5,
            "float32: K plain SGD steps add rounding linearly; ~6e-7 measured over 8 steps of an MLP",
        ),
        "trajectory": Tolerance(
            1e-3,
            "float32: Adam's step g/(|g|+eps) turns rounding of g near eps into ~lr*1e-2; ~2e-4 measured",
        ),
    },
}


# Mixed precision (--precision bf16 / fp16). Each backend rounds every intermediate of the
# cell to the compute dtype, so per element a result carries n roundings, each uniform
# on +-u: a standard deviation of u * sqrt(n / 3). Two backends round independently (their
# float32 accumulations and transcendentals differ in the last float32 bits, which flips
# low-precision roundings), so their difference has sqrt(2) times that. The bound is six
# of those standard deviations. n is counted from charclip.jax.fastrnn's step code, forward and
# backward of one time step: earlier steps' errors shrink through the recurrence (its
# Jacobian's norm is below 1 at these weights), so they add little to the count.
UNIT_ROUNDOFF = {
    "bf16": 2.0**-8,
    "fp16": 2.0**-11,
}  # half an ulp of 1: bfloat16 keeps 8 significant bits, float16 11
CELL_ROUNDINGS = {
    "rnn": 10,
    "lstm": 19,
    "gru": 22,
}  # roundings along one step's forward (4, 9, 11) and backward pass
SIGMAS = 6.0


def low_precision_bound(precision: str, cell: str) -> float:
    """Six standard deviations of the rounding difference between two backends (see above)."""
    return SIGMAS * UNIT_ROUNDOFF[precision] * math.sqrt(2 * CELL_ROUNDINGS[cell] / 3)


def tolerances_for(
    dtype: str, precision: str = "full", cell: str = "lstm", positions: int = 1
) -> dict[str, Tolerance]:
    """The ladder's table for a run: by dtype in full precision; derived from the unit roundoff otherwise.

    `positions` (B * T): the loss averages that many positions' independent roundings, so its
    bound shrinks by sqrt(positions) (the weights' own rounding is identical in both backends).
    """
    if precision == "full":
        return TOLERANCES[dtype]
    u, n = UNIT_ROUNDOFF[precision], CELL_ROUNDINGS[cell]
    b = low_precision_bound(precision, cell)
    why = f"{precision}: 6 sigma of two backends' independent roundings, u = 2^{int(math.log2(u))}, {n} per {cell} step"
    f32 = TOLERANCES["float32"]
    return {
        "forward": Tolerance(b, why),
        "loss": Tolerance(
            b / math.sqrt(positions),
            why + f"; / sqrt({positions}): a mean over independent positions",
        ),
        "grad": Tolerance(b, why),
        "norm": Tolerance(b, why + "; the norm itself in float32"),
        "clipped": Tolerance(b + f32["clipped"].rel, why + "; + float32 clipping"),
        # Adam's step g / (sqrt(v) + eps) is insensitive to g's scale: a relative error of g passes through.
        "adam": Tolerance(b + f32["adam"].rel, why + "; Adam passes g's relative error through"),
        "sgd_step": Tolerance(b, why),
        "sgd_trajectory": Tolerance(b, why),
        # Over a trajectory each step's gradient error moves the weights by up to lr * b; the
        # loss and weights drift by the sum, bounded here per step (the ladder multiplies by steps).
        "trajectory": Tolerance(b, why + "; per step of the trajectory"),
    }


@dataclass
class Row:
    """One line of the parity table."""

    quantity: str
    max_abs: float
    max_rel: float
    tol: float
    reason: str
    ok: bool


def errors(a, b) -> tuple[float, float]:
    """(max |a - b|, max |a - b| / max(|a|, |b|)) in float64; non-finite or mismatched shapes give inf."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return math.inf, math.inf
    if a.size == 0:
        return 0.0, 0.0
    diff = float(np.max(np.abs(a - b)))
    scale = float(max(np.max(np.abs(a)), np.max(np.abs(b))))
    return diff, (diff / scale if scale > 0 else 0.0)


def compare(quantity: str, a, b, tol: Tolerance) -> Row:
    max_abs, max_rel = errors(a, b)
    return Row(quantity, max_abs, max_rel, tol.rel, tol.reason, bool(max_rel <= tol.rel))


def compare_group(quantity: str, a: dict, b: dict, tol: Tolerance) -> Row:
    """One row for a dict of arrays: the worst parameter's errors (each relative to its own scale)."""
    if a.keys() != b.keys():
        return Row(
            quantity,
            math.inf,
            math.inf,
            tol.rel,
            f"names differ: {sorted(a.keys() ^ b.keys())}",
            False,
        )
    errs = [errors(a[k], b[k]) for k in a]
    max_abs, max_rel = max(e[0] for e in errs), max(e[1] for e in errs)
    return Row(quantity, max_abs, max_rel, tol.rel, tol.reason, bool(max_rel <= tol.rel))


# Unit roundoff of the full-precision dtypes, for the bounds derived per draw below.
DTYPE_UNIT_ROUNDOFF = {"float32": 2.0**-24, "float64": 2.0**-53}


@dataclass(frozen=True)
class DrawBounds:
    """Relative rounding bounds of one vanilla-RNN draw's gradients, torch against JAX.

    From `charclip.witness.rounding_bound`, a first-order error bound e per gradient entry
    worked out from the draw's float64 values; each backend is within it, so their
    difference is within 2 e. Relative as the ladder measures: max e / max |g| per
    parameter, and 2 ||e|| / ||g|| for the global norm (||g_a|| - ||g_b|| <= ||g_a - g_b||).
    """

    grad: dict[str, float]
    norm: float

    @property
    def worst(self) -> float:
        return max(self.grad.values(), default=0.0)


def draw_bounds(params, x, y, h0, dtype: str) -> DrawBounds:
    u = DTYPE_UNIT_ROUNDOFF[dtype]
    _, g, _ = witness.loss_and_grads(params, x, y, h0)
    e = witness.rounding_bound(params, x, y, h0, u)
    rel = {k: _ratio(2 * float(np.max(e[k])), float(np.max(np.abs(g[k])))) for k in g}
    norm = _ratio(
        2 * math.sqrt(sum(float(np.sum(v**2)) for v in e.values())),
        math.sqrt(sum(float(np.sum(v**2)) for v in g.values())),
    )
    return DrawBounds(rel, norm)


def _ratio(error: float, scale: float) -> float:
    return error / scale if scale > 0 else 0.0


def at_least(
    tol: Tolerance, derived: float, source: str = "charclip.witness.rounding_bound"
) -> Tolerance:
    """`tol`, or the draw's derived bound where that is larger (a draw that amplifies rounding:
    cancellation, or torch's tanh' near saturation; see docs/divergences.md)."""
    if derived <= tol.rel:
        return tol
    return Tolerance(
        derived,
        f"{tol.reason}; this draw amplifies rounding: its first-order bound is {derived:.1e}"
        f" ({source})",
    )


HEAD = ("head.weight", "head.bias")


def _head_terms(logits, y) -> tuple[np.ndarray, np.ndarray]:
    """(p, d) in float64: p = softmax(z), d = p - onehot(y), each (B, T, V)."""
    z = np.asarray(logits, dtype=np.float64)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    d = p.copy()
    target = np.asarray(y)[..., None]
    np.put_along_axis(d, target, np.take_along_axis(d, target, axis=-1) - 1.0, axis=-1)
    return p, d


def head_cancellation(logits, y, head_weight) -> float:
    """How much the head's backward amplifies relative rounding error, for any cell.

    dL/dh_j = sum_v W_vj d_v at every position, with d = softmax(z) - onehot(y). Where the
    terms cancel (two rows of W nearly equal, a confident prediction), the few ulps of error
    in d become kappa = sum_v |W_vj d_v| / |sum_v W_vj d_v| times more, relative to dL/dh.
    Returns the largest kappa over positions and hidden units: at least 1, and inf where
    dL/dh is exactly 0 while its terms are not. A condition number, so the logits of a
    float32 run give it as well as exact ones would.
    """
    _, d = _head_terms(logits, y)
    w = np.asarray(head_weight, dtype=np.float64)  # (V, H)
    terms, total = np.abs(d) @ np.abs(w), np.abs(d @ w)  # (B, T, H) each
    with np.errstate(divide="ignore", invalid="ignore"):
        kappa = np.where(terms > 0, terms / total, 1.0)
    return float(max(1.0, np.max(kappa, initial=1.0)))


def head_bounds(kappa: float, logits, y, grads: dict, dtype: str) -> DrawBounds:
    """Bounds for the cells the witness does not cover (GRU, LSTM), from the head's values.

    Each backend's d = softmax(z) - onehot(y) carries p_v (V + 3) u from the softmax and
    u |d_v| from the subtraction (the witness's rule for d, with the logits' own error
    ordinary). Below the head: the head's sum makes that kappa times more relative to dL/dh,
    and every gradient there is linear in dL/dh, so 2 kappa (V + 4) u for the two backends.
    The head's own gradients sum d_v (times h_j, |h_j| <= 1 in all three cells) over the
    B T positions, where a confident prediction (p_y near 1) and terms of both signs cancel:
    e_v = sum (p_v (V + 4) u + 2 u |d_v|) + (B T - 1) u sum |d_v|, relative to the
    parameter's largest |gradient|, twice. Each is used where it exceeds the table's bound.
    """
    u = DTYPE_UNIT_ROUNDOFF[dtype]
    p, d = _head_terms(logits, y)
    positions, vocab = d.shape[0] * d.shape[1], d.shape[-1]
    below = 2 * kappa * (vocab + 4) * u
    per_position = (vocab + 4) * u * p + 2 * u * np.abs(d)
    e = per_position.sum(axis=(0, 1)) + (positions - 1) * u * np.abs(d).sum(axis=(0, 1))
    e = e / positions  # the loss is the mean over positions, as the gradients are
    own = {}
    for name in HEAD:
        scale = float(np.max(np.abs(np.asarray(grads[name], dtype=np.float64)), initial=0.0))
        extra = u if name == "head.weight" else 0.0  # the product d_v h_j, rounded once more
        own[name] = _ratio(2 * float(np.max(e + extra * np.abs(d).mean(axis=(0, 1)))), scale)
    rel = {k: own[k] if k in HEAD else below for k in grads}
    # The global norm moves by at most the norm of the entries' bounds (each rel times its
    # parameter's largest |gradient|): ||g_a|| - ||g_b|| <= ||g_a - g_b||.
    g = {k: np.abs(np.asarray(v, dtype=np.float64)) for k, v in grads.items()}
    errs = sum(v.size * (rel[k] * float(np.max(v, initial=0.0))) ** 2 for k, v in g.items())
    norm = _ratio(math.sqrt(errs), math.sqrt(sum(float(np.sum(v**2)) for v in g.values())))
    return DrawBounds(rel, norm)


def library_gap(clip_impl: str, max_norm: float) -> float:
    """How far the two libraries' norm clipping differ by design (relative), at threshold `max_norm`.

    On a clipped step torch's gradient is optax's times norm / (norm + 1e-6), so
    they differ by 1e-6 / (norm + 1e-6) < 1e-6 / tau. charclip's reference
    implementations use one convention on both sides: no gap.
    """
    return TORCH_EPS / max_norm if clip_impl == "library" else 0.0


def adam_gap(gap: float, clipped: dict, update: dict, adam: dict, train) -> float:
    """The libraries' clipping gap as it reaches Adam's update (relative, per parameter).

    torch's clipped g is optax's times 1 - delta (delta <= `gap`), the same factor for every
    entry. To first order that moves m = b1 m0 + (1 - b1) g by (1 - b1) g delta and v by
    2 (1 - b2) g^2 delta, so an update U = lr m^ / (sqrt(v^) + eps) by at most
    delta (lr (1 - b1) |g| / (c1 (sqrt(v^) + eps)) + |U| (1 - b2) g^2 / v). Where the warm m0
    and the new term nearly cancel, that is more than delta |U|: relative to max |U| it can
    exceed delta, so the gap is scaled by the largest such ratio (never below 1, the factor
    for an update proportional to g).
    """
    if gap == 0:
        return 0.0
    b1, b2 = train.beta1, train.beta2
    step = int(adam["step"]) + 1
    c1, c2 = 1 - b1**step, 1 - b2**step
    worst = 1.0
    for name, g in clipped.items():
        g = np.asarray(g, dtype=np.float64)
        v = b2 * np.asarray(adam[f"exp_avg_sq.{name}"], dtype=np.float64) + (1 - b2) * g**2
        u = np.abs(np.asarray(update[name], dtype=np.float64))
        through_m = train.lr * (1 - b1) * np.abs(g) / (c1 * (np.sqrt(v / c2) + train.eps))
        with np.errstate(divide="ignore", invalid="ignore"):
            through_v = np.where(v > 0, u * (1 - b2) * g**2 / v, 0.0)
        scale = float(np.max(u, initial=0.0))
        if scale > 0:
            worst = max(worst, float(np.max(through_m + through_v)) / scale)
    return gap * worst


def update_rounding(params: dict, update: dict, dtype: str) -> float:
    """How far two correct backends' Adam updates p_new - p may differ from p_new's rounding alone.

    Each backend rounds p_new into the dtype (u |p_new|); p_new - p is then exact (Sterbenz),
    so the difference carries both roundings, 2 u max|p_new|, relative to the parameter's
    largest |p_new - p|: large where the update is small against the weight.
    """
    u = DTYPE_UNIT_ROUNDOFF.get(dtype, 0.0)
    worst = 0.0
    for name, step in update.items():
        step = np.asarray(step, dtype=np.float64)
        new = np.asarray(params[name], dtype=np.float64) + step
        scale = float(np.max(np.abs(step), initial=0.0))
        worst = max(worst, _ratio(2 * u * float(np.max(np.abs(new), initial=0.0)), scale))
    return worst


def widen(tol: Tolerance, gap: float, what: str = "") -> Tolerance:
    if gap == 0:
        return tol
    return Tolerance(tol.rel + gap, f"{tol.reason}; + torch's 1e-6 norm epsilon{what}: {gap:.1e}")
