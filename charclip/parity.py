"""Cross-backend parity, proven step by step, and the `charclip parity` command.

torch_impl and jax_impl are fed the same weights (`charclip.weights`), the same
batches (`charclip.batching`) and the same initial hidden state, and compared
quantity by quantity, the way llm.c checks its port: first the forward pass,
then the loss, then every parameter's gradient by name, then the global norm
and the clipped gradients (compared directly: Adam is nearly scale-invariant
and would hide a wrong norm), then one Adam update, then a training
trajectory with clipping active on some steps and not on others, and finally
sampled text. Every quantity comes out of the backends' real `Trainer.step`
where the trainer exposes it:

- the gradient a step feeds to Adam is read back from Adam's first moment
  after one step with beta1 = 0 (the moment is then exactly that gradient);
- the final hidden state is the trainer's carried state after the step.

Errors are measured relative to the largest magnitude in the compared array
(`max|a - b| / max(|a|, |b|)`), so entries that happen to be near zero do not
turn rounding into huge relative errors. docs/parity.md explains the
tolerances.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from charclip.clipspec import TORCH_EPS  # torch scales by tau / (norm + 1e-6); optax by tau / norm
from charclip.config import CELLS, DTYPES, ClipConfig, ModelConfig, TrainConfig
from charclip.errors import CharclipError

BACKENDS = ("torch", "jax")


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
        "forward": Tolerance(1e-10, "float64 (1.1e-16) rounding over T steps of L layers of matmuls: ~1e-14 expected"),
        "loss": Tolerance(1e-10, "float64: a mean of B*T log-softmaxes, ~1e-15 expected"),
        "grad": Tolerance(1e-10, "float64: BPTT through T steps, ~1e-14 expected"),
        "norm": Tolerance(1e-10, "float64: one sum of squares over all gradients, ~1e-15 expected"),
        "clipped": Tolerance(1e-10, "float64: gradient times one scalar; same convention on both sides"),
        "adam": Tolerance(1e-10, "float64: elementwise Adam formula, ~1e-14 after cancellation in p_new - p"),
        "trajectory": Tolerance(1e-10, "float64: rounding fed back through 50+ Adam steps; 1e-15 to 6e-13 measured"),
    },
    "float32": {
        "forward": Tolerance(1e-5, "float32 (6e-8) rounding over T recurrent steps of H-term dot products; ~1e-7 measured"),
        "loss": Tolerance(1e-5, "float32: log-softmax of float32 logits averaged over B*T; ~1e-7 measured"),
        "grad": Tolerance(1e-5, "float32: BPTT sums T*B outer products per weight; ~1e-6 measured"),
        "norm": Tolerance(1e-6, "float32: one sum of squares of gradients each ~1e-7 off; ~1e-7 measured"),
        "clipped": Tolerance(1e-5, "float32: the gradient's error and one scalar multiply more"),
        "adam": Tolerance(1e-4, "float32: p_new - p cancels ~2 digits of a weight moving by lr; ~3e-6 measured"),
        "trajectory": Tolerance(1e-3, "float32: Adam's step g/(|g|+eps) turns rounding of g near eps into ~lr*1e-2; ~2e-4 measured"),
    },
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
        return Row(quantity, math.inf, math.inf, tol.rel, f"names differ: {sorted(a.keys() ^ b.keys())}", False)
    errs = [errors(a[k], b[k]) for k in a]
    max_abs, max_rel = max(e[0] for e in errs), max(e[1] for e in errs)
    return Row(quantity, max_abs, max_rel, tol.rel, tol.reason, bool(max_rel <= tol.rel))


# ---------------------------------------------------------------------------
# One step, seen from each backend


def _trainer(backend: str, model_cfg, train_cfg, params, *, hidden=None, adam=None, device="cpu"):
    from charclip.run import backend_module

    return backend_module(backend, "train").Trainer(model_cfg, train_cfg, params, adam=adam, hidden=hidden, device=device)


def _logits(backend: str, model_cfg: ModelConfig, params, x, hidden, device: str) -> np.ndarray:
    """The forward pass's logits (B, T, V), from the backend's own model code."""
    if backend == "torch":
        import torch

        from torch_impl import model as M
        from torch_impl.train import device_name

        dev = device_name(device)
        with torch.no_grad():
            logits, _ = M.build(model_cfg, params, dev)(torch.from_numpy(x).to(dev), M.hidden_from_numpy(hidden, dev))
        return logits.cpu().numpy()
    import jax

    from jax_impl import model as M
    from jax_impl.train import device_of

    dev = device_of(device)
    p = jax.device_put({k: jax.numpy.asarray(v) for k, v in params.items()}, dev)
    logits, _ = M.apply(p, jax.device_put(x, dev), jax.device_put(M.hidden_from_numpy(hidden), dev), cfg=model_cfg)
    return np.asarray(logits)


def _moment(trainer) -> dict[str, np.ndarray]:
    """Adam's first moment by parameter name (with beta1 = 0: the last gradient Adam received)."""
    return {k[len("exp_avg."):]: v for k, v in trainer.adam_state().items() if k.startswith("exp_avg.")}


@dataclass
class StepSetup:
    """Everything one parity step needs, identical for both backends."""

    model: ModelConfig
    train: TrainConfig  # lr, betas, eps, dtype; its clip setting is replaced per quantity
    params: dict[str, np.ndarray]
    x: np.ndarray  # (B, T) int64
    y: np.ndarray  # (B, T) int64
    hidden: dict[str, np.ndarray]  # the initial state, {"h"} or {"h", "c"}, each (L, B, H)
    adam: dict[str, np.ndarray]  # a warm Adam state, so the update depends on the gradient's scale
    max_norm: float  # below the gradient's norm: norm clipping acts
    max_value: float  # below the largest component: value clipping acts
    clip_impl: str = "library"


def step_quantities(backend: str, s: StepSetup, device: str = "cpu") -> dict:
    """Forward, loss, gradient, norm, clipped gradients and one Adam update of `backend`."""
    probe = replace(s.train, beta1=0.0)  # Adam's first moment then holds exactly the step's gradient

    def trainer(cfg, adam=None):
        return _trainer(backend, s.model, cfg, s.params, hidden=s.hidden, adam=adam, device=device)

    plain = trainer(replace(probe, clip=ClipConfig(mode="none")))
    r = plain.step(s.x, s.y)
    grads = _moment(plain)
    norm_clip = ClipConfig(mode="norm", max_norm=s.max_norm, impl=s.clip_impl)
    norm_clipped = trainer(replace(probe, clip=norm_clip))
    value_clipped = trainer(replace(probe, clip=ClipConfig(mode="value", max_value=s.max_value, impl=s.clip_impl)))
    adam = trainer(replace(s.train, clip=norm_clip), s.adam)
    _optimizer_steps(backend, [norm_clipped, value_clipped, adam], s.x, s.y, grads)
    after = adam.params_numpy()
    return {
        "logits": _logits(backend, s.model, s.params, s.x, s.hidden, device),
        "final": plain.hidden_state(),
        "loss": r.loss,
        "grad": grads,
        "grad_norm": r.grad_norm,
        "norm_clipped": _moment(norm_clipped),
        "value_clipped": _moment(value_clipped),
        "adam_update": {k: after[k] - s.params[k] for k in after},
    }


def _optimizer_steps(backend: str, trainers: list, x, y, grads: dict[str, np.ndarray]) -> None:
    """One clip-then-Adam step of each trainer on the batch whose gradient (from this backend) is `grads`.

    torch simply takes the steps: it recomputes the same gradient at no cost. JAX
    applies each trainer's own optimizer chain (what `make_train_step` applies)
    to the gradient its train step already produced, all in one compiled call,
    instead of compiling the whole train step again per clipping setting.
    """
    if backend == "torch":
        for t in trainers:
            t.step(x, y)
        return
    import jax
    import optax

    @jax.jit
    def updates(g, states, params):
        return [t.tx.update(g, s, params) for t, s in zip(trainers, states)]

    g = jax.device_put({k: jax.numpy.asarray(v) for k, v in grads.items()}, trainers[0].device)
    params = trainers[0].params  # all trainers start from the same parameters
    for t, (u, state) in zip(trainers, updates(g, [t.opt_state for t in trainers], params)):
        t.params, t.opt_state = optax.apply_updates(params, u), state




def library_gap(clip_impl: str, max_norm: float) -> float:
    """How far the two libraries' norm clipping differ by design (relative), at threshold `max_norm`.

    On a clipped step torch's gradient is optax's times norm / (norm + 1e-6), so
    they differ by 1e-6 / (norm + 1e-6) < 1e-6 / tau. charclip's reference
    implementations use one convention on both sides: no gap.
    """
    return TORCH_EPS / max_norm if clip_impl == "library" else 0.0


def widen(tol: Tolerance, gap: float, what: str = "") -> Tolerance:
    if gap == 0:
        return tol
    return Tolerance(tol.rel + gap, f"{tol.reason}; + torch's 1e-6 norm epsilon{what}: {gap:.1e}")


def compare_step(s: StepSetup, device: str = "cpu") -> list[Row]:
    """Quantities 1 to 5 of the parity ladder, torch against JAX."""
    tol = TOLERANCES[s.train.dtype]
    gap = library_gap(s.clip_impl, s.max_norm)
    t, j = (step_quantities(b, s, device) for b in BACKENDS)
    rows = [compare("logits", t["logits"], j["logits"], tol["forward"])]
    rows += [compare(f"final {part}", t["final"][part], j["final"][part], tol["forward"]) for part in t["final"]]
    rows.append(compare("loss", t["loss"], j["loss"], tol["loss"]))
    rows += [compare(f"grad {name}", t["grad"][name], j["grad"][name], tol["grad"]) for name in t["grad"]]
    rows.append(compare("global grad norm", t["grad_norm"], j["grad_norm"], tol["norm"]))
    rows.append(compare_group(f"norm-clipped grads (tau={s.max_norm:.4g})", t["norm_clipped"], j["norm_clipped"],
                              widen(tol["clipped"], gap)))
    rows.append(compare_group(f"value-clipped grads (v={s.max_value:.4g})", t["value_clipped"], j["value_clipped"], tol["clipped"]))
    rows.append(compare_group("Adam update after clipping", t["adam_update"], j["adam_update"], widen(tol["adam"], gap)))
    return rows


def make_step_setup(model_cfg: ModelConfig, train_cfg: TrainConfig, params, x, y, *, seed: int = 0,
                    clip_impl: str = "library") -> StepSetup:
    """A step setup with a random initial state, a warm Adam state and thresholds that make clipping act.

    The thresholds come from the witness-free float64 torch gradient: half its
    norm, and half its largest component, so both kinds of clipping change it.
    """
    rng = np.random.default_rng([seed, 1])
    dtype = train_cfg.dtype
    shape = (model_cfg.num_layers, x.shape[0], model_cfg.hidden_size)
    hidden = {"h": np.tanh(rng.standard_normal(shape)).astype(dtype)}  # (L, B, H), inside tanh's range
    if model_cfg.cell == "lstm":
        hidden["c"] = rng.standard_normal(shape).astype(dtype)
    probe = replace(train_cfg, beta1=0.0, clip=ClipConfig(mode="none"))
    trainer = _trainer("torch", model_cfg, probe, params, hidden=hidden)
    grad_norm = trainer.step(x, y).grad_norm
    grads = _moment(trainer)
    largest = max(float(np.max(np.abs(g))) for g in grads.values())
    # A warm state: moments of a few past steps, drawn at the gradients' scale.
    adam = {"step": np.array(3, dtype=np.int64)}
    for name, g in grads.items():
        scale = np.abs(g).max() + 1e-3
        adam[f"exp_avg.{name}"] = (scale * rng.standard_normal(g.shape)).astype(dtype)
        adam[f"exp_avg_sq.{name}"] = (scale * rng.standard_normal(g.shape)).astype(dtype) ** 2
    return StepSetup(model_cfg, train_cfg, params, x, y, hidden, adam,
                     max_norm=0.5 * grad_norm, max_value=0.5 * largest, clip_impl=clip_impl)


# ---------------------------------------------------------------------------
# A training trajectory


@dataclass
class Trajectory:
    max_norm: float
    loss: dict[str, list[float]] = field(default_factory=dict)
    grad_norm: dict[str, list[float]] = field(default_factory=dict)
    clipped: dict[str, list[bool]] = field(default_factory=dict)
    param_drift_abs: list[float] = field(default_factory=list)  # per step: worst max|p_torch - p_jax|
    param_drift_rel: list[float] = field(default_factory=list)  # per step: worst max|diff| / max|p|
    loss_drift_rel: list[float] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.param_drift_rel)


def trajectory(model_cfg: ModelConfig, train_cfg: TrainConfig, params, batches, *, device: str = "cpu",
               progress: bool = False) -> tuple[Trajectory, dict[str, dict]]:
    """Train both backends side by side on `batches` [(x, y, new_epoch)], comparing after every step.

    Returns the trajectory and each backend's final parameters.
    """
    from tqdm.auto import tqdm

    trainers = {b: _trainer(b, model_cfg, train_cfg, params, device=device) for b in BACKENDS}
    tr = Trajectory(max_norm=train_cfg.clip.max_norm)
    for b in BACKENDS:
        tr.loss[b], tr.grad_norm[b], tr.clipped[b] = [], [], []
    for x, y, new_epoch in tqdm(batches, desc=f"trajectory {model_cfg.cell}", disable=not progress, leave=False):
        for b, trainer in trainers.items():
            if new_epoch:
                trainer.reset_hidden()  # as charclip.run does at the start of an epoch
            r = trainer.step(x, y)
            tr.loss[b].append(r.loss)
            tr.grad_norm[b].append(r.grad_norm)
            tr.clipped[b].append(r.clipped)
        p_t, p_j = trainers["torch"].params_numpy(), trainers["jax"].params_numpy()
        errs = [errors(p_t[k], p_j[k]) for k in p_t]
        tr.param_drift_abs.append(max(e[0] for e in errs))
        tr.param_drift_rel.append(max(e[1] for e in errs))
        tr.loss_drift_rel.append(errors(tr.loss["torch"][-1], tr.loss["jax"][-1])[1])
    finals = {b: t.params_numpy() for b, t in trainers.items()}
    return tr, finals


def trajectory_rows(tr: Trajectory, train_cfg: TrainConfig) -> list[Row]:
    # With the libraries' clipping each clipped step differs by up to 1e-6/tau (torch's epsilon);
    # training feeds that back, so allow it once per step: a generous allowance, not a proof.
    gap = tr.steps * library_gap(train_cfg.clip.impl, train_cfg.clip.max_norm)
    tol = widen(TOLERANCES[train_cfg.dtype]["trajectory"], gap, " x steps")
    worst = int(np.argmax(tr.param_drift_rel))
    same_flags = tr.clipped["torch"] == tr.clipped["jax"]
    n_clipped = sum(tr.clipped["torch"])
    both = 0 < n_clipped < tr.steps
    mismatched = sum(a != b for a, b in zip(tr.clipped["torch"], tr.clipped["jax"]))
    return [
        Row(f"params over {tr.steps} steps (worst: step {worst + 1})", tr.param_drift_abs[worst],
            tr.param_drift_rel[worst], tol.rel, tol.reason, bool(tr.param_drift_rel[worst] <= tol.rel)),
        Row("loss over the trajectory (worst step)", math.nan, max(tr.loss_drift_rel), tol.rel, tol.reason,
            bool(max(tr.loss_drift_rel) <= tol.rel)),
        Row(f"clipped steps: {n_clipped} of {tr.steps} (tau={tr.max_norm:.4g})", float(mismatched),
            float(mismatched) / tr.steps, 0.0, "same steps clipped in both; some clipped and some not",
            bool(same_flags and both)),
    ]


# ---------------------------------------------------------------------------
# Sampling


def sample_row(model_cfg: ModelConfig, params, vocab, *, prime: str, length: int, seed: int, device: str = "cpu") -> Row:
    """Both backends sample from the same parameters, prime and seed; the texts must be identical."""
    from charclip.run import backend_module

    texts = [backend_module(b, "sample").sample(model_cfg, params, vocab, prime, length, temperature=0.8,
                                                seed=seed, device=device) for b in BACKENDS]
    differ = sum(a != b for a, b in zip(*texts)) + abs(len(texts[0]) - len(texts[1]))
    return Row(f"sampled text ({length} chars, seed {seed})", float(differ), differ / length, 0.0,
               "one shared NumPy draw per character: any difference is a bug", differ == 0)


# ---------------------------------------------------------------------------
# The whole report for one configuration


@contextlib.contextmanager
def full_precision(device: str):
    """On a GPU, pin full float32 precision on both sides (no TF32); yield a note saying so."""
    if device != "gpu":
        yield None
        return
    import jax
    import torch

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with jax.default_matmul_precision("highest"):
            yield ("GPU: full float32 precision pinned: torch cudnn.allow_tf32 = cuda.matmul.allow_tf32 = False; "
                   "JAX default_matmul_precision = 'highest'")
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@contextlib.contextmanager
def _one_torch_thread():
    """Run torch on one CPU thread while the backends alternate step by step.

    XLA's worker threads keep spinning for a moment after each JAX call; a second
    torch thread then fights them for the cores (measured on 2 cores: one tiny
    torch step took 0.5 s right after a JAX step, 2 ms with one thread).
    """
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@dataclass
class Report:
    config: dict
    rows: list[Row]
    trajectory: Trajectory | None
    notes: list[str]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    def to_dict(self) -> dict:
        return {"config": self.config, "ok": self.ok, "notes": self.notes,
                "rows": [asdict(r) for r in self.rows],
                "trajectory": asdict(self.trajectory) if self.trajectory else None}


def run_parity(cell: str = "lstm", layers: int = 1, dtype: str = "float64", steps: int = 50, *, device: str = "cpu",
               hidden_size: int = 32, embedding_dim: int = 16, batch_size: int = 8, seq_len: int = 32,
               lr: float = 1e-2, seed: int = 0, clip_impl: str = "reference", sample_chars: int = 200,
               corpus_chars: int = 50_000, progress: bool = True) -> Report:
    """Compare torch_impl and jax_impl on one configuration (the ladder 1 to 7)."""
    from charclip import corpus
    from charclip.batching import Position, Streams
    from charclip.vocab import Vocab
    from charclip.weights import init_params

    if cell not in CELLS:
        raise CharclipError(f"unknown cell {cell!r}; choose one of {', '.join(CELLS)} or all")
    if dtype not in DTYPES:
        raise CharclipError(f"unknown --dtype {dtype!r}; use float32 or float64")
    if steps < 2:
        raise CharclipError(f"--steps must be at least 2 (some steps clipped, some not), got {steps}")
    text = corpus.load(None)[:corpus_chars]
    vocab = Vocab.from_text(text)
    model_cfg = ModelConfig(vocab_size=len(vocab), cell=cell, hidden_size=hidden_size, num_layers=layers,
                            embedding_dim=embedding_dim)
    train_cfg = TrainConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, seed=seed, dtype=dtype)
    params = init_params(model_cfg, seed, dtype)
    streams = Streams(vocab.encode(text), batch_size, seq_len)
    batches, pos = [], Position()
    for _ in range(steps):
        batches.append((*streams.batch(seed, pos), pos.batch == 0))
        pos = streams.next(pos)

    with full_precision(device) as note, _one_torch_thread():
        notes = [note] if note else []
        setup = make_step_setup(model_cfg, train_cfg, params, *batches[0][:2], seed=seed, clip_impl=clip_impl)
        rows = compare_step(setup, device)
        tau = clipping_threshold(model_cfg, train_cfg, params, batches)
        train_cfg = replace(train_cfg, clip=ClipConfig(mode="norm", max_norm=tau, impl=clip_impl))
        tr, finals = trajectory(model_cfg, train_cfg, params, batches, device=device, progress=progress)
        rows += trajectory_rows(tr, train_cfg)
        if sample_chars:
            rows.append(sample_row(model_cfg, finals["torch"], vocab, prime="\n", length=sample_chars, seed=seed, device=device))
    config = {"cell": cell, "layers": layers, "dtype": dtype, "steps": steps, "device": device, "hidden": hidden_size,
              "embedding": embedding_dim, "batch": batch_size, "seq_len": seq_len, "lr": lr, "seed": seed,
              "clip_impl": clip_impl, "vocab": len(vocab)}
    return Report(config, rows, tr, notes)


def clipping_threshold(model_cfg: ModelConfig, train_cfg: TrainConfig, params, batches) -> float:
    """The median gradient norm of an unclipped torch run on the same batches.

    With tau there, roughly half the steps of the clipped run exceed it; the
    report checks that some steps are clipped and some are not.
    """
    trainer = _trainer("torch", model_cfg, replace(train_cfg, clip=ClipConfig(mode="none")), params)
    norms = []
    for x, y, new_epoch in batches:
        if new_epoch:
            trainer.reset_hidden()
        norms.append(trainer.step(x, y).grad_norm)
    return float(np.median(norms))


# ---------------------------------------------------------------------------
# Output: table, JSON, plot


def format_table(rows: list[Row]) -> str:
    def num(v: float) -> str:
        return "-" if math.isnan(v) else f"{v:.2e}"

    width = max(len(r.quantity) for r in rows)
    lines = [f"{'quantity':<{width}}  {'max abs err':>11}  {'max rel err':>11}  {'tolerance':>9}  verdict",
             "-" * (width + 50)]
    for r in rows:
        lines.append(f"{r.quantity:<{width}}  {num(r.max_abs):>11}  {num(r.max_rel):>11}  {r.tol:>9.0e}  "
                     f"{'ok' if r.ok else 'DIFFERS'}")
    return "\n".join(lines)


def plot_drift(reports: list[Report], out_png) -> Path:
    """Per-step parameter and loss drift between the backends (log scale), one line per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    for i, rep in enumerate(reports):
        tr, c = rep.trajectory, rep.config
        label = f"{c['cell']} {c['layers']}x{c['hidden']} {c['dtype']}"
        steps = np.arange(1, tr.steps + 1)
        floor = np.finfo(c["dtype"]).eps / 10  # exact agreement (0) is drawn here, at the bottom
        ax1.semilogy(steps, np.maximum(tr.param_drift_rel, floor), color=f"C{i}", lw=1.2, label=label)
        clipped = np.array(tr.clipped["torch"])
        ax1.plot(steps[clipped], np.maximum(np.array(tr.param_drift_rel)[clipped], floor), ".", color=f"C{i}", ms=5)
        ax2.semilogy(steps, np.maximum(tr.loss_drift_rel, floor), color=f"C{i}", lw=1.2, label=label)
        tol = TOLERANCES[c["dtype"]]["trajectory"].rel
        ax1.axhline(tol, color=f"C{i}", ls="--", lw=0.8)
    ax1.set_ylabel("params: max|torch - jax| / max|p|")
    ax1.set_title("torch vs JAX drift per training step (dots: clipped steps; dashed: tolerance)")
    ax1.legend()
    ax1.grid(alpha=0.3, which="both")
    ax2.set_ylabel("loss: relative difference")
    ax2.set_xlabel("step")
    ax2.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)


# ---------------------------------------------------------------------------
# The `charclip parity` subcommand


def add_parser(sub) -> None:
    from charclip.cli import HelpFormatter  # imported here: cli imports this module to register it

    p = sub.add_parser(
        "parity", help="prove torch and JAX compute the same thing, quantity by quantity",
        description="Run the PyTorch and the JAX model from the same weights on the same batches and compare the "
        "forward pass, loss, every gradient, the global norm, clipped gradients, an Adam update, a training "
        "trajectory and sampled text. Prints a table; exits 1 when something disagrees.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--cell", choices=(*CELLS, "all"), default="lstm", help="recurrent cell compared (all: each in turn)")
    p.add_argument("--layers", type=int, default=1, help="stacked recurrent layers")
    p.add_argument("--dtype", choices=DTYPES, default="float64",
                   help="float64 shows the algorithms agree; float32 shows the rounding they add")
    p.add_argument("--steps", type=int, default=50, help="length of the compared training trajectory")
    p.add_argument("--hidden", type=int, default=32, help="hidden units per layer")
    p.add_argument("--batch-size", type=int, default=8, help="parallel streams per batch")
    p.add_argument("--seq-len", type=int, default=32, help="truncated-BPTT length")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="where both backends run")
    p.add_argument("--clip-impl", choices=("library", "reference"), default="reference",
                   help="clipping compared: charclip's reference implementations (one convention on both sides) "
                   "or the libraries' (torch adds 1e-6 to the norm, optax does not)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shared initial weights and batches")
    p.add_argument("--json", metavar="PATH", help="write the report as JSON")
    p.add_argument("--plot", metavar="PATH", help="write the per-step drift plot (PNG)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_main)


def _main(a) -> int:
    for name in ("layers", "hidden", "batch_size", "seq_len"):
        if getattr(a, name) < 1:
            raise CharclipError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(a, name)}")
    cells = CELLS if a.cell == "all" else (a.cell,)
    reports = []
    for cell in cells:
        rep = run_parity(cell, a.layers, a.dtype, a.steps, device=a.device, hidden_size=a.hidden,
                         embedding_dim=max(a.hidden // 2, 1), batch_size=a.batch_size, seq_len=a.seq_len, seed=a.seed,
                         clip_impl=a.clip_impl, progress=not a.no_progress)
        c = rep.config
        print(f"\n{cell} {c['layers']}x{c['hidden']} (embedding {c['embedding']}, vocabulary {c['vocab']}), {a.dtype}, "
              f"batch {c['batch']}x{c['seq_len']}, {a.device}, clipping: {a.clip_impl}")
        for note in rep.notes:
            print(note)
        print(format_table(rep.rows))
        reports.append(rep)
    bad = [f"{r.config['cell']}: {row.quantity}" for r in reports for row in r.rows if not row.ok]
    print("\nall quantities agree" if not bad else f"\n{len(bad)} quantities DIFFER: " + "; ".join(bad))
    if a.json:
        Path(a.json).write_text(json.dumps([r.to_dict() for r in reports], indent=1, default=float), encoding="utf-8")
        print(f"json: {a.json}")
    if a.plot:
        print(f"plot: {plot_drift(reports, a.plot)}")
    return 0 if not bad else 1
