"""The experiments of `charclip explode`: exploding gradients and their cure, measured in both backends.

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

import contextlib
import math
import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from charclip import corpus
from charclip.backends import module as backend_module
from charclip.batching import Position, Streams, split
from charclip.config import ClipConfig, ModelConfig, TrainConfig
from charclip.run import DIVERGENCE_FACTOR
from charclip.run import diverged as _diverged
from charclip.vocab import Vocab
from charclip.weights import init_params, scale_spectral_radius

RHOS = (0.5, 0.9, 1.0, 1.1, 1.5, 2.0)
LINEAR_INPUT_SCALE = (
    1e-20  # embeddings times this, biases zero: h_t stays ~1e-5 even at rho = 2, T = 50
)
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
    return _Data(
        vocab,
        Streams(train_tok, s.batch_size, s.seq_len),
        Streams(val_tok, s.batch_size, s.seq_len, what="validation text"),
        float(-(p * np.log(p)).sum()),
    )


def _model(s: Settings, vocab: Vocab) -> ModelConfig:
    return ModelConfig(
        vocab_size=len(vocab), cell="rnn", hidden_size=s.hidden, num_layers=1, embedding_dim=s.embed
    )


def _params(
    model_cfg: ModelConfig, rho: float, seed: int, *, linear: bool = False
) -> dict[str, np.ndarray]:
    """The model's initial float64 weights with W_hh scaled to spectral radius rho."""
    p = init_params(model_cfg, seed, "float64")
    p["rnn.weight_hh_l0"] = scale_spectral_radius(p["rnn.weight_hh_l0"], rho)
    if linear:  # tiny inputs and no biases: tanh(z) = z to ~1e-10, so the Jacobians are W_hh alone
        p["embedding.weight"] = p["embedding.weight"] * LINEAR_INPUT_SCALE
        p["rnn.bias_ih_l0"] = np.zeros_like(p["rnn.bias_ih_l0"])
        p["rnn.bias_hh_l0"] = np.zeros_like(p["rnn.bias_hh_l0"])
    return p


# ---------------------------------------------------------------- experiment 1


def jacobian_bounds(
    norms: np.ndarray, states: np.ndarray, w_hh: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Two upper bounds on ||dL/dh_{T-k}||, k = 0..T, for a one-layer tanh RNN.

    dh_t/dh_{t-1} = diag(1 - h_t^2) W_hh =: J_t, so dL/dh_{T-k} = J_{T-k+1}^T ... J_T^T dL/dh_T and
    ||dL/dh_{T-k}|| <= ||dL/dh_T|| prod_t ||J_t||_2 <= ||dL/dh_T|| prod_t max_i(1 - h_{t,i}^2) ||W_hh||_2.
    Both are taken per sequence and maximised over the batch (the batch norm is a root of a sum of
    per-sequence squares). `states` is (T+1, 1, B, H) as returned by `grad_through_time`.
    """
    h = states[1:, 0]  # (T, B, H): h_1..h_T
    d = 1.0 - h**2  # tanh'(z_t) = 1 - h_t^2
    jac = np.linalg.norm(
        d[..., :, None] * w_hh[None, None], ord=2, axis=(-2, -1)
    )  # (T, B): ||diag(d) W_hh||_2
    loose = d.max(axis=-1) * np.linalg.norm(w_hh, ord=2)  # (T, B)

    def backward_product(
        per_step: np.ndarray,
    ) -> np.ndarray:  # k = 0..T: product over the last k steps
        prods = np.concatenate(
            [np.ones((1, per_step.shape[1])), np.cumprod(per_step[::-1], axis=0)]
        )
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
                measured[b] = backend_module(b, "explode").grad_through_time(
                    model_cfg, params, x, y
                )
                bar.update(1)
            norms, states = measured[backends[0]]
            jac, loose = jacobian_bounds(norms, states, params["rnn.weight_hh_l0"])
            k = np.arange(len(norms))
            curves[f"{rho:g}"] = {
                "rho": rho,
                "norms": {b: measured[b][0].tolist() for b in backends},
                "rho_k": (norms[0] * rho**k).tolist(),
                "jacobian_product": jac.tolist(),
                "norm_bound": loose.tolist(),
                "w_hh_norm2": float(np.linalg.norm(params["rnn.weight_hh_l0"], ord=2)),
                "growth_per_step": growth_per_step(norms),
                "max_abs_h": float(np.abs(states).max()),
                "min_tanh_derivative": float((1 - states[1:] ** 2).min()),
            }
        regimes[regime] = curves
    agreement = None
    if len(backends) == 2:
        agreement = max(
            _rel_diff(np.array(c["norms"]["torch"]), np.array(c["norms"]["jax"]))
            for curves in regimes.values()
            for c in curves.values()
        )
    return {
        "seq_len": s.grad_seq_len,
        "batch": s.grad_batch,
        "linear_input_scale": LINEAR_INPUT_SCALE,
        "regimes": regimes,
        "max_rel_diff_torch_jax": agreement,
    }


def _rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a - b| / max(|a|, |b|), entry by entry (the norms span 30 orders of magnitude)."""
    return float(
        np.max(np.abs(a - b) / np.maximum(np.maximum(np.abs(a), np.abs(b)), np.finfo(float).tiny))
    )


# ---------------------------------------------------------------- experiments 2 and 3


def _clip(s: Settings, mode: str, tau: float | None = None) -> ClipConfig:
    if mode == "norm":
        return ClipConfig(mode="norm", max_norm=s.max_norm if tau is None else tau)
    if mode == "value":
        return ClipConfig(mode="value", max_value=s.max_value)
    return ClipConfig(mode="none")


def train_config(s: Settings, clip: ClipConfig, seed: int) -> TrainConfig:
    """Adam turned into SGD with learning rate `s.sgd_lr` (module docstring); float64, NaN carried on."""
    return TrainConfig(
        steps=s.steps,
        batch_size=s.batch_size,
        seq_len=s.seq_len,
        lr=s.sgd_lr * SGD_EPS,
        beta1=0.0,
        eps=SGD_EPS,
        seed=seed,
        dtype="float64",
        nonfinite="propagate",
        clip=clip,
    )


def train_run(backend: str, s: Settings, data: _Data, clip: ClipConfig, seed: int, bar) -> dict:
    """One run from the unstable start; per-step loss, pre-clip norm and clipping, and the final validation loss."""
    model_cfg = _model(s, data.vocab)
    cfg = train_config(s, clip, seed)
    trainer = backend_module(backend, "train").Trainer(
        model_cfg, cfg, _params(model_cfg, s.rho, seed)
    )
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
    return {
        "backend": backend,
        "mode": clip.mode,
        "tau": clip.max_norm if clip.mode == "norm" else None,
        "v": clip.max_value if clip.mode == "value" else None,
        "seed": seed,
        **verdict(loss, val, data.unigram_entropy),
        "clipped_fraction": float(np.mean(clipped)),
        "max_grad_norm": float(np.nanmax(norm)),
        "loss": loss,
        "grad_norm": norm,
        "clipped": clipped,
        "spectral_radius": radius,
    }


def _spectral_radius(w: np.ndarray) -> float:
    """Largest |eigenvalue| of W_hh after a step; NaN once the weights are."""
    return float(np.max(np.abs(np.linalg.eigvals(w)))) if np.isfinite(w).all() else math.nan


def verdict(loss: list[float], val_loss: float, unigram_entropy: float) -> dict:
    """Diverged: a loss not finite or over DIVERGENCE_FACTOR x the first (charclip train's rule).
    Converged: not diverged, and the validation loss under the unigram entropy, which a model
    that has learned nothing about context cannot beat."""
    arr = np.asarray(loss, dtype=float)
    bad = ~np.isfinite(arr)
    diverged = _diverged(arr) or not math.isfinite(val_loss)
    tail = arr[-max(len(arr) // 10, 1) :]
    return {
        "first_loss": float(arr[0]),
        "max_loss": float(np.nanmax(arr)) if np.isfinite(arr).any() else None,
        "final_loss": float(np.mean(tail)),
        "val_loss": val_loss,
        "first_nonfinite_step": int(np.argmax(bad)) + 1 if bad.any() else None,
        "diverged": diverged,
        "converged": not diverged and val_loss < unigram_entropy,
    }


# ---------------------------------------------------------------- the command


def run_all(s: Settings, backends: tuple[str, ...], *, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    data = _data(s)
    sweep_backend = backends[0]
    total = (
        len(RHOS) * 2 * len(backends)
        + len(MODES) * len(backends) * s.steps
        + len(s.taus) * len(s.sweep_seeds) * s.steps
    )
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        for b in backends:  # one torch thread beside XLA's pool (charclip.torch.probe.one_thread)
            stack.enter_context(backend_module(b, "probe").one_thread())
        bar = stack.enter_context(
            tqdm(total=total, disable=not progress, unit="step", dynamic_ncols=True)
        )
        bar.set_description("gradient through time")
        gtt = gradient_through_time(s, data, backends, bar)
        bar.set_description("training")
        runs = [
            train_run(b, s, data, _clip(s, mode), s.seed, bar) for mode in MODES for b in backends
        ]
        bar.set_description(f"tau sweep ({sweep_backend})")
        sweep = [
            train_run(sweep_backend, s, data, _clip(s, "norm", tau), seed, bar)
            for tau in s.taus
            for seed in s.sweep_seeds
        ]
    return {
        "settings": asdict(s),
        "backends": list(backends),
        "sgd_eps": SGD_EPS,
        "divergence_factor": DIVERGENCE_FACTOR,
        "unigram_entropy": data.unigram_entropy,
        "vocab_size": len(data.vocab),
        "gradient_through_time": gtt,
        "training": runs,
        "training_agreement": _training_agreement(runs, backends),
        "sweep_backend": sweep_backend,
        "sweep": [
            {
                k: v
                for k, v in r.items()
                if k not in ("loss", "grad_norm", "clipped", "spectral_radius")
            }
            for r in sweep
        ],
        "seconds": round(time.perf_counter() - t0, 1),
        # Adam's step lr*g/(sqrt(v)+eps) is SGD's (lr/eps)*g to within sqrt(v)/eps <= (largest gradient norm)/eps.
        "sgd_deviation_bound": max(r["max_grad_norm"] for r in runs + sweep) / SGD_EPS,
    }


def _training_agreement(runs: list[dict], backends) -> dict | None:
    """Per clipping mode: the steps over which the two backends' losses agree to 1e-9 (relative)."""
    if len(backends) < 2:
        return None
    out = {}
    for mode in MODES:
        a, b = (
            np.asarray(next(r["loss"] for r in runs if r["mode"] == mode and r["backend"] == k))
            for k in backends
        )
        close = np.abs(a - b) <= 1e-9 * np.maximum(np.abs(a), np.abs(b))
        out[mode] = {
            "steps_equal": int(np.argmin(close)) if not close.all() else len(a),
            "steps": len(a),
        }
    return out
