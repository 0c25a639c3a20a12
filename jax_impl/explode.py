"""The gradient of a last-step loss with respect to every hidden state, in JAX.

Mirrors `charclip.torch.explode`. JAX has no `retain_grad`; its idiom is to add a
zero perturbation eps_t to each hidden state and differentiate with respect to
the perturbations: dL/d eps_t = dL/dh_t. The model's own `apply` runs
one time step per iteration of a `lax.scan`. Used by
`charclip explode` (docs/exploding-gradients.md).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from charclip.config import ModelConfig
from charclip.jax import device as D
from charclip.jax import model as M
from charclip.jax.clipping import clip_tree_by_global_norm, global_norm


def grad_through_time(
    model_cfg: ModelConfig, params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray
):
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
    logits = (
        final[0][-1] @ params["head.weight"].T + params["head.bias"][None, :]
    )  # the top layer's h_T predicts y_T
    logp = jax.nn.log_softmax(logits, axis=-1)  # (B, V)
    loss = -jnp.mean(jnp.take_along_axis(logp, y[:, -1:], axis=-1))
    return loss, jnp.concatenate([state0[0][None], hs])


# Compiled once per shape and configuration; the weights are arguments, not constants.
_hidden_grads = jax.jit(jax.grad(_last_loss, has_aux=True), static_argnames="cfg")


# ---------------------------------------------------------------- Pascanu, Mikolov & Bengio (2013)
# The two experiments of `charclip explode --paper` (docs/paper-rerun.md), mirrored in charclip.torch.explode.


def _one_unit_loss(w, b, x0, target, steps: int):
    """E = (sigmoid(x_steps) - target)^2 for x_t = w sigmoid(x_{t-1}) + b (the paper's eq. 8, no input)."""
    x = jax.lax.fori_loop(0, steps, lambda _, x: w * jax.nn.sigmoid(x) + b, x0 + 0.0 * w + 0.0 * b)
    return (jax.nn.sigmoid(x) - target) ** 2


@partial(jax.jit, static_argnames="steps")
def _one_unit_value_and_grad(w, b, x0, target, *, steps: int):
    loss, (gw, gb) = jax.vmap(
        jax.value_and_grad(_one_unit_loss, argnums=(0, 1)), in_axes=(0, 0, None, None, None)
    )(w, b, x0, target, steps)
    return loss, gw, gb


def one_unit_loss_grad(w, b, *, x0: float, steps: int, target: float):
    """The one-unit network's error and its gradient at every (w, b): (E, dE/dw, dE/db), float64 arrays shaped
    like np.broadcast(w, b). x_0 = x0, x_t = w sigmoid(x_{t-1}) + b, E = (sigmoid(x_steps) - target)^2."""
    D.enable_x64()  # float64 parameters stay float64
    w, b = np.broadcast_arrays(np.asarray(w, np.float64), np.asarray(b, np.float64))
    out = _one_unit_value_and_grad(
        jnp.asarray(w.ravel()),
        jnp.asarray(b.ravel()),
        jnp.float64(x0),
        jnp.float64(target),
        steps=steps,
    )
    return tuple(np.asarray(a).reshape(w.shape) for a in out)


def one_unit_path(
    w0: float,
    b0: float,
    *,
    lr: float,
    updates: int,
    threshold: float | None,
    x0: float,
    steps: int,
    target: float,
):
    """Gradient descent on the one-unit network from (w0, b0): `updates` steps of lr * g, with g rescaled to norm
    `threshold` when its norm is above it (the paper's Algorithm 1; `charclip.jax.clipping`, strict, so no step is
    longer than lr * threshold) or left alone (threshold None). Returns the points (updates+1, 2) and the norms
    of the gradient before rescaling (updates,)."""
    D.enable_x64()  # float64 parameters stay float64
    theta = jnp.array([w0, b0], jnp.float64)
    points, norms = [np.asarray(theta)], []
    for _ in range(updates):
        _, gw, gb = _one_unit_value_and_grad(
            theta[:1], theta[1:], jnp.float64(x0), jnp.float64(target), steps=steps
        )
        g = jnp.concatenate([gw, gb])
        if threshold is None:
            norm = global_norm(g)
        else:
            g, norm = clip_tree_by_global_norm(g, threshold, convention="optax", strict=True)
        theta = theta - lr * g
        points.append(np.asarray(theta))
        norms.append(float(norm))
    return np.stack(points), np.array(norms)


def _temporal_order_loss(params, x, y, activation: str):
    """Mean cross-entropy of the class at the last step; x (B, T) symbols, y (B,) classes."""
    act = jax.nn.sigmoid if activation == "sigmoid" else jnp.tanh
    h0 = jnp.zeros((x.shape[0], params["W_hh"].shape[0]), params["W_hh"].dtype)

    def step(h, x_t):  # h (B, H); a one-hot input times W_uh is a row of W_uh
        return act(h @ params["W_hh"] + params["W_uh"][x_t] + params["b_hh"][None, :]), None

    h, _ = jax.lax.scan(step, h0, x.T)
    logits = h @ params["W_hy"] + params["b_hy"][None, :]  # (B, 4)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1)), logits


@partial(jax.jit, static_argnames=("activation", "clip"))
def _temporal_order_updates(params, xs, ys, lr, threshold, *, activation: str, clip: bool):
    def update(p, batch):
        (loss, _), g = jax.value_and_grad(_temporal_order_loss, has_aux=True)(p, *batch, activation)
        if clip:
            g, norm = clip_tree_by_global_norm(g, threshold, convention="optax", strict=True)
        else:
            norm = global_norm(g)
        return jax.tree.map(lambda a, b: a - lr * b, p, g), (loss, norm)

    return jax.lax.scan(update, params, (xs, ys))


def temporal_order_updates(
    params: dict[str, np.ndarray],
    xs: np.ndarray,
    ys: np.ndarray,
    *,
    lr: float,
    threshold: float | None,
    activation: str,
):
    """len(xs) plain SGD updates (the paper's MSGD; with the gradient's norm rescaled to `threshold` when above
    it: MSGD-C) on batches xs (K, B, T) of symbols, ys (K, B) classes. Returns the new parameters (NumPy), and
    per update the loss and the gradient norm before rescaling."""
    D.enable_x64()  # float64 parameters stay float64
    p = {k: jnp.asarray(v) for k, v in params.items()}
    p, (loss, norm) = _temporal_order_updates(
        p,
        jnp.asarray(xs),
        jnp.asarray(ys),
        jnp.float64(lr),
        jnp.float64(threshold or 0.0),
        activation=activation,
        clip=threshold is not None,
    )
    return {k: np.asarray(v) for k, v in p.items()}, np.asarray(loss), np.asarray(norm)


@partial(jax.jit, static_argnames="activation")
def _temporal_order_errors(params, x, y, *, activation: str):
    _, logits = _temporal_order_loss(params, x, y, activation)
    return jnp.sum(jnp.argmax(logits, axis=-1) != y)


def temporal_order_errors(
    params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, *, activation: str
) -> int:
    """How many of the sequences x (B, T) the network puts in the wrong class (argmax of the last output)."""
    D.enable_x64()  # float64 parameters stay float64
    p = {k: jnp.asarray(v) for k, v in params.items()}
    return int(_temporal_order_errors(p, jnp.asarray(x), jnp.asarray(y), activation=activation))
