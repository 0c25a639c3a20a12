"""Pascanu, Mikolov and Bengio (2013), *On the difficulty of training recurrent neural networks*
(ICML 2013, arXiv 1211.5063), rerun in both backends: `charclip explode --paper`.

Three pieces, each cited to the paper's section and figure (docs/paper-rerun.md):

1. The cliff (section 2.3, Fig. 6): the one-unit network x_t = w sigmoid(x_{t-1}) + b with no
   input, x_0 = 0.5, error E_50 = (sigmoid(x_50) - 0.7)^2; the error surface over (w, b) and
   gradient-descent paths with and without the norm rescaling of Algorithm 1 (section 3.2),
   the threshold set from the average gradient norm as section 3.2 advises.
2. The bifurcation view (section 2.2, Fig. 3): the fixed points of x -> w sigmoid(x) + b, the
   fold curves in the (w, b) plane where two of them are born or die, and the boundary
   between the two basins of attraction that x_0 crosses, drawn over the cliff.
3. The temporal-order task (section 4.1.1, Fig. 7): MSGD against MSGD-C at several sequence
   lengths, success rate over seeds with the paper's criterion.

Framework-neutral: the backends compute (through `charclip.backends`); the data, the
initial weights and the seeds come from one NumPy generator here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from charclip.run import diverged as _diverged

# ---------------------------------------------------------------- the temporal-order task

N_SYMBOLS = 6  # A, B and the four distractors c, d, e, f (section 4.1.1; the authors' tempOrder.py)
N_CLASSES = 4  # AA, AB, BA, BB


def temporal_order_batch(
    rng: np.random.Generator, batch: int, length: int
) -> tuple[np.ndarray, np.ndarray]:
    """`batch` sequences of the temporal-order task: symbols x (batch, length) int64 and classes y (batch,).

    Section 4.1.1: a stream of symbols, one of {A, B} near the beginning and one near the middle;
    the class is their order (AA, AB, BA, BB). The positions are those of the authors' code
    (github.com/pascanur/trainingRNNs, tempOrder.py): the first in [L/10, 2L/10), the second in
    [5L/10, 6L/10), each uniform; A = 0, B = 1; every other position uniform over the distractors
    2..5; class = first + 2 * second.
    """
    if length < 10:
        raise ValueError(
            f"the temporal-order task needs a length of 10 or more (positions at L/10), got {length}"
        )
    span = length // 10
    p0 = rng.integers(span, 2 * span, size=batch)
    p1 = rng.integers(5 * span, 6 * span, size=batch)
    v0, v1 = rng.integers(0, 2, size=(2, batch))
    x = rng.integers(2, N_SYMBOLS, size=(batch, length))
    rows = np.arange(batch)
    x[rows, p0] = v0
    x[rows, p1] = v1
    return x, v0 + 2 * v1


INITS = ("sigmoid", "basic_tanh", "smart_tanh")


def temporal_order_init(kind: str, hidden: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The paper's three initialisations (section 4.1.1), float64; biases zero in all three.

    "sigmoid": sigmoid units, W_rec, W_in, W_out ~ N(0, 0.01); "basic_tanh": tanh units, N(0, 0.1);
    "smart_tanh": tanh, W_in, W_out ~ N(0, 0.01), W_rec sparse (15 non-zero incoming connections per
    unit) rescaled to spectral radius 0.95. 0.01 and 0.1 are standard deviations, as in the authors'
    code (`rng.normal(scale=...)`). Layout: h_t = act(h_{t-1} W_hh + W_uh[x_t] + b_hh), y = h_T W_hy + b_hy.
    """
    if kind not in INITS:
        raise ValueError(f"unknown initialisation {kind!r}; use one of {', '.join(INITS)}")
    std = 0.1 if kind == "basic_tanh" else 0.01
    p = {
        "W_uh": rng.normal(0.0, std, (N_SYMBOLS, hidden)),
        "W_hh": rng.normal(0.0, std, (hidden, hidden)),
        "W_hy": rng.normal(0.0, std, (hidden, N_CLASSES)),
    }
    if kind == "smart_tanh":
        w = p["W_hh"]
        for i in range(
            hidden
        ):  # keep 15 entries of each row (the authors' code: W_hh[i][perm[15:]] = 0)
            w[i, rng.permutation(hidden)[15:]] = 0.0
        p["W_hh"] = w * (0.95 / np.max(np.abs(np.linalg.eigvals(w))))
    p["b_hh"] = np.zeros(hidden)
    p["b_hy"] = np.zeros(N_CLASSES)
    return p


def activation_of(kind: str) -> str:
    return "sigmoid" if kind == "sigmoid" else "tanh"


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class PaperSettings:
    """Sizes of `charclip explode --paper`; FULL is the documented run, SMALL the notebook's and the tests'.

    Cliff (section 2.3): x_0 = 0.5, 50 steps, target 0.7 are the paper's; the grid, the starting
    points, the learning rate and the number of updates are ours (Fig. 6 is a sketch without them).
    Temporal order (section 4.1.1): 50 hidden units, batches of 20, lr 0.01, no momentum,
    threshold 1, success = under 1% wrong on 10000 fresh sequences are the paper's (it ran 5 seeds, we 10);
    lengths, the update cap and the second, larger learning rate are the scaling (docs/paper-rerun.md).
    """

    x0: float = 0.5
    steps: int = 50
    target: float = 0.7
    w_range: tuple[float, float] = (0.0, 12.0)
    b_range: tuple[float, float] = (-10.0, 2.0)
    grid: int = 241
    starts: tuple[tuple[float, float], ...] = ((6.0, -2.5), (8.0, -4.0))
    path_lr: float = 2.0
    path_updates: int = 60
    init: str = "basic_tanh"
    hidden: int = 50
    batch: int = 20
    lengths: tuple[int, ...] = (10, 20, 30)
    lrs: tuple[float, ...] = (0.01, 0.3)
    threshold: float = 1.0
    seeds: tuple[int, ...] = tuple(range(10))  # the paper ran 5 per point; 10 narrow the intervals
    max_updates: int = 3000
    check_every: int = 500
    test_size: int = 10000
    success_error: float = 0.01
    agreement_updates: int = (
        20  # updates each backend runs from the same start, for the torch/JAX comparison
    )


FULL = PaperSettings()
SMALL = PaperSettings(
    grid=61,
    path_updates=30,
    lengths=(10,),
    lrs=(0.3,),
    seeds=(0, 1),
    max_updates=1000,
    test_size=2000,
    agreement_updates=5,
)


# ---------------------------------------------------------------- 1. the cliff


def average_norm_threshold(norms) -> float:
    """Section 3.2: "look at statistics on the average norm over a sufficiently large number of updates".
    The threshold is the mean gradient norm of the unclipped run from the same start."""
    return float(np.mean(norms))


def cliff(s: PaperSettings, backends: tuple[str, ...], bar=None) -> dict:
    """The error surface over (w, b) and, from each start, the unclipped path and the path rescaled to the
    average-norm threshold, in every backend; the largest torch/JAX differences."""
    from charclip.backends import module as backend_module

    ws = np.linspace(*s.w_range, s.grid)
    bs = np.linspace(*s.b_range, s.grid)
    W, B = np.meshgrid(ws, bs)  # (len(b), len(w))
    kw = {"x0": s.x0, "steps": s.steps, "target": s.target}
    surfaces, paths = {}, []
    for name in backends:
        surfaces[name] = backend_module(name, "explode").one_unit_loss_grad(W, B, **kw)
        _tick(bar)
    for w0, b0 in s.starts:
        entry = {"start": (w0, b0), "backends": {}}
        for name in backends:
            m = backend_module(name, "explode")
            plain, plain_norms = m.one_unit_path(
                w0, b0, lr=s.path_lr, updates=s.path_updates, threshold=None, **kw
            )
            tau = average_norm_threshold(plain_norms)
            clipped, clipped_norms = m.one_unit_path(
                w0, b0, lr=s.path_lr, updates=s.path_updates, threshold=tau, **kw
            )
            entry["backends"][name] = {
                "threshold": tau,
                "plain": plain,
                "plain_norms": plain_norms,
                "clipped": clipped,
                "clipped_norms": clipped_norms,
            }
            _tick(bar)
        paths.append(entry)
    first = backends[0]
    agreement = None
    if len(backends) == 2:
        a, b = backends
        agreement = {
            "surface_rel": max(_rel(x, y) for x, y in zip(surfaces[a], surfaces[b])),
            "paths_abs": max(
                float(np.max(np.abs(p["backends"][a][k] - p["backends"][b][k])))
                for p in paths
                for k in ("plain", "clipped")
            ),
        }
    for p in paths:
        r = p["backends"][first]
        for k in ("plain", "clipped"):
            e = surfaces_at(first, r[k], kw)
            r[f"{k}_error"] = e
            r[f"{k}_longest_step"] = float(np.max(np.linalg.norm(np.diff(r[k], axis=0), axis=1)))
    return {
        "w": ws,
        "b": bs,
        "error": surfaces[first][0],
        "grad_norm": np.hypot(*surfaces[first][1:]),
        "paths": paths,
        "agreement": agreement,
        "backend": first,
        **kw,
        "lr": s.path_lr,
    }


def surfaces_at(backend: str, points: np.ndarray, kw: dict) -> np.ndarray:
    from charclip.backends import module as backend_module

    return backend_module(backend, "explode").one_unit_loss_grad(points[:, 0], points[:, 1], **kw)[
        0
    ]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a - b| / max(|a|, |b|, tiny) entry by entry."""
    return float(
        np.max(np.abs(a - b) / np.maximum(np.maximum(np.abs(a), np.abs(b)), np.finfo(float).tiny))
    )


# ---------------------------------------------------------------- 2. the bifurcation view


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def fixed_points(w: float, b: float) -> list[tuple[float, bool]]:
    """The fixed points x* = w sigmoid(x*) + b of the one-unit map, each with its stability
    (|w sigmoid'(x*)| < 1), found as the sign changes of x - w sigmoid(x) - b refined by bisection."""
    lo, hi = min(b, b + w) - 1.0, max(b, b + w) + 1.0  # every fixed point lies between b and b + w
    xs = np.linspace(lo, hi, 4001)
    f = xs - w * _sigmoid(xs) - b
    found = []
    for i in np.flatnonzero(np.sign(f[:-1]) * np.sign(f[1:]) <= 0):
        a, c = xs[i], xs[i + 1]
        for _ in range(80):
            m = 0.5 * (a + c)
            if (m - w * _sigmoid(m) - b) * (a - w * _sigmoid(a) - b) <= 0:
                c = m
            else:
                a = m
        x = 0.5 * (a + c)
        if not found or abs(x - found[-1][0]) > 1e-9:
            s = _sigmoid(x)
            found.append((float(x), bool(abs(w * s * (1 - s)) < 1)))
    return found


def fold_curve(n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """The saddle-node (fold) bifurcations in the (w, b) plane, w > 4: where a fixed point has
    w sigmoid'(x) = 1, two fixed points meet and vanish. With s = sigmoid(x) in (0, 1):
    w = 1 / (s (1 - s)), b = x - w s. Inside the wedge the map has two attractors (Fig. 3's rich regime)."""
    s = np.linspace(1e-3, 1 - 1e-3, n)
    w = 1.0 / (s * (1.0 - s))
    return w, np.log(s / (1.0 - s)) - w * s


def basin_boundary(x0: float, w: np.ndarray) -> np.ndarray:
    """The b at which x0 itself is the unstable fixed point: b = x0 - w sigmoid(x0). For w above
    1 / sigmoid'(x0), inside the wedge, crossing this line moves x0 from one basin to the other
    (section 2.2's boundary crossing): x_50 jumps between the attractors, which is the wall."""
    return x0 - w * _sigmoid(x0)


def bifurcation(s: PaperSettings) -> dict:
    """Fig. 3 (w = 5, b varied) as the paper draws it, and the fold curves and basin boundary in (w, b)."""
    bs = np.linspace(-4.0, -1.0, 301)
    stable, unstable = [], []
    for b in bs:
        for x, ok in fixed_points(5.0, float(b)):
            (stable if ok else unstable).append((float(b), x))
    fw, fb = fold_curve()
    ws = np.linspace(1.0 / (_sigmoid(s.x0) * (1 - _sigmoid(s.x0))), s.w_range[1], 100)
    return {
        "w_fig3": 5.0,
        "stable": stable,
        "unstable": unstable,
        "fold_w": fw,
        "fold_b": fb,
        "boundary_w": ws,
        "boundary_b": basin_boundary(s.x0, ws),
    }


# ---------------------------------------------------------------- 3. the temporal-order task


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a success rate of successes / n."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, centre - half), min(1.0, centre + half))


def temporal_order_run(
    backend: str, s: PaperSettings, length: int, lr: float, clip: bool, seed: int, bar=None
) -> dict:
    """One run: init and data from np.random.default_rng(seed); up to s.max_updates updates of MSGD
    (clip False) or MSGD-C (threshold s.threshold), checked every s.check_every updates on s.test_size
    fresh sequences; solved when under s.success_error of them are wrong (section 4.1.1)."""
    from charclip.backends import module as backend_module

    m = backend_module(backend, "explode")
    rng = np.random.default_rng(seed)
    params = temporal_order_init(s.init, s.hidden, rng)
    act = activation_of(s.init)
    test_x, test_y = temporal_order_batch(rng, s.test_size, length)
    losses, norms, checks = [], [], []
    solved_at = None
    done = 0
    while done < s.max_updates:
        xs, ys = zip(*(temporal_order_batch(rng, s.batch, length) for _ in range(s.check_every)))
        params, loss, norm = m.temporal_order_updates(
            params,
            np.stack(xs),
            np.stack(ys),
            lr=lr,
            threshold=s.threshold if clip else None,
            activation=act,
        )
        done += s.check_every
        losses.extend(loss.tolist())
        norms.extend(norm.tolist())
        finite = all(np.isfinite(v).all() for v in params.values())
        wrong = (
            m.temporal_order_errors(params, test_x, test_y, activation=act)
            if finite
            else s.test_size
        )
        checks.append((done, wrong / s.test_size))
        _tick(bar, s.check_every)
        if wrong < s.success_error * s.test_size:
            solved_at = done
            break
        if not finite:
            break
    arr = np.asarray(losses)
    diverged = _diverged(arr)
    return {
        "backend": backend,
        "length": length,
        "lr": lr,
        "clip": clip,
        "seed": seed,
        "solved": solved_at is not None,
        "solved_at": solved_at,
        "final_error": checks[-1][1],
        "diverged": diverged,
        "max_loss": float(np.nanmax(arr)) if np.isfinite(arr).any() else math.nan,
        "max_norm": float(np.nanmax(norms)) if np.isfinite(norms).any() else math.nan,
        "mean_norm": float(np.nanmean(norms)),
        "loss": losses,
        "checks": checks,
    }


def temporal_order_agreement(
    s: PaperSettings, length: int, lr: float, clip: bool, seed: int = 0
) -> float:
    """Largest |difference| of parameters and losses after s.agreement_updates updates in torch and JAX."""
    from charclip.backends import module as backend_module

    rng = np.random.default_rng(seed)
    params = temporal_order_init(s.init, s.hidden, rng)
    xs, ys = zip(*(temporal_order_batch(rng, s.batch, length) for _ in range(s.agreement_updates)))
    out = [
        backend_module(b, "explode").temporal_order_updates(
            params,
            np.stack(xs),
            np.stack(ys),
            lr=lr,
            threshold=s.threshold if clip else None,
            activation=activation_of(s.init),
        )
        for b in ("torch", "jax")
    ]
    diff = max(float(np.max(np.abs(out[0][0][k] - out[1][0][k]))) for k in params)
    return max(diff, float(np.max(np.abs(out[0][1] - out[1][1]))))


def temporal_order(s: PaperSettings, backends: tuple[str, ...], bar=None) -> dict:
    """Every (length, lr, method, seed) in the first backend (JAX when both are given: the grid is run in one,
    for time); torch and JAX compared update by update on one seed of each cell when both are given."""
    grid_backend = "jax" if "jax" in backends else backends[0]
    runs = [
        temporal_order_run(grid_backend, s, L, lr, clip, seed, bar)
        for L in s.lengths
        for lr in s.lrs
        for clip in (False, True)
        for seed in s.seeds
    ]
    table = []
    for L in s.lengths:
        for lr in s.lrs:
            for clip in (False, True):
                rs = [r for r in runs if (r["length"], r["lr"], r["clip"]) == (L, lr, clip)]
                k = sum(r["solved"] for r in rs)
                table.append(
                    {
                        "length": L,
                        "lr": lr,
                        "clip": clip,
                        "solved": k,
                        "runs": len(rs),
                        "rate": k / len(rs),
                        "ci95": wilson_interval(k, len(rs)),
                        "diverged": sum(r["diverged"] for r in rs),
                        "median_updates": _median([r["solved_at"] for r in rs if r["solved"]]),
                    }
                )
    agreement = None
    if len(backends) == 2:
        agreement = max(
            temporal_order_agreement(s, L, lr, clip)
            for L in s.lengths
            for lr in s.lrs
            for clip in (False, True)
        )
        _tick(bar)
    return {"backend": grid_backend, "runs": runs, "table": table, "agreement": agreement}


def _median(xs):
    return float(np.median(xs)) if xs else None


def _tick(bar, n: int = 1) -> None:
    if bar is not None:
        bar.update(n)


def total_ticks(s: PaperSettings, backends: tuple[str, ...]) -> int:
    """Progress-bar units: cliff calls plus updates (a run that solves early jumps the bar at the end)."""
    grid_runs = len(s.lengths) * len(s.lrs) * 2 * len(s.seeds)
    return len(backends) * (1 + len(s.starts)) + grid_runs * s.max_updates + (len(backends) == 2)


def run_paper(s: PaperSettings, backends: tuple[str, ...], *, progress: bool = True) -> dict:
    """All three pieces; the dict `charclip.explode.paper_report.write_paper_report` writes out."""
    import platform
    import time

    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    with tqdm(
        total=total_ticks(s, backends), disable=not progress, desc="paper", unit="step"
    ) as bar:
        c = cliff(s, backends, bar)
        t = temporal_order(s, backends, bar)
        bar.update(bar.total - bar.n)
    return {
        "settings": s,
        "backends": backends,
        "cliff": c,
        "bifurcation": bifurcation(s),
        "temporal_order": t,
        "seconds": time.perf_counter() - t0,
        "machine": f"{platform.machine()}, {_cpus()} CPUs, "
        f"{platform.python_implementation()} {platform.python_version()}",
    }


def _cpus() -> int:
    import os

    return (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )
