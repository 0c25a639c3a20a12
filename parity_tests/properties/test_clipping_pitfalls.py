"""Where real training loops put clipping wrong, shown numerically (docs/clipping.md, "Three pitfalls").

1. Clipping loss-scaled gradients before unscaling them clips at the wrong threshold.
2. Clipping each micro-batch instead of the accumulated gradient bends its direction
   (parity_tests/parity/test_accumulation_and_schedules.py, test_clipping_each_micro_batch_instead_bends_the_gradient).
3. The threshold bounds the gradient, the schedule scales the step: with SGD a clipped
   step moves the parameters by at most lr_t * tau, whatever the schedule says lr_t is.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from charclip import backends, schedules
from charclip.config import ClipConfig, ModelConfig
from charclip.explode import train_config
from charclip.explode.experiments import SGD_EPS, Settings
from charclip.weights import init_params


def _model_and_loss(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    return (
        model,
        lambda: torch.nn.functional.mse_loss(model(x), y) * 100,
    )  # large enough to need clipping


def _norm(model) -> float:
    return float(
        torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()])
        )
    )


@pytest.mark.parametrize("scale", [2.0**8, 2.0**16])
def test_clipping_before_unscaling_clips_the_scaled_gradient(scale):
    """GradScaler multiplies the loss by S; its gradients are S times the true ones until unscale_."""
    tau = 1.0
    model, loss_fn = _model_and_loss()
    loss_fn().backward()
    true_norm = _norm(model)
    assert true_norm > tau, "the example must need clipping"

    def clipped_norm(order: str) -> float:
        model.zero_grad()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        scaler.scale(loss_fn()).backward()
        if order == "clip, then unscale (wrong)":
            torch.nn.utils.clip_grad_norm_(model.parameters(), tau)
            scaler.unscale_(opt)
        else:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), tau)
        return _norm(model)

    right, wrong = (
        clipped_norm("unscale, then clip (right)"),
        clipped_norm("clip, then unscale (wrong)"),
    )
    # float32 gradients, one multiply each by tau / (n + 1e-6): a few float32 ulps of tau.
    assert right == pytest.approx(tau, rel=1e-5)
    # Clipped to tau while still S times too large, then divided by S: tau / S, far below tau.
    assert wrong == pytest.approx(tau / scale, rel=1e-5), (
        f"wrong order left norm {wrong}, expected tau/S = {tau / scale}"
    )


@pytest.mark.parametrize("scale", [2.0**8, 2.0**16])
def test_in_jax_too_clipping_before_unscaling_clips_the_scaled_gradient(scale):
    """The same mistake spelled with optax: clip_by_global_norm chained before the unscaling
    (what charclip's JAX step does the other way round: charclip.jax.train.unscale, then the chain)."""
    import jax
    import jax.numpy as jnp
    import optax

    from charclip.jax.train import unscale

    tau = 1.0
    rng = np.random.default_rng(0)
    w, x = (
        jnp.asarray(rng.standard_normal((6, 3)), jnp.float32),
        jnp.asarray(rng.standard_normal((16, 6)), jnp.float32),
    )

    def loss(w):
        return jnp.sum((x @ w) ** 2)

    true = jax.grad(loss)(w)
    assert float(optax.tree.norm(true)) > tau, "the example must need clipping"
    scaled = jax.grad(lambda w: loss(w) * scale)(w)
    clip = optax.clip_by_global_norm(tau)
    right, _ = clip.update(unscale(scaled, jnp.float32(scale))[0], clip.init(w))
    wrong, _ = clip.update(scaled, clip.init(w))
    wrong = unscale(wrong, jnp.float32(scale))[0]
    # float32, one multiply by tau / norm: a few ulps of tau.
    assert float(optax.tree.norm(right)) == pytest.approx(tau, rel=1e-5)
    assert float(optax.tree.norm(wrong)) == pytest.approx(tau / scale, rel=1e-5)


def test_a_clipped_sgd_step_moves_at_most_lr_t_tau_under_a_schedule():
    """Adam set to act as SGD (charclip explode's setting): the step is lr_t / eps * clipped g."""
    s = Settings()
    model = ModelConfig(vocab_size=9, cell="rnn", hidden_size=8, num_layers=1, embedding_dim=4)
    tau, sgd_lr = 0.05, 0.5
    cfg = train_config(s, ClipConfig(mode="norm", max_norm=tau, impl="reference"), seed=0)
    cfg = replace(
        cfg,
        batch_size=4,
        seq_len=6,
        steps=12,
        lr=sgd_lr * SGD_EPS,
        schedule="cosine",
        warmup_steps=4,
        min_lr=0.1 * sgd_lr * SGD_EPS,
    )
    rng = np.random.default_rng(0)
    for backend in ("torch", "jax"):
        trainer = backends.trainer_factory(backend)(model, cfg, init_params(model, 0, "float64"))
        before = trainer.params_numpy()
        clipped_steps = 0
        for step in range(cfg.steps):
            lr = schedules.learning_rate(cfg, step)
            r = trainer.step(rng.integers(0, 9, (4, 6)), rng.integers(0, 9, (4, 6)), lr=lr)
            after = trainer.params_numpy()
            moved = np.sqrt(sum(np.sum((after[k] - before[k]) ** 2) for k in after))
            bound = lr / SGD_EPS * min(r.grad_norm, tau)
            # Adam-as-SGD deviates from SGD by at most max|g| / eps relative (explode's bound): ~1e-9 here.
            assert moved <= bound * (1 + 1e-6), (
                f"{backend} step {step}: moved {moved:.3e} > lr_t tau {bound:.3e}"
            )
            clipped_steps += r.clipped
            before = after
        assert clipped_steps > 0, "the threshold must act on some steps for this to say anything"
