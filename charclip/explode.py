"""`charclip explode`: exploding gradients and their cure, measured in both backends.

Three experiments, written up in docs/exploding-gradients.md:

1. Gradient through time. A vanilla RNN whose W_hh has spectral radius rho;
   the norm of dL/dh_{T-k} for k = 0..T, with L the loss of the last step
   only, next to rho^k and to two bounds that include the tanh derivative.
   Run twice: with inputs so small that tanh stays linear, and with the
   inputs as initialised, where tanh saturates.
2. Training from an unstable start (rho > 1, a learning rate too large for
   the spikes) with no clipping, value clipping and norm clipping: loss and
   pre-clip gradient norm per step, both backends, same seeds and batches.
3. A sweep of the norm-clipping threshold tau: final validation loss.

The optimiser of experiments 2 and 3 is the backends' own Trainer, i.e. Adam,
set up to behave as plain SGD, the setting of Pascanu, Mikolov and Bengio
(2013): beta1 = 0 and an epsilon far above every gradient component, so that
Adam's step lr * g / (sqrt(v) + eps) is (lr / eps) * g to within
max|g| / eps. Default Adam divides each coordinate by its own RMS and so caps
the step of a spike at about lr by itself; the doc shows what that means.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from charclip import corpus
from charclip.batching import Position, Streams, split
from charclip.config import ClipConfig, ModelConfig, TrainConfig
from charclip.errors import CharclipError
from charclip.run import BACKENDS, DIVERGENCE_FACTOR, backend_module
from charclip.vocab import Vocab
from charclip.weights import init_params, scale_spectral_radius

RHOS = (0.5, 0.9, 1.0, 1.1, 1.5, 2.0)
LINEAR_INPUT_SCALE = 1e-20  # embeddings times this, biases zero: h_t stays ~1e-5 even at rho = 2, T = 50
SGD_EPS = 1e8  # Adam's epsilon: far above any gradient component, so Adam with beta1 = 0 is SGD (module docstring)
MODES = ("none", "value", "norm")


@dataclass(frozen=True)
class Settings:
    """Sizes of the three experiments; `QUICK` is the test's, `DEFAULT` the documented run's."""

    hidden: int = 64
    embed: int = 16
    corpus_chars: int = 200_000  # a slice of the embedded corpus, for speed
    # Experiment 1
    grad_seq_len: int = 50
    grad_batch: int = 8
    # Experiments 2 and 3
    steps: int = 600
    batch_size: int = 32
    seq_len: int = 50
    rho: float = 1.5  # spectral radius of W_hh at the start
    sgd_lr: float = 3.0  # SGD learning rate: Adam's lr is sgd_lr * SGD_EPS
    max_norm: float = 0.5  # tau of the norm-clipped run
    max_value: float = 0.01  # v of the value-clipped run
    taus: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 0.5, 1.0, 3.0, 10.0, 30.0, 100.0)
    sweep_seeds: tuple[int, ...] = (0, 1, 2)
    eval_batches: int = 8
    seed: int = 0


DEFAULT = Settings()
QUICK = replace(DEFAULT, steps=150, taus=(0.01, 0.5, 100.0), sweep_seeds=(0,), eval_batches=4)


# ---------------------------------------------------------------- data


@dataclass
class _Data:
    vocab: Vocab
    train: Streams
    val: Streams
    unigram_entropy: float  # nats/char of the training slice's character frequencies


def _data(s: Settings) -> _Data:
    text = corpus.load(None)[: s.corpus_chars]
    vocab = Vocab.from_text(text)
    train_tok, val_tok = split(vocab.encode(text, what="the embedded corpus"), 0.1)
    counts = np.bincount(train_tok, minlength=len(vocab))
    p = counts[counts > 0] / len(train_tok)
    return _Data(vocab, Streams(train_tok, s.batch_size, s.seq_len),
                 Streams(val_tok, s.batch_size, s.seq_len, what="validation text"), float(-(p * np.log(p)).sum()))


def _model(s: Settings, vocab: Vocab) -> ModelConfig:
    return ModelConfig(vocab_size=len(vocab), cell="rnn", hidden_size=s.hidden, num_layers=1, embedding_dim=s.embed)


def _params(model_cfg: ModelConfig, rho: float, seed: int, *, linear: bool = False) -> dict[str, np.ndarray]:
    """The model's initial float64 weights with W_hh scaled to spectral radius rho."""
    p = init_params(model_cfg, seed, "float64")
    p["rnn.weight_hh_l0"] = scale_spectral_radius(p["rnn.weight_hh_l0"], rho)
    if linear:  # tiny inputs and no biases: tanh(z) = z to ~1e-10, so the Jacobians are W_hh alone
        p["embedding.weight"] = p["embedding.weight"] * LINEAR_INPUT_SCALE
        p["rnn.bias_ih_l0"] = np.zeros_like(p["rnn.bias_ih_l0"])
        p["rnn.bias_hh_l0"] = np.zeros_like(p["rnn.bias_hh_l0"])
    return p


# ---------------------------------------------------------------- experiment 1


def jacobian_bounds(norms: np.ndarray, states: np.ndarray, w_hh: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two upper bounds on ||dL/dh_{T-k}||, k = 0..T, for a one-layer tanh RNN.

    dh_t/dh_{t-1} = diag(1 - h_t^2) W_hh =: J_t, so dL/dh_{T-k} = J_{T-k+1}^T ... J_T^T dL/dh_T and
    ||dL/dh_{T-k}|| <= ||dL/dh_T|| prod_t ||J_t||_2 <= ||dL/dh_T|| prod_t max_i(1 - h_{t,i}^2) ||W_hh||_2.
    Both are taken per sequence and maximised over the batch (the batch norm is a root of a sum of
    per-sequence squares). `states` is (T+1, 1, B, H) as returned by `grad_through_time`.
    """
    h = states[1:, 0]  # (T, B, H): h_1..h_T
    d = 1.0 - h**2  # tanh'(z_t) = 1 - h_t^2
    jac = np.linalg.norm(d[..., :, None] * w_hh[None, None], ord=2, axis=(-2, -1))  # (T, B): ||diag(d) W_hh||_2
    loose = d.max(axis=-1) * np.linalg.norm(w_hh, ord=2)  # (T, B)

    def backward_product(per_step: np.ndarray) -> np.ndarray:  # k = 0..T: product over the last k steps
        prods = np.concatenate([np.ones((1, per_step.shape[1])), np.cumprod(per_step[::-1], axis=0)])
        return norms[0] * prods.max(axis=1)

    return backward_product(jac), backward_product(loose)


def growth_per_step(norms: np.ndarray) -> float:
    """Geometric mean of ||dL/dh_{T-k-1}|| / ||dL/dh_{T-k}|| over the second half of k."""
    T = len(norms) - 1
    return float((norms[T] / norms[T // 2]) ** (1.0 / (T - T // 2)))


def gradient_through_time(s: Settings, data: _Data, backends, bar) -> dict:
    model_cfg = _model(s, data.vocab)
    x, y = Streams(data.train.tokens, s.grad_batch, s.grad_seq_len).batch(s.seed, Position())
    regimes = {}
    for regime, linear in (("linear", True), ("initialised", False)):
        curves = {}
        for rho in RHOS:
            params = _params(model_cfg, rho, s.seed, linear=linear)
            measured = {}
            for b in backends:
                measured[b] = backend_module(b, "explode").grad_through_time(model_cfg, params, x, y)
                bar.update(1)
            norms, states = measured[backends[0]]
            jac, loose = jacobian_bounds(norms, states, params["rnn.weight_hh_l0"])
            k = np.arange(len(norms))
            curves[f"{rho:g}"] = {
                "rho": rho, "norms": {b: measured[b][0].tolist() for b in backends},
                "rho_k": (norms[0] * rho**k).tolist(), "jacobian_product": jac.tolist(), "norm_bound": loose.tolist(),
                "w_hh_norm2": float(np.linalg.norm(params["rnn.weight_hh_l0"], ord=2)),
                "growth_per_step": growth_per_step(norms), "max_abs_h": float(np.abs(states).max()),
                "min_tanh_derivative": float((1 - states[1:] ** 2).min()),
            }
        regimes[regime] = curves
    agreement = None
    if len(backends) == 2:
        agreement = max(_rel_diff(np.array(c["norms"]["torch"]), np.array(c["norms"]["jax"]))
                        for curves in regimes.values() for c in curves.values())
    return {"seq_len": s.grad_seq_len, "batch": s.grad_batch, "linear_input_scale": LINEAR_INPUT_SCALE,
            "regimes": regimes, "max_rel_diff_torch_jax": agreement}


def _rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a - b| / max(|a|, |b|), entry by entry (the norms span 30 orders of magnitude)."""
    return float(np.max(np.abs(a - b) / np.maximum(np.maximum(np.abs(a), np.abs(b)), np.finfo(float).tiny)))


# ---------------------------------------------------------------- experiments 2 and 3


def _clip(s: Settings, mode: str, tau: float | None = None) -> ClipConfig:
    if mode == "norm":
        return ClipConfig(mode="norm", max_norm=s.max_norm if tau is None else tau)
    if mode == "value":
        return ClipConfig(mode="value", max_value=s.max_value)
    return ClipConfig(mode="none")


def train_config(s: Settings, clip: ClipConfig, seed: int) -> TrainConfig:
    """Adam turned into SGD with learning rate `s.sgd_lr` (module docstring); float64, NaN carried on."""
    return TrainConfig(steps=s.steps, batch_size=s.batch_size, seq_len=s.seq_len, lr=s.sgd_lr * SGD_EPS, beta1=0.0,
                       eps=SGD_EPS, seed=seed, dtype="float64", nonfinite="propagate", clip=clip)


def train_run(backend: str, s: Settings, data: _Data, clip: ClipConfig, seed: int, bar) -> dict:
    """One run from the unstable start; per-step loss, pre-clip norm and clipping, and the final validation loss."""
    model_cfg = _model(s, data.vocab)
    cfg = train_config(s, clip, seed)
    trainer = backend_module(backend, "train").Trainer(model_cfg, cfg, _params(model_cfg, s.rho, seed))
    pos, loss, norm, clipped, radius = Position(), [], [], [], []
    for _ in range(s.steps):
        if pos.batch == 0:
            trainer.reset_hidden()
        r = trainer.step(*data.train.batch(seed, pos))
        pos = data.train.next(pos)
        loss.append(r.loss)
        norm.append(r.grad_norm)
        clipped.append(r.clipped)
        radius.append(_spectral_radius(trainer.params_numpy()["rnn.weight_hh_l0"]))
        bar.update(1)
    val = trainer.evaluate(data.val.eval_batches(s.eval_batches))
    return {"backend": backend, "mode": clip.mode, "tau": clip.max_norm if clip.mode == "norm" else None,
            "v": clip.max_value if clip.mode == "value" else None, "seed": seed, **verdict(loss, val, data.unigram_entropy),
            "clipped_fraction": float(np.mean(clipped)), "max_grad_norm": float(np.nanmax(norm)),
            "loss": loss, "grad_norm": norm, "clipped": clipped, "spectral_radius": radius}


def _spectral_radius(w: np.ndarray) -> float:
    """Largest |eigenvalue| of W_hh after a step; NaN once the weights are."""
    return float(np.max(np.abs(np.linalg.eigvals(w)))) if np.isfinite(w).all() else math.nan


def verdict(loss: list[float], val_loss: float, unigram_entropy: float) -> dict:
    """Diverged: a loss not finite or over DIVERGENCE_FACTOR x the first (charclip train's rule).
    Converged: not diverged, and the validation loss under the unigram entropy, which a model
    that has learned nothing about context cannot beat."""
    arr = np.asarray(loss, dtype=float)
    bad = ~np.isfinite(arr)
    diverged = bool(bad.any()) or not math.isfinite(val_loss) or bool(np.nanmax(arr) > DIVERGENCE_FACTOR * arr[0])
    tail = arr[-max(len(arr) // 10, 1):]
    return {"first_loss": float(arr[0]), "max_loss": float(np.nanmax(arr)) if np.isfinite(arr).any() else None,
            "final_loss": float(np.mean(tail)), "val_loss": val_loss,
            "first_nonfinite_step": int(np.argmax(bad)) + 1 if bad.any() else None,
            "diverged": diverged, "converged": not diverged and val_loss < unigram_entropy}


# ---------------------------------------------------------------- the command


def run_all(s: Settings, backends: tuple[str, ...], *, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    data = _data(s)
    sweep_backend = backends[0]
    total = (len(RHOS) * 2 * len(backends) + len(MODES) * len(backends) * s.steps
             + len(s.taus) * len(s.sweep_seeds) * s.steps)
    t0 = time.perf_counter()
    with _one_torch_thread(backends), tqdm(total=total, disable=not progress, unit="step", dynamic_ncols=True) as bar:
        bar.set_description("gradient through time")
        gtt = gradient_through_time(s, data, backends, bar)
        bar.set_description("training")
        runs = [train_run(b, s, data, _clip(s, mode), s.seed, bar) for mode in MODES for b in backends]
        bar.set_description(f"tau sweep ({sweep_backend})")
        sweep = [train_run(sweep_backend, s, data, _clip(s, "norm", tau), seed, bar)
                 for tau in s.taus for seed in s.sweep_seeds]
    return {
        "settings": asdict(s), "backends": list(backends), "sgd_eps": SGD_EPS, "divergence_factor": DIVERGENCE_FACTOR,
        "unigram_entropy": data.unigram_entropy, "vocab_size": len(data.vocab), "gradient_through_time": gtt,
        "training": runs, "training_agreement": _training_agreement(runs, backends), "sweep_backend": sweep_backend,
        "sweep": [{k: v for k, v in r.items() if k not in ("loss", "grad_norm", "clipped", "spectral_radius")} for r in sweep],
        "seconds": round(time.perf_counter() - t0, 1),
        # Adam's step lr*g/(sqrt(v)+eps) is SGD's (lr/eps)*g to within sqrt(v)/eps <= (largest gradient norm)/eps.
        "sgd_deviation_bound": max(r["max_grad_norm"] for r in runs + sweep) / SGD_EPS,
    }


@contextlib.contextmanager
def _one_torch_thread(backends):
    """On a small CPU, torch's intra-op threads make these tiny ops far slower; use one, then restore."""
    if "torch" not in backends:
        yield
        return
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _training_agreement(runs: list[dict], backends) -> dict | None:
    """Per clipping mode: the steps over which the two backends' losses agree to 1e-9 (relative)."""
    if len(backends) < 2:
        return None
    out = {}
    for mode in MODES:
        a, b = (np.asarray(next(r["loss"] for r in runs if r["mode"] == mode and r["backend"] == k)) for k in backends)
        close = np.abs(a - b) <= 1e-9 * np.maximum(np.abs(a), np.abs(b))
        out[mode] = {"steps_equal": int(np.argmin(close)) if not close.all() else len(a), "steps": len(a)}
    return out


def add_parser(sub) -> None:
    from charclip.cli import HelpFormatter  # imported here: cli imports this module to register it

    p = sub.add_parser(
        "explode", help="show exploding gradients and what clipping does about them, in both backends",
        description="Measure the gradient through time of a vanilla RNN for several spectral radii, train from an "
        "unstable start with no clipping, value clipping and norm clipping, and sweep the norm threshold. Writes "
        "report.md, results.json and figures to --out and prints a summary (docs/exploding-gradients.md).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--out", metavar="DIR", help="folder for report.md, results.json and figures (default: runs/explode-<time>)")
    p.add_argument("--quick", action="store_true", help="fewer steps and thresholds: under a minute")
    p.add_argument("--backend", choices=("torch", "jax", "both"), default="both", help="framework(s) to run in")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_main)


def _main(a) -> int:
    backends = BACKENDS if a.backend == "both" else (a.backend,)
    for b in backends:
        backend_module(b, "explode")  # a missing framework fails here, in one line
    out = Path(a.out or f"runs/explode-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CharclipError(f"cannot create the output folder {out}: {e.strerror}; pass another --out") from None
    results = run_all(QUICK if a.quick else DEFAULT, backends, progress=not a.no_progress)
    results["quick"] = a.quick
    write_report(results, out)
    print(summary(results, out))
    return 0


# ---------------------------------------------------------------- figures and report


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_gradient_through_time(gtt: dict, backends, path: Path) -> Path:
    """One panel per input regime: ||dL/dh_{T-k}|| / ||dL/dh_T|| against k, measured and rho^k."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    titles = {"linear": "tiny inputs: tanh stays linear", "initialised": "inputs as initialised: tanh saturates"}
    for ax, (regime, curves) in zip(axes, gtt["regimes"].items()):
        for i, c in enumerate(curves.values()):
            n0 = c["norms"][backends[0]][0]
            k = np.arange(len(c["rho_k"]))
            ax.semilogy(k, np.array(c["norms"][backends[0]]) / n0, color=f"C{i}", lw=1.8,
                        label=f"rho = {c['rho']:g} ({backends[0]})")
            if len(backends) > 1:
                ax.semilogy(k[::5], np.array(c["norms"][backends[1]])[::5] / n0, "o", color=f"C{i}", ms=4, mfc="none",
                            label=f"rho = {c['rho']:g} ({backends[1]})")
            ax.semilogy(k, np.array(c["rho_k"]) / n0, ":", color=f"C{i}", lw=1)
        ax.set_title(titles[regime])
        ax.set_xlabel("k (steps back from the loss)")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("||dL/dh_{T-k}|| / ||dL/dh_T||   (dotted: rho^k)")
    axes[1].legend(fontsize=7, ncol=2, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bounds(gtt: dict, backends, path: Path) -> Path:
    """For every rho and regime: the measured norm against rho^k and the two Jacobian bounds."""
    plt = _plt()
    regimes = gtt["regimes"]
    fig, axes = plt.subplots(len(regimes), len(RHOS), figsize=(3 * len(RHOS), 3 * len(regimes)), sharex=True)
    for row, (regime, curves) in zip(axes, regimes.items()):
        for ax, c in zip(row, curves.values()):
            k = np.arange(len(c["rho_k"]))
            ax.semilogy(k, c["norm_bound"], color="C3", lw=1, label="prod max(1-h²) ||W_hh||₂")
            ax.semilogy(k, c["jacobian_product"], color="C1", lw=1.5, label="prod ||diag(1-h²) W_hh||₂")
            ax.semilogy(k, c["rho_k"], ":", color="k", lw=1, label="rho^k")
            ax.semilogy(k, c["norms"][backends[0]], color="C0", lw=2, label="measured")
            ax.set_title(f"{regime}, rho = {c['rho']:g}", fontsize=9)
            ax.grid(alpha=0.3, which="both")
    for ax in axes[-1]:
        ax.set_xlabel("k")
    for ax in axes[:, 0]:
        ax.set_ylabel("||dL/dh_{T-k}||")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _label(r: dict) -> str:
    if r["mode"] == "norm":
        return f"norm clip tau={r['tau']:g} ({r['clipped_fraction']:.0%} clipped)"
    return f"value clip v={r['v']:g}" if r["mode"] == "value" else "no clipping"


def plot_training(results: dict, path: Path) -> Path:
    """Loss and pre-clip gradient norm per step; a column per backend, a colour per clipping mode."""
    plt = _plt()
    backends = results["backends"]
    fig, axes = plt.subplots(3, len(backends), figsize=(6.5 * len(backends), 9.5), sharex=True, squeeze=False)
    for col, b in enumerate(backends):
        for i, mode in enumerate(MODES):
            r = next(r for r in results["training"] if r["backend"] == b and r["mode"] == mode)
            steps = np.arange(1, len(r["loss"]) + 1)
            loss = np.array(r["loss"], dtype=float)
            axes[0, col].plot(steps, loss, color=f"C{i}", lw=0.9, label=_label(r))
            if r["first_nonfinite_step"]:
                axes[0, col].axvline(r["first_nonfinite_step"], color=f"C{i}", ls="--", lw=1,
                                     label=f"{mode}: loss not finite from step {r['first_nonfinite_step']}")
            axes[1, col].semilogy(steps, np.array(r["grad_norm"], dtype=float), color=f"C{i}", lw=0.7)
            axes[2, col].semilogy(steps, np.array(r["spectral_radius"], dtype=float), color=f"C{i}", lw=1)
        s = results["settings"]
        axes[0, col].axhline(DIVERGENCE_FACTOR * results["training"][0]["first_loss"], color="k", ls=":", lw=1,
                             label=f"{DIVERGENCE_FACTOR:g} x first loss (divergence)")
        axes[0, col].axhline(results["unigram_entropy"], color="gray", ls="--", lw=1, label="unigram entropy")
        axes[0, col].set_title(f"{b}: rho = {s['rho']:g}, SGD lr = {s['sgd_lr']:g}")
        axes[0, col].set_ylabel("training loss (nats/char)")
        axes[0, col].legend(fontsize=7)
        axes[1, col].axhline(s["max_norm"], color="C2", ls="--", lw=1, label=f"tau = {s['max_norm']:g}")
        axes[1, col].set_ylabel("gradient norm before clipping")
        axes[1, col].legend(fontsize=7)
        axes[2, col].axhline(1.0, color="k", ls=":", lw=1)
        axes[2, col].set_ylabel("spectral radius of W_hh")
        axes[2, col].set_xlabel("step")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(results: dict, path: Path) -> Path:
    """Final validation loss against tau; diverged runs drawn at the top as crosses."""
    plt = _plt()
    sweep = results["sweep"]
    taus = np.array(sorted({r["tau"] for r in sweep}))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ok = [r for r in sweep if not r["diverged"]]
    bad = [r for r in sweep if r["diverged"]]
    ax.semilogx([r["tau"] for r in ok], [r["val_loss"] for r in ok], "o", color="C0", label="converged or slow")
    finite = [r["val_loss"] for r in sweep if math.isfinite(r["val_loss"])]
    top = max(finite + [results["unigram_entropy"]]) * 1.05
    ax.semilogx([r["tau"] for r in bad], [min(r["val_loss"], top) if math.isfinite(r["val_loss"]) else top for r in bad],
                "x", color="C3", ms=9, mew=2, label="diverged (NaN drawn at the top)")
    med = [np.median([r["val_loss"] if math.isfinite(r["val_loss"]) else top for r in sweep if r["tau"] == t]) for t in taus]
    ax.semilogx(taus, med, "-", color="C0", lw=1, alpha=0.6, label="median over seeds")
    ax.axhline(results["unigram_entropy"], color="gray", ls="--", lw=1, label="unigram entropy")
    ax.set_xlabel("norm-clipping threshold tau")
    ax.set_ylabel(f"validation loss after {results['settings']['steps']} steps")
    ax.set_title(f"{results['sweep_backend']}: rho = {results['settings']['rho']:g}, SGD lr = {results['settings']['sgd_lr']:g}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _json_safe(x):
    """NaN and infinities as null: results.json stays strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _fmt(x) -> str:
    return "NaN" if x is None or not math.isfinite(x) else f"{x:.3f}"


def write_report(results: dict, out: Path) -> Path:
    """results.json, four figures and report.md in `out`."""
    backends = results["backends"]
    gtt = results["gradient_through_time"]
    (out / "results.json").write_text(json.dumps(_json_safe(results), separators=(",", ":")), encoding="utf-8")
    figs = {
        "gtt": plot_gradient_through_time(gtt, backends, out / "gradient-through-time.png").name,
        "bounds": plot_bounds(gtt, backends, out / "jacobian-bounds.png").name,
        "train": plot_training(results, out / "training.png").name,
        "sweep": plot_sweep(results, out / "threshold-sweep.png").name,
    }
    s = results["settings"]
    T = gtt["seq_len"]
    lines = [
        "# Exploding gradients and their cure", "",
        f"`charclip explode{' --quick' if results['quick'] else ''}`, backends: {', '.join(backends)}; "
        f"{results['seconds']:.0f} s. Vanilla RNN (tanh), 1 x {s['hidden']} hidden, embedding {s['embed']}, "
        f"vocabulary {results['vocab_size']}, float64. Explained in docs/exploding-gradients.md.", "",
        "## 1. Gradient through time", "",
        f"Loss at the last of T = {T} steps, {gtt['batch']} sequences; norm of dL/dh_(T-k) for k = 0..T. "
        f"'linear': embeddings x {gtt['linear_input_scale']:g}, no biases; 'initialised': the weights as drawn.", "",
        f"![gradient through time]({figs['gtt']})", "", f"![bounds]({figs['bounds']})", "",
        f"| rho | ‖W_hh‖₂ | growth/step, linear | ‖dL/dh_0‖/‖dL/dh_T‖, linear | growth/step, initialised | "
        f"‖dL/dh_0‖/‖dL/dh_T‖, initialised | min tanh', initialised |",
        "|---|---|---|---|---|---|---|",
    ]
    lin, ini = gtt["regimes"]["linear"], gtt["regimes"]["initialised"]
    for key in lin:
        a, b = lin[key], ini[key]
        na, nb = a["norms"][backends[0]], b["norms"][backends[0]]
        lines.append(f"| {a['rho']:g} | {a['w_hh_norm2']:.2f} | {a['growth_per_step']:.3f} | {na[-1] / na[0]:.3g} | "
                     f"{b['growth_per_step']:.3f} | {nb[-1] / nb[0]:.3g} | {b['min_tanh_derivative']:.2g} |")
    if gtt["max_rel_diff_torch_jax"] is not None:
        lines += ["", f"torch and JAX: largest relative difference over all curves and k: "
                      f"{gtt['max_rel_diff_torch_jax']:.1e}."]
    lines += [
        "", "## 2. Training from an unstable start", "",
        f"W_hh at spectral radius {s['rho']:g}; plain SGD with learning rate {s['sgd_lr']:g} (Adam with beta1 = 0 and "
        f"eps = {results['sgd_eps']:g}, lr = {s['sgd_lr']:g} x eps, whose step differs from SGD's by at most "
        f"{results['sgd_deviation_bound']:.1e} relative in every run here); {s['steps']} steps of batch {s['batch_size']} x "
        f"{s['seq_len']} on the first {s['corpus_chars']:,} characters of the embedded corpus; seed {s['seed']}. "
        f"Diverged: a non-finite loss or one over {results['divergence_factor']:g} x the first. Converged: not "
        f"diverged and a validation loss under the unigram entropy ({results['unigram_entropy']:.3f} nats/char).", "",
        f"![training]({figs['train']})", "",
        "| backend | clipping | first loss | max loss | final loss | validation loss | steps clipped | max grad norm "
        "| max spectral radius of W_hh | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["training"]:
        clipped = f"{r['clipped_fraction']:.0%}" if r["mode"] == "norm" else "-"
        verdict_text = "diverged" if r["diverged"] else "converged" if r["converged"] else "did not converge"
        what = f"norm, tau = {r['tau']:g}" if r["mode"] == "norm" else f"value, v = {r['v']:g}" if r["mode"] == "value" else "none"
        lines.append(f"| {r['backend']} | {what} | {_fmt(r['first_loss'])} | {_fmt(r['max_loss'])} | {_fmt(r['final_loss'])} | "
                     f"{_fmt(r['val_loss'])} | {clipped} | {r['max_grad_norm']:.3g} | {np.nanmax(r['spectral_radius']):.3g} | {verdict_text} |")
    if results["training_agreement"]:
        lines += ["", "Steps over which the torch and JAX losses agree to 1e-9: " + ", ".join(
            f"{m}: {a['steps_equal']}/{a['steps']}" for m, a in results["training_agreement"].items())
            + " (after a spike, rounding differences grow chaotically)."]
    lines += [
        "", f"## 3. Threshold sweep ({results['sweep_backend']})", "",
        f"Norm clipping at each tau, seeds {', '.join(map(str, s['sweep_seeds']))}, otherwise as above.", "",
        f"![threshold sweep]({figs['sweep']})", "",
        "| tau | validation loss per seed | diverged | steps clipped |", "|---|---|---|---|",
    ]
    for tau in sorted({r["tau"] for r in results["sweep"]}):
        rs = [r for r in results["sweep"] if r["tau"] == tau]
        vals = ", ".join(_fmt(r["val_loss"]) for r in rs)
        fractions = ", ".join(f"{r['clipped_fraction']:.0%}" for r in rs)
        lines.append(f"| {tau:g} | {vals} | {sum(r['diverged'] for r in rs)}/{len(rs)} | {fractions} |")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _sweep_medians(sweep: list[dict]) -> dict[float, float]:
    """Median validation loss over seeds per tau; a NaN counts as the worst."""
    return {t: float(np.median([r["val_loss"] if math.isfinite(r["val_loss"]) else math.inf for r in sweep if r["tau"] == t]))
            for t in sorted({r["tau"] for r in sweep})}


def summary(results: dict, out: Path) -> str:
    gtt = results["gradient_through_time"]
    b0 = results["backends"][0]
    lin = gtt["regimes"]["linear"]
    lines = [f"gradient through time (T = {gtt['seq_len']}, tiny inputs): ‖dL/dh_0‖/‖dL/dh_T‖ = "
             + ", ".join(f"{c['norms'][b0][-1] / c['norms'][b0][0]:.2g} at rho {c['rho']:g}" for c in lin.values())]
    if gtt["max_rel_diff_torch_jax"] is not None:
        lines.append(f"torch and JAX agree to {gtt['max_rel_diff_torch_jax']:.1e} (relative)")
    for r in results["training"]:
        state = "diverged" if r["diverged"] else "converged" if r["converged"] else "did not converge"
        lines.append(f"{r['backend']:5s} {_label(r):40s} max loss {_fmt(r['max_loss'])}, validation {_fmt(r['val_loss'])}: {state}")
    medians = _sweep_medians(results["sweep"])
    best = min(medians, key=medians.get)
    bad = ", ".join(f"{t:g}" for t in sorted({r["tau"] for r in results["sweep"] if r["diverged"]})) or "none"
    lines.append(f"threshold sweep: best median validation loss {medians[best]:.3f} at tau = {best:g}; diverged at tau = {bad}")
    lines.append(f"report: {out / 'report.md'}")
    return "\n".join(lines)
