"""The gradient of a last-step loss with respect to every hidden state, in JAX.

Mirrors `torch_impl.explode`. JAX has no `retain_grad`; its idiom is to add a
zero perturbation eps_t to each hidden state and differentiate with respect to
the perturbations: dL/d eps_t = dL/dh_t. The model's own `apply` runs
one time step per iteration of a `lax.scan`. Used by
`charclip explode` (docs/exploding-gradients.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from charclip.config import ModelConfig
from jax_impl import device as D
from jax_impl import model as M


def grad_through_time(model_cfg: ModelConfig, params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray):
    """Norms of dL/dh_{T-k} for k = 0..T, and the hidden states h_0..h_T.

    L is the cross-entropy of the last step only (mean over the batch), so the
    gradient reaching h_{T-k} has passed through exactly k recurrent Jacobians.
    h_0 is the zero initial state. Returns `norms` (T+1,), with norms[k] the
    L2 norm of dL/dh_{T-k} over all layers and sequences, and `states`
    (T+1, L, B, H).
    """
    D.enable_x64()  # float64 parameters stay float64
    p = {k: jnp.asarray(v) for k, v in params.items()}
    B, T = x.shape
    eps = jnp.zeros((T + 1, model_cfg.num_layers, B, model_cfg.hidden_size), p["head.weight"].dtype)
    grads, states = _hidden_grads(eps, p, jnp.asarray(x), jnp.asarray(y), cfg=model_cfg)
    norms = jnp.sqrt(jnp.sum(grads.reshape(T + 1, -1) ** 2, axis=1))[::-1]  # index k: h_{T-k}
    return np.asarray(norms), np.asarray(states)


def _last_loss(eps, params, x, y, *, cfg: ModelConfig):
    """Last-step cross-entropy with eps_t (zeros) added to h_t; also h_0..h_T (T+1, L, B, H)."""
    init = M.zero_state(cfg, x.shape[0], eps.dtype)

    def step(state, inputs):
        x_t, eps_t = inputs  # (B,), (L, B, H)
        _, state = M.apply(params, x_t[:, None], state, cfg=cfg)
        state = (state[0] + eps_t, *state[1:])  # h (L, B, H)
        return state, state[0]

    state0 = (init[0] + eps[0], *init[1:])
    final, hs = jax.lax.scan(step, state0, (x.T, eps[1:]))
    logits = final[0][-1] @ params["head.weight"].T + params["head.bias"][None, :]  # the top layer's h_T predicts y_T
    logp = jax.nn.log_softmax(logits, axis=-1)  # (B, V)
    loss = -jnp.mean(jnp.take_along_axis(logp, y[:, -1:], axis=-1))
    return loss, jnp.concatenate([state0[0][None], hs])


# Compiled once per shape and configuration; the weights are arguments, not constants.
_hidden_grads = jax.jit(jax.grad(_last_loss, has_aux=True), static_argnames="cfg")
