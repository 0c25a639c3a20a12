"""The NumPy witness (hand-written BPTT, no autodiff) agrees with both autodiff backends,
and with finite differences, which depend on neither."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F

from charclip import witness
from charclip.config import ModelConfig
from charclip.jax import model as jax_model
from charclip.torch import model as torch_model
from charclip.weights import init_params

# float64 everywhere: a handful of matmuls over T steps round to ~1e-15 relative.
RTOL = 1e-10  # float64 single-step agreement, as in the parity ladder


def _case(layers: int, seed: int = 0, B: int = 3, T: int = 6):
    cfg = ModelConfig(vocab_size=9, cell="rnn", hidden_size=7, num_layers=layers, embedding_dim=4)
    params = init_params(cfg, seed, "float64")
    rng = np.random.default_rng(seed + 100)
    x, y = rng.integers(0, 9, (B, T)), rng.integers(0, 9, (B, T))
    h0 = np.tanh(rng.standard_normal((layers, B, 7)))  # (L, B, H)
    return cfg, params, x, y, h0


def _torch(cfg, params, x, y, h0):
    model = torch_model.build(cfg, params)
    logits, h = model(torch.from_numpy(x), torch.from_numpy(h0))
    loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), torch.from_numpy(y).reshape(-1))
    loss.backward()
    grads = {k: p.grad.numpy() for k, p in model.named_parameters()}
    return logits.detach().numpy(), h.detach().numpy(), loss.item(), grads


def _jax(cfg, params, x, y, h0):
    p = {k: jnp.asarray(v) for k, v in params.items()}
    logits, _ = jax_model.apply(p, x, (jnp.asarray(h0),), cfg=cfg)
    (loss, (h,)), grads = jax.value_and_grad(jax_model.loss, has_aux=True)(
        p, x, y, (jnp.asarray(h0),), cfg=cfg
    )
    return (
        np.asarray(logits),
        np.asarray(h),
        float(loss),
        {k: np.asarray(v) for k, v in grads.items()},
    )


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_witness_agrees_with_autodiff(backend, layers):
    cfg, params, x, y, h0 = _case(layers)
    logits, h, loss, grads = (_torch if backend == "torch" else _jax)(cfg, params, x, y, h0)
    w_logits, w_h, _ = witness.forward(params, x, h0)
    w_loss, w_grads, w_final = witness.loss_and_grads(params, x, y, h0)
    np.testing.assert_allclose(w_logits, logits, rtol=RTOL, atol=0, err_msg="logits")
    np.testing.assert_allclose(w_h, h, rtol=RTOL, atol=0, err_msg="final state")
    np.testing.assert_array_equal(w_final, w_h)
    np.testing.assert_allclose(w_loss, loss, rtol=RTOL, err_msg="loss")
    assert w_grads.keys() == grads.keys()
    for name in grads:
        # Relative to the tensor's largest entry: entries near zero carry absolute rounding only.
        scale = np.abs(grads[name]).max()
        np.testing.assert_allclose(
            w_grads[name], grads[name], rtol=0, atol=RTOL * scale, err_msg=f"grad {name}"
        )


def test_witness_gradient_matches_finite_differences():
    """Central differences, step 1e-6: truncation ~1e-12 and cancellation ~1e-10 of the loss (~2)."""
    cfg, params, x, y, h0 = _case(layers=2, seed=3, B=2, T=5)
    _, grads, _ = witness.loss_and_grads(params, x, y, h0)
    rng = np.random.default_rng(0)
    for name, value in params.items():
        for idx in (tuple(rng.integers(0, n) for n in value.shape) for _ in range(3)):
            if name == "embedding.weight":
                idx = (
                    int(x[0, 0]),
                    idx[1],
                )  # a row the batch uses, so the gradient is not trivially zero
            hi, lo = dict(params), dict(params)
            hi[name], lo[name] = value.copy(), value.copy()
            hi[name][idx] += 1e-6
            lo[name][idx] -= 1e-6
            numeric = (
                witness.loss_and_grads(hi, x, y, h0)[0] - witness.loss_and_grads(lo, x, y, h0)[0]
            ) / 2e-6
            # 1e-9 absolute: the loss (~2) loses ~1e-16/1e-6 = 1e-10 to cancellation, the truncation ~1e-12.
            np.testing.assert_allclose(
                grads[name][idx], numeric, rtol=0, atol=1e-9, err_msg=f"{name}{idx}"
            )


def test_witness_clipping_is_each_librarys_formula():
    cfg, params, x, y, h0 = _case(layers=2)
    _, grads, _ = witness.loss_and_grads(params, x, y, h0)
    norm = witness.global_norm(grads)
    tau, v = 0.3 * norm, 0.5 * max(np.abs(g).max() for g in grads.values())

    tensors = {k: torch.from_numpy(g.copy()) for k, g in grads.items()}
    for k, t in tensors.items():
        t.grad = t.clone()
    torch_norm = torch.nn.utils.clip_grad_norm_(list(tensors.values()), tau).item()
    torch_clipped = {k: t.grad.numpy() for k, t in tensors.items()}
    w_torch, w_norm = witness.clip_by_global_norm(grads, tau, eps=1e-6)  # torch's convention
    np.testing.assert_allclose(w_norm, torch_norm, rtol=RTOL, err_msg="norm vs torch")
    np.testing.assert_allclose(
        w_norm, float(optax.tree.norm(grads)), rtol=RTOL, err_msg="norm vs optax"
    )

    j = {k: jnp.asarray(g) for k, g in grads.items()}
    optax_clipped, _ = optax.clip_by_global_norm(tau).update(j, optax.EmptyState())
    w_optax, _ = witness.clip_by_global_norm(grads, tau)  # eps = 0: optax's convention
    optax_value, _ = optax.clip(v).update(j, optax.EmptyState())
    for name in grads:
        scale = np.abs(grads[name]).max()
        np.testing.assert_allclose(
            w_torch[name], torch_clipped[name], rtol=0, atol=RTOL * scale, err_msg=f"torch {name}"
        )
        np.testing.assert_allclose(
            w_optax[name],
            np.asarray(optax_clipped[name]),
            rtol=0,
            atol=RTOL * scale,
            err_msg=f"optax {name}",
        )
        np.testing.assert_array_equal(
            witness.clip_by_value(grads, v)[name], np.asarray(optax_value[name]), err_msg=name
        )
    # What clipping promises: the clipped norm is the threshold, and a gradient inside it is untouched.
    np.testing.assert_allclose(witness.global_norm(w_optax), tau, rtol=1e-14)
    small, _ = witness.clip_by_global_norm(grads, 2 * norm)
    for name in grads:
        np.testing.assert_array_equal(small[name], grads[name])


@pytest.mark.parametrize("eps", (0.0, 1e-6))
@pytest.mark.parametrize("tau", (0.0, 1.0))
def test_witness_leaves_a_zero_gradient_zero(eps, tau):
    """0 / 0 at tau = 0 with optax's eps = 0 once raised ZeroDivisionError here."""
    zeros = {"w": np.zeros((2, 3)), "b": np.zeros(3)}
    clipped, norm = witness.clip_by_global_norm(zeros, tau, eps=eps)
    assert norm == 0.0
    for name in zeros:
        np.testing.assert_array_equal(clipped[name], zeros[name], err_msg=name)
