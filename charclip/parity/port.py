"""Prove a port of your own model: a torch `nn.Module` against its JAX rewrite, with the first
diverging layer named.

    from charclip.parity import prove_port, tap

    report = prove_port(torch_model, jax_forward, batches, loss="cross_entropy",
                        optimizer="adamw", lr=1e-3, max_norm=1.0, dtype="float64")
    print(report.table())
    report.divergence   # None, or .phase ("forward" | "backward" | "step" | "trajectory"),
                        # .where (a submodule's or a parameter's name), .step, .error, .bound

- `torch_model`: any `nn.Module`; its `state_dict()` is the one set of weights both sides use,
  cast to `dtype`. In training mode with dropout active it is refused (random masks).
- `jax_forward`: a function `(params, x)` over a dict named like the state_dict (torch layouts:
  a Linear weight is (out, in)), or a Flax NNX module, or an Equinox module. A module's arrays
  are matched to torch names by path (Flax's `kernel`, `scale`, `embedding` standing for torch's
  `weight`, in Flax's layout) or by `mapping={jax_path: torch_name | (torch_name, layout) |
  function(params) -> array}`; the layout change is part of the differentiated function.
- `batches`: (x, y) NumPy pairs; the first is the localised one-step ladder, all of them the
  trajectory (one optimizer step per batch).

Phases, in order; the first row out of its bound is `report.divergence`:
forward (each tapped submodule in execution order, then the output and the loss), backward
(each parameter's gradient in reverse order of use, the global norm, the clipped gradients),
step (each parameter's first update), trajectory (parameters and loss after each step, against
a bound scaled by the measured growth of a one-ulp perturbation). Each bound is derived from the
dtype's unit roundoff u and the operation's size; the formula and its inputs are in the table
(docs/porting.md).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field

import numpy as np

from charclip.clipspec import TORCH_EPS
from charclip.errors import CharclipError
from charclip.parity.tolerances import errors

LOSSES = ("mse", "cross_entropy")
OPTIMIZERS = ("sgd", "adam", "adamw")
PHASES = ("forward", "backward", "step", "trajectory")
# Unit roundoff: half the gap between 1 and the next number (53, 24 and 8 significant bits).
UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "bfloat16": 2.0**-8}
# The safety factor of every bound: 2 (two sides round independently) x 8 (the constant of the
# worst-case sum bound |fl(sum) - sum| <= n u sum|x_i|, measured against max|out| rather than
# sum|x_i|, and the condition of the layers between a rounding and the compared output).
C = 16
ADAM_OPS = 12  # elementwise roundings in one Adam/AdamW update (moments, bias corrections, sqrt, divide, decay)
SGD_OPS = 4  # decay, momentum, Nesterov's look-ahead, the multiply by lr


@dataclass(frozen=True)
class Optimizer:
    """The optimizer both sides run: torch.optim's and optax's matched (docs/divergences.md)."""

    name: str = "sgd"
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise CharclipError(
                f"unknown optimizer {self.name!r}; use one of {', '.join(OPTIMIZERS)}"
            )
        if self.nesterov and not self.momentum > 0:
            raise CharclipError("optimizer: nesterov needs momentum > 0")
        if self.name != "sgd" and (self.momentum or self.nesterov):
            raise CharclipError(f"optimizer {self.name}: momentum and nesterov are SGD's options")
        if self.weight_decay < 0 or self.momentum < 0 or self.eps <= 0:
            raise CharclipError("optimizer: weight_decay and momentum must be >= 0 and eps > 0")

    def differences(self) -> list[str]:
        """Where torch.optim and optax compute the same update differently (docs/divergences.md)."""
        if self.name == "sgd":
            return (
                [
                    "SGD: torch starts the momentum buffer at the first gradient, optax's trace at 0 then adds "
                    "the gradient: the same numbers"
                ]
                if self.momentum
                else []
            )
        out = [
            "Adam: both add eps outside the square root (optax's eps_root = 0); torch divides by "
            "sqrt(v)/sqrt(1 - b2^t) + eps, optax by sqrt(v / (1 - b2^t)) + eps: a few ulp apart"
        ]
        if self.name == "adamw" and self.weight_decay:
            out.append(
                "AdamW: torch multiplies p by (1 - lr wd) before the step, optax adds wd p to the "
                "update then scales by lr: the same value, rounded in another order"
            )
        if self.name == "adam" and self.weight_decay:
            out.append(
                "Adam weight_decay: torch adds wd p to the gradient (L2); optax has it as "
                "add_decayed_weights before adam, which is what runs here"
            )
        return out


@dataclass
class PortRow:
    """One line of the port table: a phase, where in the model, the error and its derived bound."""

    phase: str
    where: str
    max_abs: float
    max_rel: float
    tol: float
    formula: str
    ok: bool

    @property
    def quantity(self) -> str:
        return f"{self.phase} {self.where}"


@dataclass(frozen=True)
class Divergence:
    """The first place the two sides part: phase, where (module or parameter), step, error, bound."""

    phase: str
    where: str
    step: int | None
    error: float
    bound: float
    formula: str
    note: str = ""

    def __str__(self) -> str:
        at = f" at step {self.step}" if self.step is not None else ""
        note = f"; {self.note}" if self.note else ""
        return (
            f"diverges in the {self.phase} phase at {self.where}{at}: relative error {self.error:.2e} > "
            f"bound {self.bound:.2e} ({self.formula}){note}"
        )


@dataclass
class Trajectory:
    """Per step: the torch-JAX gap, its bound, and the gap a one-ulp perturbation of torch's weights grows to."""

    gap: list[float]
    bound: list[float]
    perturbed: list[float]
    initial_perturbation: float
    per_step: float  # b1: the most one step adds to the weights' relative error (from the step rows' bounds)

    def amplification(self, k: int) -> float:
        """A_k: how much a one-ulp perturbation of the weights has grown after k steps (at least 1)."""
        return max(1.0, self.perturbed[k - 1] / self.initial_perturbation)

    def formula(self, k: int) -> str:
        return (
            f"b1·k·A_k, b1={self.per_step:.2g} (one step), k={k}, A_k={self.amplification(k):.3g} "
            f"(growth of a 1-ulp perturbation)"
        )

    def growth(self) -> tuple[float, float]:
        """Geometric mean growth per step of (the torch-JAX gap, the perturbed run's gap)."""

        def rate(v):
            v = [max(x, 1e-300) for x in v]
            return (v[-1] / v[0]) ** (1 / (len(v) - 1)) if len(v) > 1 else 1.0

        return rate(self.gap), rate(self.perturbed)


@dataclass
class PortReport:
    rows: list[PortRow]
    dtype: str
    notes: list[str] = field(default_factory=list)
    divergence: Divergence | None = None
    trajectory: Trajectory | None = None

    @property
    def ok(self) -> bool:
        return self.divergence is None

    @property
    def first_failure(self) -> PortRow | None:
        return next((r for r in self.rows if not r.ok), None)

    def table(self) -> str:
        """The divergence (or the verdict) on top, the notes, then one line per compared quantity."""

        def num(v: float) -> str:
            return "-" if math.isnan(v) else f"{v:.2e}"

        head = [
            str(self.divergence)
            if self.divergence
            else f"the port agrees within every derived bound ({len(self.rows)} rows, {self.dtype})"
        ]
        head += [f"note: {n}" for n in self.notes]
        wp = max(len(r.phase) for r in self.rows)
        ww = max(len(r.where) for r in self.rows)
        lines = [
            f"{'phase':<{wp}}  {'where':<{ww}}  {'max rel err':>11}  {'bound':>8}  verdict  bound = formula"
        ]
        lines.append("-" * (len(lines[0]) + 30))
        for r in self.rows:
            lines.append(
                f"{r.phase:<{wp}}  {r.where:<{ww}}  {num(r.max_rel):>11}  {r.tol:>8.1e}  "
                f"{'ok     ' if r.ok else 'DIFFERS'}  {r.formula}"
            )
        return "\n".join(head + [""] + lines)


def _side(name: str):
    """`charclip.parity.port_torch` / `port_jax`, with one line when the framework is missing."""
    try:
        return importlib.import_module(f"charclip.parity.port_{name}")
    except ModuleNotFoundError as e:
        raise CharclipError(f"prove_port needs {e.name}, which is not installed") from None


def _optimizer(optimizer) -> Optimizer:
    if isinstance(optimizer, Optimizer):
        return optimizer
    if isinstance(optimizer, str):
        return Optimizer(optimizer)
    raise CharclipError(
        f"optimizer must be one of {', '.join(OPTIMIZERS)} or an Optimizer(...), "
        f"not {type(optimizer).__name__}"
    )


def _perturbed(
    params: dict[str, np.ndarray], trainable: list[str], dtype: str
) -> dict[str, np.ndarray]:
    """Every trainable weight moved by one ulp of `dtype` (away from zero)."""
    out = dict(params)
    for n in trainable:
        p = params[n]
        if dtype == "bfloat16":
            out[n] = (p * (1 + 2 * UNIT_ROUNDOFF[dtype])).astype(p.dtype)
        else:
            out[n] = np.nextafter(
                p, np.where(p < 0, -np.inf, np.inf).astype(p.dtype)
            )  # in p's own dtype
    return out


def _rel(a: dict, b: dict) -> float:
    return max(errors(a[k], b[k])[1] for k in a)


def prove_port(
    torch_model,
    jax_forward,
    batches,
    *,
    loss: str = "mse",
    optimizer="sgd",
    lr: float = 0.1,
    max_norm: float | None = 1.0,
    clip_value: float | None = None,
    dtype: str = "float64",
    mapping: dict | None = None,
    jax_optimizer=None,
    trajectory: bool = True,
) -> PortReport:
    """Prove `jax_forward` computes what `torch_model` computes, phase by phase (module docstring).

    `optimizer`: "sgd", "adam", "adamw" or an `Optimizer(...)` (momentum, nesterov, weight_decay,
    betas, eps), run as torch.optim on one side and the matching optax chain on the other.
    `max_norm` (norm clipping, None: none) and `clip_value` (value clipping) act between
    backward and step. `jax_optimizer`: an optax transformation of your own to prove against
    torch's optimizer instead of the matched one. `trajectory=False` skips the trajectory.
    Returns a `PortReport`: `.ok`, `.divergence`, `.rows`, `.table()`, `.trajectory`, `.notes`.
    """
    if loss not in LOSSES:
        raise CharclipError(f"unknown loss {loss!r}; use one of {', '.join(LOSSES)}")
    if dtype not in UNIT_ROUNDOFF:
        raise CharclipError(f"unknown dtype {dtype!r}; use one of {', '.join(UNIT_ROUNDOFF)}")
    opt = _optimizer(optimizer)
    batches = list(batches)
    if not batches:
        raise CharclipError("prove_port needs at least one (x, y) batch")
    if not lr > 0:
        raise CharclipError(f"lr must be positive, got {lr}")
    for name, v in (("max_norm", max_norm), ("clip_value", clip_value)):
        if v is not None and not v > 0:
            raise CharclipError(f"{name} must be positive (or None for no clipping), got {v}")
    pt, pj = _side("torch"), _side("jax")
    pt.check_no_active_dropout(torch_model)
    import jax

    jax.config.update("jax_enable_x64", True)  # float64 must mean float64 on the JAX side
    host = "float32" if dtype == "bfloat16" else dtype  # NumPy has no bfloat16: each side casts
    params = {
        k: v.detach().cpu().float().numpy().astype(host)
        if v.is_floating_point()
        else v.detach().cpu().numpy()
        for k, v in torch_model.state_dict().items()
    }
    trainable = [n for n, p in torch_model.named_parameters() if p.requires_grad]
    fn, layouts, build, kind = pj.as_function(jax_forward, params, trainable, mapping)
    kw = dict(dtype=dtype, loss=loss, opt=opt, lr=lr, max_norm=max_norm, clip_value=clip_value)
    runs = batches if trajectory else batches[:1]
    with pt.pinned_precision() as t_note, pj.pinned_precision() as j_note:
        t = pt.run(torch_model, params, trainable, runs, **kw)
        j = pj.run(fn, build, kind, params, trainable, runs, jax_optimizer=jax_optimizer, **kw)
        perturbed = (
            pt.run(
                torch_model,
                _perturbed(params, trainable, dtype),
                trainable,
                runs,
                ladder=False,
                **kw,
            )
            if trajectory
            else None
        )
    notes = [
        f"precision pinned: {t_note}; {j_note}",
        f"JAX side: {kind}" + ("; jax_optimizer given" if jax_optimizer is not None else ""),
    ]
    notes += [f"layout: {n}" for n in layouts]
    notes += opt.differences()
    rows, traj = _rows(
        t, j, perturbed, params, trainable, batches[0][0], dtype, opt, max_norm, clip_value
    )
    report = PortReport(rows, dtype, notes, None, traj)
    report.divergence = _divergence(report)
    return report


def _rows(
    t: dict,
    j: dict,
    perturbed: dict | None,
    params: dict,
    trainable: list[str],
    x0,
    dtype: str,
    opt: Optimizer,
    max_norm: float | None,
    clip_value: float | None,
):
    u = UNIT_ROUNDOFF[dtype]
    uname = {"float64": "2^-53", "float32": "2^-24", "bfloat16": "2^-8"}[dtype]
    rows: list[PortRow] = []

    def row(phase, where, a, b, tol, formula):
        max_abs, max_rel = _errors(a, b)
        rows.append(PortRow(phase, where, max_abs, max_rel, tol, formula, bool(max_rel <= tol)))

    # forward: each torch submodule the JAX side recorded under the same name, in execution order
    jtaps: dict[str, list] = {}
    for name, leaves in j["taps"]:
        jtaps.setdefault(name, []).append(leaves)
    seen: dict[str, int] = {}
    n = 0
    for name, leaves, length in t["taps"]:
        n += length
        k = seen.get(name, 0)
        seen[name] = k + 1
        if k < len(jtaps.get(name, [])):
            other = jtaps[name][k]
            a, b = (leaves, other) if len(leaves) == len(other) else (leaves[:1], other[:1])
            row(
                "forward",
                name if k == 0 else f"{name}#{k}",
                a,
                b,
                C * u * max(n, 1),
                f"{C}·u·n, u={uname}, n={n} (summed terms up to here)",
            )
    n = max(n, 1)
    row("forward", "output", [t["output"]], [j["output"]], C * u * n, f"{C}·u·n, u={uname}, n={n}")
    r = t["out_rows"]
    row(
        "forward",
        "loss",
        [np.float64(t["loss"])],
        [np.float64(j["loss"])],
        C * u * (n + r),
        f"{C}·u·(n + r), n={n}, r={r} (averaged positions)",
    )
    # backward: each gradient in reverse order of use, then the norm and the clipped gradients
    positions = int(np.size(x0))
    g_tol = C * u * (2 * n + positions)
    g_formula = f"{C}·u·(2n + m), n={n}, m={positions} (summed positions)"
    for name in reversed(t["use_order"]):
        row(
            "backward",
            f"grad {name}",
            [t["grad"][name]],
            [j["grad"].get(name, np.full(1, np.nan))],
            g_tol,
            g_formula,
        )
    size = sum(int(np.size(params[k])) for k in trainable)
    row(
        "backward",
        "global grad norm",
        [np.float64(t["grad_norm"])],
        [np.float64(j["grad_norm"])],
        g_tol + C * u * math.sqrt(size),
        g_formula + f" + {C}·u·sqrt(P), P={size}",
    )
    gap = (
        TORCH_EPS / max_norm
        if max_norm is not None and t["grad_norm"] >= max_norm - TORCH_EPS
        else 0.0
    )
    clip_name = (
        " ".join(
            filter(
                None,
                [
                    f"norm<={max_norm:g}" if max_norm is not None else "",
                    f"|g|<={clip_value:g}" if clip_value is not None else "",
                ],
            )
        )
        or "none"
    )
    gap_text = f" + 1e-6/tau={gap:.1e} (torch's norm epsilon)" if gap else ""
    for name in reversed(t["use_order"]):
        row(
            "backward",
            f"clipped grad {name} ({clip_name})",
            [t["clipped"][name]],
            [j["clipped"][name]],
            g_tol + gap,
            g_formula + gap_text,
        )
    # step: each parameter's first update, relative to the update's own size. SGD's update is linear
    # in the gradient (kappa = 1); Adam's first one is lr g / (|g| + eps), whose slope eps / (|g| + eps)^2
    # turns an absolute gradient error d into an update error lr d eps / (|g| + eps)^2: kappa is that
    # slope times max|g| at these gradients (large when some g is near 0 and eps is small).
    ops = SGD_OPS if opt.name == "sgd" else ADAM_OPS
    any_gap = TORCH_EPS / max_norm if max_norm is not None else 0.0  # a later step may clip
    per_step = C * u
    for name in t["use_order"]:
        g = np.abs(t["clipped"][name])
        kappa = (
            1.0
            if opt.name == "sgd" or not g.size
            else float(g.max() * np.max(opt.eps / (g + opt.eps) ** 2))
        )
        kappa = max(kappa, 1.0)
        du = float(np.max(np.abs(t["update"][name]))) if t["update"][name].size else 0.0
        dp = (
            max(
                float(np.max(np.abs(t["start"][name]))), float(np.max(np.abs(t["params"][0][name])))
            )
            if t["start"][name].size
            else 0.0
        )  # the weights' scale, before or after (a zero-initialised bias)
        ratio = dp / du if du > 0 else 1.0
        tol = g_tol * kappa + gap + C * u * (ops + ratio)
        row(
            "step",
            f"update {name}",
            [t["update"][name]],
            [j["update"][name]],
            tol,
            f"grad bound·kappa{' + gap' if gap else ''} + {C}·u·(k + |p|/|dp|), kappa={kappa:.3g}, "
            f"k={ops} ({opt.name} ops), |p|/|dp|={ratio:.3g}",
        )
        # what one step adds to the weights' relative error (the trajectory's per-step bound)
        per_step = max(
            per_step, (g_tol * kappa + any_gap + C * u * ops) / max(ratio, 1e-300) + C * u
        )
    traj = None
    if perturbed is not None:
        steps = len(t["params"])
        gaps = [
            max(_rel(a, b), errors(la, lb)[1])
            for a, b, la, lb in zip(t["params"], j["params"], t["losses"], j["losses"])
        ]
        start = {k: params[k] for k in trainable}
        pert0 = _rel(start, {k: _perturbed(params, trainable, dtype)[k] for k in trainable})
        pert = [_rel(a, b) for a, b in zip(t["params"], perturbed["params"])]
        bounds = [per_step * k * max(1.0, pk / pert0) for k, pk in enumerate(pert, 1)]
        traj = Trajectory(gaps, bounds, pert, pert0, per_step)
        worst = int(np.argmax([g / b for g, b in zip(gaps, bounds)]))
        rows.append(
            PortRow(
                "trajectory",
                f"params and loss, {steps} steps (worst: step {worst + 1})",
                math.nan,
                gaps[worst],
                bounds[worst],
                traj.formula(worst + 1),
                bool(gaps[worst] <= bounds[worst]),
            )
        )
    return rows, traj


def _errors(a: list, b: list) -> tuple[float, float]:
    if len(a) != len(b):
        return math.inf, math.inf
    e = [errors(x, y) for x, y in zip(a, b)]
    return max(x[0] for x in e) if e else 0.0, max(x[1] for x in e) if e else 0.0


def _divergence(report: PortReport) -> Divergence | None:
    row = report.first_failure
    if row is None:
        return None
    if row.phase != "trajectory":
        return Divergence(
            row.phase,
            row.where.removeprefix("grad ").removeprefix("update "),
            None,
            row.max_rel,
            row.tol,
            row.formula,
        )
    tr = report.trajectory
    k = next(i for i, (g, b) in enumerate(zip(tr.gap, tr.bound)) if g > b)
    before = tr.gap[k - 1] if k > 0 else tr.initial_perturbation
    jump = tr.gap[k] / max(before, 1e-300)
    p_before = tr.perturbed[k - 1] if k > 0 else tr.initial_perturbation
    p_jump = tr.perturbed[k] / max(p_before, 1e-300)
    kind = (
        "a jump at one step (a bug)"
        if jump > 100 * max(p_jump, 1.0)
        else "smooth growth (chaotic amplification beyond the measured rate)"
    )
    note = f"gap x{jump:.3g} in that step against x{p_jump:.3g} for a 1-ulp perturbation: {kind}"
    return Divergence(
        "trajectory", "parameters", k + 1, tr.gap[k], tr.bound[k], tr.formula(k + 1), note
    )


def assert_port_equal(torch_model, jax_forward, batches, **kwargs) -> PortReport:
    """`prove_port` for a pytest suite: returns the report, or raises AssertionError whose message is the
    divergence followed by the whole table."""
    report = prove_port(torch_model, jax_forward, batches, **kwargs)
    if not report.ok:
        raise AssertionError("port differs: " + report.table())
    return report
