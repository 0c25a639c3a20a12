"""Cross-backend parity, proven step by step: the ladder from the forward pass to sampled text.

charclip.torch and charclip.jax are fed the same weights (`charclip.weights`), the same
batches (`charclip.batching`) and the same initial hidden state, and compared
quantity by quantity, the way llm.c checks its port: first the forward pass,
then the loss, then every parameter's gradient by name, then the global norm
and the clipped gradients (compared directly: Adam is nearly scale-invariant
and would hide a wrong norm), then one Adam update, then a training
trajectory with clipping active on some steps and not on others (with
`dropout` > 0, both backends given the same masks, `charclip.dropout`), and
finally sampled text. Every quantity comes out of the backends' real `Trainer.step`
where the trainer exposes it:

- the gradient a step feeds to Adam is read back from Adam's first moment
  after one step with beta1 = 0 (the moment is then exactly that gradient);
- the final hidden state is the trainer's carried state after the step.

Each backend is reached through its public surface only: `charclip.backends` for the
trainer, and the backend's small `probe` module for the forward logits and the
precision and thread settings the comparison needs.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, replace

import numpy as np

from charclip import backends
from charclip.config import CELLS, DTYPES, ClipConfig, ModelConfig, TrainConfig, compute_dtype
from charclip.contract import BACKENDS
from charclip.dropout import masks as dropout_masks  # (run_parity has a `dropout` argument)
from charclip.errors import CharclipError
from charclip.parity.report import Report
from charclip.parity.tolerances import (
    DTYPE_UNIT_ROUNDOFF,
    DrawBounds,
    Row,
    adam_gap,
    at_least,
    compare,
    compare_group,
    draw_bounds,
    errors,
    head_bounds,
    head_cancellation,
    library_gap,
    tolerances_for,
    update_rounding,
    widen,
)


def _trainer(backend: str, model_cfg, train_cfg, params, *, hidden=None, adam=None, device="cpu"):
    return backends.trainer_factory(backend)(
        model_cfg, train_cfg, params, adam=adam, hidden=hidden, device=device
    )


def _moment(trainer) -> dict[str, np.ndarray]:
    """Adam's first moment by parameter name (with beta1 = 0: the last gradient Adam received)."""
    return {
        k[len("exp_avg.") :]: v for k, v in trainer.adam_state().items() if k.startswith("exp_avg.")
    }


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
    probe = replace(
        s.train, beta1=0.0
    )  # Adam's first moment then holds exactly the step's gradient

    def trainer(cfg, adam=None):
        return _trainer(backend, s.model, cfg, s.params, hidden=s.hidden, adam=adam, device=device)

    plain = trainer(replace(probe, clip=ClipConfig(mode="none")))
    r = plain.step(s.x, s.y)
    grads = _moment(plain)
    norm_clip = ClipConfig(mode="norm", max_norm=s.max_norm, impl=s.clip_impl)
    norm_clipped = trainer(replace(probe, clip=norm_clip))
    value_clipped = trainer(
        replace(probe, clip=ClipConfig(mode="value", max_value=s.max_value, impl=s.clip_impl))
    )
    adam = trainer(replace(s.train, clip=norm_clip), s.adam)
    for t in (
        norm_clipped,
        value_clipped,
        adam,
    ):  # each clips the same gradient its own way, then steps
        t.apply_gradients(grads)
    after = adam.params_numpy()
    return {
        "logits": backends.module(backend, "probe").logits(
            s.model, s.params, s.x, s.hidden, device, **_compute(s.train)
        ),
        "final": plain.hidden_state(),
        "loss": r.loss,
        "grad": grads,
        "grad_norm": r.grad_norm,
        "norm_clipped": _moment(norm_clipped),
        "value_clipped": _moment(value_clipped),
        "adam_update": {k: after[k] - s.params[k] for k in after},
    }


def _compute(cfg: TrainConfig) -> dict:
    return {} if cfg.precision == "full" else {"compute_dtype": compute_dtype(cfg)}


def step_bounds(s: StepSetup) -> DrawBounds | None:
    """The draw's derived gradient bounds (vanilla RNN in full precision), else None.

    The fixed table bounds ordinary rounding; a draw whose values amplify rounding (sums
    that cancel, torch's tanh' near saturation) is measured against its own first-order
    bound where that is larger (`charclip.parity.tolerances.draw_bounds`). Meant for small
    models over a few steps, as the property test draws them: the worst case carries each
    error through |W_hh| at every step, which over long sequences grows like its spectral
    radius to the power T and says nothing (a 2 x 32 RNN over 32 steps: 1e16 relative).
    """
    if s.model.cell != "rnn" or s.train.precision != "full":
        return None
    return draw_bounds(s.params, s.x, s.y, s.hidden["h"], s.train.dtype)


def compare_step(s: StepSetup, device: str = "cpu", *, derived: bool = False) -> list[Row]:
    """Quantities 1 to 5 of the parity ladder, torch against JAX.

    `derived`: where the draw's own rounding bound exceeds the table's, use it (`step_bounds`).
    """
    t, j = (step_quantities(b, s, device) for b in BACKENDS)
    return compare_quantities(s, t, j, derived=derived)


def compare_quantities(s: StepSetup, t: dict, j: dict, *, derived: bool = False) -> list[Row]:
    """The rows of `compare_step` for two backends' `step_quantities` of the setup `s`."""
    tol = tolerances_for(s.train.dtype, s.train.precision, s.model.cell, positions=s.x.size)
    gap = library_gap(s.clip_impl, s.max_norm)
    bounds = step_bounds(s) if derived else None
    source = "charclip.witness.rounding_bound"
    if derived and bounds is None and s.train.dtype in DTYPE_UNIT_ROUNDOFF:
        # GRU, LSTM: the witness covers only the vanilla RNN; the head's share is derived.
        if s.train.precision == "full":
            kappa = head_cancellation(t["logits"], s.y, s.params["head.weight"])
            bounds = head_bounds(kappa, t["logits"], s.y, t["grad"], s.train.dtype)
            source = f"from the head's values (kappa = {kappa:.3g}; parity.tolerances.head_bounds)"
    if bounds is not None:
        # The clipping coefficient tau / norm carries the norm's relative error to every entry.
        # (Adam's update keeps its table bound, widened by the libraries' clipping gap as it
        # passes through Adam's moments, `adam_gap`, below.)
        tol = {
            **tol,
            "norm": at_least(tol["norm"], bounds.norm, source),
            "clipped": at_least(tol["clipped"], bounds.worst + bounds.norm, source),
            "value_clipped": at_least(tol["clipped"], bounds.worst, source),
        }
    grad_tol = {
        name: at_least(tol["grad"], bounds.grad[name], source) if bounds else tol["grad"]
        for name in t["grad"]
    }
    rows = [compare("logits", t["logits"], j["logits"], tol["forward"])]
    rows += [
        compare(f"final {part}", t["final"][part], j["final"][part], tol["forward"])
        for part in t["final"]
    ]
    rows.append(compare("loss", t["loss"], j["loss"], tol["loss"]))
    rows += [
        compare(f"grad {name}", t["grad"][name], j["grad"][name], grad_tol[name])
        for name in t["grad"]
    ]
    rows.append(compare("global grad norm", t["grad_norm"], j["grad_norm"], tol["norm"]))
    rows.append(
        compare_group(
            f"norm-clipped grads (tau={s.max_norm:.4g})",
            t["norm_clipped"],
            j["norm_clipped"],
            widen(tol["clipped"], gap),
        )
    )
    rows.append(
        compare_group(
            f"value-clipped grads (v={s.max_value:.4g})",
            t["value_clipped"],
            j["value_clipped"],
            tol.get("value_clipped", tol["clipped"]),
        )
    )
    rows.append(
        compare_group(
            "Adam update after clipping",
            t["adam_update"],
            j["adam_update"],
            widen(
                at_least(
                    tol["adam"],
                    update_rounding(s.params, t["adam_update"], s.train.dtype) + tol["clipped"].rel,
                    "p_new's rounding in each backend, parity.tolerances.update_rounding",
                ),
                adam_gap(gap, t["norm_clipped"], t["adam_update"], s.adam, s.train),
                " through Adam's moments",
            ),
        )
    )
    return rows


def make_step_setup(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    params,
    x,
    y,
    *,
    seed: int = 0,
    clip_impl: str = "library",
) -> StepSetup:
    """A step setup with a random initial state, a warm Adam state and thresholds that make clipping act.

    The thresholds come from the witness-free float64 torch gradient: half its
    norm, and half its largest component, so both kinds of clipping change it.
    """
    rng = np.random.default_rng([seed, 1])
    dtype = train_cfg.dtype
    shape = (model_cfg.num_layers, x.shape[0], model_cfg.hidden_size)
    hidden = {
        "h": np.tanh(rng.standard_normal(shape)).astype(dtype)
    }  # (L, B, H), inside tanh's range
    for part in model_cfg.state_parts[1:]:  # the LSTM's c, unbounded
        hidden[part] = rng.standard_normal(shape).astype(dtype)
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
    return StepSetup(
        model_cfg,
        train_cfg,
        params,
        x,
        y,
        hidden,
        adam,
        max_norm=0.5 * grad_norm,
        max_value=0.5 * largest,
        clip_impl=clip_impl,
    )


# ---------------------------------------------------------------------------
# A training trajectory


@dataclass
class Trajectory:
    max_norm: float
    loss: dict[str, list[float]] = field(default_factory=dict)
    grad_norm: dict[str, list[float]] = field(default_factory=dict)
    clipped: dict[str, list[bool]] = field(default_factory=dict)
    param_drift_abs: list[float] = field(
        default_factory=list
    )  # per step: worst max|p_torch - p_jax|
    param_drift_rel: list[float] = field(default_factory=list)  # per step: worst max|diff| / max|p|
    loss_drift_rel: list[float] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.param_drift_rel)


def trajectory(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    params,
    batches,
    *,
    device: str = "cpu",
    progress: bool = False,
) -> tuple[Trajectory, dict[str, dict]]:
    """Train both backends side by side on `batches` [(x, y, new_epoch)], comparing after every step.

    Step i of both is handed the dropout masks `charclip.run` would draw for update i (none when
    `train_cfg.dropout` is 0). Returns the trajectory and each backend's final parameters.
    """
    from tqdm.auto import tqdm

    trainers = {b: _trainer(b, model_cfg, train_cfg, params, device=device) for b in BACKENDS}
    tr = Trajectory(max_norm=train_cfg.clip.max_norm)
    for b in BACKENDS:
        tr.loss[b], tr.grad_norm[b], tr.clipped[b] = [], [], []
    for i, (x, y, new_epoch) in enumerate(
        tqdm(batches, desc=f"trajectory {model_cfg.cell}", disable=not progress, leave=False)
    ):
        masks = dropout_masks(model_cfg, train_cfg, i, *x.shape)
        for b, trainer in trainers.items():
            if new_epoch:
                trainer.reset_hidden()  # as charclip.run does at the start of an epoch
            r = trainer.step(x, y, masks=masks)
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


def trajectory_rows(tr: Trajectory, train_cfg: TrainConfig, cell: str = "lstm") -> list[Row]:
    # With the libraries' clipping each clipped step differs by up to 1e-6/tau (torch's epsilon);
    # training feeds that back, so allow it once per step: a generous allowance, not a proof.
    gap = tr.steps * library_gap(train_cfg.clip.impl, train_cfg.clip.max_norm)
    tol = widen(
        tolerances_for(train_cfg.dtype, train_cfg.precision, cell)["trajectory"], gap, " x steps"
    )
    worst = int(np.argmax(tr.param_drift_rel))
    # Dropout multiplies by the same NumPy masks on both sides (exact 0s, and 1/(1-p) rounded once,
    # identically): it adds no rounding of its own, so the bound is the trajectory's.
    dropped = f", dropout {train_cfg.dropout:g}" if train_cfg.dropout else ""
    same_flags = tr.clipped["torch"] == tr.clipped["jax"]
    n_clipped = sum(tr.clipped["torch"])
    both = 0 < n_clipped < tr.steps
    mismatched = sum(a != b for a, b in zip(tr.clipped["torch"], tr.clipped["jax"]))
    if train_cfg.precision == "full":
        params = Row(
            f"params over {tr.steps} steps{dropped} (worst: step {worst + 1})",
            tr.param_drift_abs[worst],
            tr.param_drift_rel[worst],
            tol.rel,
            tol.reason,
            bool(tr.param_drift_rel[worst] <= tol.rel),
        )
    else:
        # A gradient component near zero can change sign under rounding, and Adam's first steps
        # are about lr * sign(g) per weight: mixed precision weights may part by up to twice
        # Adam's largest step per step, lr * max(1, (1 - beta1) / sqrt(1 - beta2)) (Kingma & Ba
        # 2015, sec. 2.1), whatever the rounding. The row shows the drift as a share of that.
        c = train_cfg
        largest = c.lr * max(1.0, (1 - c.beta1) / math.sqrt(1 - c.beta2))
        ratio = [d / (2 * largest * (k + 1)) for k, d in enumerate(tr.param_drift_abs)]
        w = int(np.argmax(ratio))
        params = Row(
            f"params over {tr.steps} steps{dropped} (worst: step {w + 1}; share of 2 x Adam's largest step x steps)",
            tr.param_drift_abs[w],
            ratio[w],
            1.0,
            "Adam's step is at most lr * max(1, (1 - b1) / sqrt(1 - b2)): two runs part by twice that a step",
            bool(ratio[w] <= 1.0),
        )
    return [
        params,
        Row(
            "loss over the trajectory (worst step)",
            math.nan,
            max(tr.loss_drift_rel),
            tol.rel,
            tol.reason,
            bool(max(tr.loss_drift_rel) <= tol.rel),
        ),
        Row(
            f"clipped steps: {n_clipped} of {tr.steps} (tau={tr.max_norm:.4g})",
            float(mismatched),
            float(mismatched) / tr.steps,
            0.0,
            "same steps clipped in both; some clipped and some not",
            bool(same_flags and both),
        ),
    ]


# ---------------------------------------------------------------------------
# Sampling


def sample_row(
    model_cfg: ModelConfig,
    params,
    vocab,
    *,
    prime: str,
    length: int,
    seed: int,
    device: str = "cpu",
) -> Row:
    """Both backends sample from the same parameters, prime and seed; the texts must be identical."""
    texts = [
        backends.module(b, "sample").sample(
            model_cfg, params, vocab, prime, length, temperature=0.8, seed=seed, device=device
        )
        for b in BACKENDS
    ]
    differ = sum(a != b for a, b in zip(*texts)) + abs(len(texts[0]) - len(texts[1]))
    return Row(
        f"sampled text ({length} chars, seed {seed})",
        float(differ),
        differ / length,
        0.0,
        "one shared NumPy draw per character: any difference is a bug",
        differ == 0,
    )


# ---------------------------------------------------------------------------
# The whole report for one configuration


def run_parity(
    cell: str = "lstm",
    layers: int = 1,
    dtype: str = "float64",
    steps: int = 50,
    *,
    device: str = "cpu",
    hidden_size: int = 32,
    embedding_dim: int = 16,
    batch_size: int = 8,
    seq_len: int = 32,
    lr: float = 1e-2,
    seed: int = 0,
    clip_impl: str = "reference",
    sample_chars: int = 200,
    corpus_chars: int = 50_000,
    progress: bool = True,
    precision: str = "full",
    dropout: float = 0.0,
) -> Report:
    """Compare charclip.torch and charclip.jax on one configuration (the ladder 1 to 7; the trajectory with `dropout`)."""
    from charclip import corpus
    from charclip.batching import Position, Streams
    from charclip.vocab import Vocab
    from charclip.weights import init_params

    if cell not in CELLS:
        raise CharclipError(f"unknown cell {cell!r}; choose one of {', '.join(CELLS)} or all")
    if dtype not in DTYPES:
        raise CharclipError(f"unknown --dtype {dtype!r}; use float32 or float64")
    if steps < 2:
        raise CharclipError(
            f"--steps must be at least 2 (some steps clipped, some not), got {steps}"
        )
    text = corpus.load(None)[:corpus_chars]
    vocab = Vocab.from_text(text)
    model_cfg = ModelConfig(
        vocab_size=len(vocab),
        cell=cell,
        hidden_size=hidden_size,
        num_layers=layers,
        embedding_dim=embedding_dim,
    )
    train_cfg = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        lr=lr,
        seed=seed,
        dtype=dtype,
        precision=precision,
        dropout=dropout,
    )  # raises for a low precision with float64 master weights
    params = init_params(model_cfg, seed, dtype)
    streams = Streams(vocab.encode(text), batch_size, seq_len)
    batches, pos = [], Position()
    for _ in range(steps):
        batches.append((*streams.batch(seed, pos), pos.batch == 0))
        pos = streams.next(pos)

    probes = [backends.module(b, "probe") for b in BACKENDS]
    with contextlib.ExitStack() as stack:
        # On a GPU, full float32 precision on both sides (no TF32); on the CPU, one torch thread
        # while the backends alternate step by step (see charclip.torch.probe.one_thread).
        notes = [n for n in (stack.enter_context(p.full_precision(device)) for p in probes) if n]
        for p in probes:
            stack.enter_context(p.one_thread())
        setup = make_step_setup(
            model_cfg, train_cfg, params, *batches[0][:2], seed=seed, clip_impl=clip_impl
        )
        rows = compare_step(setup, device)
        tau = clipping_threshold(model_cfg, train_cfg, params, batches)
        train_cfg = replace(train_cfg, clip=ClipConfig(mode="norm", max_norm=tau, impl=clip_impl))
        tr, finals = trajectory(
            model_cfg, train_cfg, params, batches, device=device, progress=progress
        )
        rows += trajectory_rows(tr, train_cfg, cell)
        if sample_chars:
            rows.append(
                sample_row(
                    model_cfg,
                    finals["torch"],
                    vocab,
                    prime="\n",
                    length=sample_chars,
                    seed=seed,
                    device=device,
                )
            )
    config = {
        "cell": cell,
        "layers": layers,
        "dtype": dtype,
        "steps": steps,
        "device": device,
        "hidden": hidden_size,
        "embedding": embedding_dim,
        "batch": batch_size,
        "seq_len": seq_len,
        "lr": lr,
        "seed": seed,
        "clip_impl": clip_impl,
        "vocab": len(vocab),
        "precision": precision,
        **({"dropout": dropout} if dropout else {}),
    }
    return Report(config, rows, tr, notes)


def clipping_threshold(model_cfg: ModelConfig, train_cfg: TrainConfig, params, batches) -> float:
    """The median gradient norm of an unclipped torch run on the same batches (and dropout masks).

    With tau there, roughly half the steps of the clipped run exceed it; the
    report checks that some steps are clipped and some are not.
    """
    trainer = _trainer("torch", model_cfg, replace(train_cfg, clip=ClipConfig(mode="none")), params)
    norms = []
    for i, (x, y, new_epoch) in enumerate(batches):
        if new_epoch:
            trainer.reset_hidden()
        norms.append(
            trainer.step(x, y, masks=dropout_masks(model_cfg, train_cfg, i, *x.shape)).grad_norm
        )
    return float(np.median(norms))
