"""The gradient of a last-step loss with respect to every hidden state, in PyTorch.

Mirrors `charclip.jax.explode`. The model's own modules run one
time step per call (so nn.RNN's kernels do the work), and each intermediate
hidden state keeps its gradient with `retain_grad`. Used by `charclip explode`
(docs/exploding-gradients.md).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from charclip.config import ModelConfig
from charclip.torch import model as M
from charclip.torch.clipping import clip_grad_norm_, get_total_norm


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
    model = M.build(model_cfg, params)
    dtype = next(model.parameters()).dtype
    B, T = x.shape
    h = torch.zeros(model_cfg.num_layers, B, model_cfg.hidden_size, dtype=dtype, requires_grad=True)
    c = torch.zeros_like(h) if "c" in model_cfg.state_parts else None
    hs = [h]
    for t in range(T):
        _, state = model.rnn(
            model.embedding(torch.from_numpy(x[:, t : t + 1])), h if c is None else (h, c)
        )
        h, c = state if c is not None else (state, None)  # h (L, B, H)
        h.retain_grad()  # a non-leaf tensor keeps its .grad only when asked
        hs.append(h)
    loss = F.cross_entropy(
        model.head(h[-1]), torch.from_numpy(y[:, -1])
    )  # the top layer's h_T predicts y_T
    loss.backward()
    norms = np.array([torch.linalg.vector_norm(hs[T - k].grad).item() for k in range(T + 1)])
    return norms, np.stack([s.detach().numpy() for s in hs])


# ---------------------------------------------------------------- Pascanu, Mikolov & Bengio (2013)
# The two experiments of `charclip explode --paper` (docs/paper-rerun.md), mirrored in charclip.jax.explode.


def _one_unit_loss(
    w: torch.Tensor, b: torch.Tensor, x0: float, target: float, steps: int
) -> torch.Tensor:
    """E = (sigmoid(x_steps) - target)^2 for x_t = w sigmoid(x_{t-1}) + b (the paper's eq. 8, no input)."""
    x = torch.full_like(w, x0)
    for _ in range(steps):
        x = w * torch.sigmoid(x) + b
    return (torch.sigmoid(x) - target) ** 2


def one_unit_loss_grad(w, b, *, x0: float, steps: int, target: float):
    """The one-unit network's error and its gradient at every (w, b): (E, dE/dw, dE/db), float64 arrays shaped
    like np.broadcast(w, b). x_0 = x0, x_t = w sigmoid(x_{t-1}) + b, E = (sigmoid(x_steps) - target)^2."""
    w, b = np.broadcast_arrays(np.asarray(w, np.float64), np.asarray(b, np.float64))
    tw = torch.tensor(w.ravel(), requires_grad=True)
    tb = torch.tensor(b.ravel(), requires_grad=True)
    loss = _one_unit_loss(tw, tb, x0, target, steps)
    loss.sum().backward()  # the points are independent: the gradient of the sum is each point's own
    return tuple(a.detach().numpy().reshape(w.shape) for a in (loss, tw.grad, tb.grad))


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
    `threshold` when its norm is above it (the paper's Algorithm 1; `charclip.torch.clipping`, strict, so no step is
    longer than lr * threshold) or left alone (threshold None). Returns the points (updates+1, 2) and the norms
    of the gradient before rescaling (updates,)."""
    theta = torch.tensor([w0, b0], dtype=torch.float64, requires_grad=True)
    points, norms = [theta.detach().numpy().copy()], []
    for _ in range(updates):
        theta.grad = None
        _one_unit_loss(theta[0], theta[1], x0, target, steps).backward()
        if threshold is None:
            norm = get_total_norm([theta.grad])
        else:
            norm = clip_grad_norm_([theta], threshold, convention="optax", strict=True)
        with torch.no_grad():
            theta -= lr * theta.grad
        points.append(theta.detach().numpy().copy())
        norms.append(float(norm))
    return np.stack(points), np.array(norms)


def _temporal_order_loss(
    params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, activation: str
):
    """Mean cross-entropy of the class at the last step; x (B, T) symbols, y (B,) classes. Also the logits."""
    act = torch.sigmoid if activation == "sigmoid" else torch.tanh
    h = torch.zeros(x.shape[0], params["W_hh"].shape[0], dtype=params["W_hh"].dtype)  # (B, H)
    for t in range(x.shape[1]):  # a one-hot input times W_uh is a row of W_uh
        h = act(h @ params["W_hh"] + params["W_uh"][x[:, t]] + params["b_hh"])
    logits = h @ params["W_hy"] + params["b_hy"]  # (B, 4)
    return F.cross_entropy(logits, y), logits


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
    p = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    opt = torch.optim.SGD(p.values(), lr=lr)
    losses, norms = [], []
    for x, y in zip(xs, ys):
        loss, _ = _temporal_order_loss(p, torch.from_numpy(x), torch.from_numpy(y), activation)
        loss.backward()
        if threshold is None:
            norm = get_total_norm([q.grad for q in p.values()])
        else:
            norm = clip_grad_norm_(p.values(), threshold, convention="optax", strict=True)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        norms.append(norm.item())
    return {k: v.detach().numpy() for k, v in p.items()}, np.array(losses), np.array(norms)


def temporal_order_errors(
    params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, *, activation: str
) -> int:
    """How many of the sequences x (B, T) the network puts in the wrong class (argmax of the last output)."""
    p = {k: torch.from_numpy(v) for k, v in params.items()}
    with torch.no_grad():
        _, logits = _temporal_order_loss(p, torch.from_numpy(x), torch.from_numpy(y), activation)
    return int((logits.argmax(dim=-1) != torch.from_numpy(y)).sum())
