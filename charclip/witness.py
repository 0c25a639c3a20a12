"""A third, independent witness: the vanilla tanh char-RNN in NumPy float64, backward pass by hand.

Neither PyTorch nor JAX is involved, and no automatic differentiation: the
gradient is worked out the way a textbook (or karpathy's min-char-rnn) derives
backpropagation through time. If this file and both autodiff backends agree,
all three would have to share the same mistake for the parity tests to miss it.

The model is `charclip`'s with `cell="rnn"`, over the same parameter names
(PyTorch's state_dict, see `charclip.weights`). With E the embedding size, H
the hidden size, V the vocabulary, B the batch and T the sequence length:

    e_t     = embedding.weight[x_t]                                   (B, E)
    h^k_t   = tanh(in^k_t W_ih^T + b_ih + h^k_{t-1} W_hh^T + b_hh)    (B, H)
              where in^0_t = e_t and in^k_t = h^{k-1}_t for layers k > 0
    z_t     = h^{L-1}_t head.weight^T + head.bias                     (B, V)
    loss    = mean over (b, t) of -log softmax(z_t)[y_t]

Backward, for one layer (reading time backwards, t = T-1 ... 0):

    dh_t  = (gradient from the layer above or the head at t) + dh_from_future   (B, H)
    da_t  = dh_t * (1 - h_t^2)                      the tanh's derivative, diag(1 - h_t^2)
    dW_ih += da_t^T in_t,   dW_hh += da_t^T h_{t-1},   db_ih += sum_b da_t,   db_hh += sum_b da_t
    d in_t = da_t W_ih                              flows down to the layer below
    dh_from_future for step t-1 = da_t W_hh         i.e. (diag(1 - h_t^2) W_hh)^T dh_t

The last line is where exploding and vanishing gradients come from: going back
s steps multiplies by s such Jacobians, whose size is set by W_hh's spectral
radius and how saturated the tanh is. Clipping (below) caps the damage.

Everything is written for reading, not speed.
"""

from __future__ import annotations

import numpy as np

Params = dict[str, np.ndarray]


def _layers(params: Params) -> int:
    return sum(1 for name in params if name.startswith("rnn.weight_ih_l"))


def forward(params: Params, x: np.ndarray, h0: np.ndarray | None = None):
    """Logits (B, T, V), the final state (L, B, H), and what the backward pass needs.

    `h0` is the initial hidden state (L, B, H); None means zeros.
    """
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    B, T = x.shape
    L, H = _layers(p), p["rnn.weight_hh_l0"].shape[1]
    h0 = np.zeros((L, B, H)) if h0 is None else np.asarray(h0, dtype=np.float64)

    inputs = p["embedding.weight"][x]  # (B, T, E): the first layer's input at every step
    cache = {"x": x, "h0": h0, "inputs": [], "hs": []}
    finals = []
    for k in range(L):
        w_ih, w_hh = p[f"rnn.weight_ih_l{k}"], p[f"rnn.weight_hh_l{k}"]  # (H, E or H), (H, H)
        b = (
            p[f"rnn.bias_ih_l{k}"] + p[f"rnn.bias_hh_l{k}"]
        )  # (H,): the two biases only ever appear summed
        h = h0[k]  # (B, H)
        hs = np.empty((B, T, H))
        for t in range(T):
            h = np.tanh(inputs[:, t] @ w_ih.T + h @ w_hh.T + b)  # (B, H)
            hs[:, t] = h
        cache["inputs"].append(inputs)
        cache["hs"].append(hs)
        finals.append(h)
        inputs = hs  # (B, T, H): this layer's outputs feed the next layer
    logits = inputs @ p["head.weight"].T + p["head.bias"]  # (B, T, V)
    cache["logits"] = logits
    return logits, np.stack(finals), cache


def cross_entropy(logits: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the targets y (B, T) under softmax(logits) (B, T, V)."""
    z = logits - logits.max(axis=-1, keepdims=True)  # (B, T, V), shifted so exp cannot overflow
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))  # (B, T, V)
    return float(-np.take_along_axis(logp, y[..., None], axis=-1).mean())


def loss_and_grads(params: Params, x: np.ndarray, y: np.ndarray, h0: np.ndarray | None = None):
    """The loss, the gradient of every parameter (same names), and the final state (L, B, H).

    The final state is returned but, as in truncated BPTT, no gradient flows
    into it from later batches: the backward pass starts from zero there.
    """
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    logits, final, cache = forward(p, x, h0)
    loss = cross_entropy(logits, y)
    B, T, V = logits.shape
    grads = {k: np.zeros_like(v) for k, v in p.items()}

    # Softmax cross-entropy: d loss / d logits = (softmax - one_hot(y)) / (B * T).
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)  # (B, T, V)
    dlogits = probs
    dlogits[np.arange(B)[:, None], np.arange(T)[None, :], y] -= 1.0
    dlogits /= B * T  # (B, T, V)

    top = cache["hs"][-1]  # (B, T, H)
    grads["head.weight"] = np.einsum("btv,bth->vh", dlogits, top)  # (V, H)
    grads["head.bias"] = dlogits.sum(axis=(0, 1))  # (V,)
    d_out = dlogits @ p["head.weight"]  # (B, T, H): gradient reaching the top layer's outputs

    for k in reversed(range(len(cache["hs"]))):
        w_ih, w_hh = p[f"rnn.weight_ih_l{k}"], p[f"rnn.weight_hh_l{k}"]
        inputs, hs = cache["inputs"][k], cache["hs"][k]  # (B, T, E or H), (B, T, H)
        d_in = np.zeros_like(inputs)  # (B, T, E or H)
        dh_future = np.zeros(hs.shape[::2])  # (B, H): nothing flows back from beyond the last step
        for t in reversed(range(T)):
            h_prev = hs[:, t - 1] if t > 0 else cache["h0"][k]  # (B, H)
            dh = d_out[:, t] + dh_future  # (B, H): from above (or the head) and from step t+1
            da = dh * (1.0 - hs[:, t] ** 2)  # (B, H): back through the tanh
            grads[f"rnn.weight_ih_l{k}"] += da.T @ inputs[:, t]  # (H, E or H)
            grads[f"rnn.weight_hh_l{k}"] += da.T @ h_prev  # (H, H)
            grads[f"rnn.bias_ih_l{k}"] += da.sum(axis=0)  # (H,)
            grads[f"rnn.bias_hh_l{k}"] += da.sum(axis=0)  # (H,)
            d_in[:, t] = da @ w_ih  # (B, E or H): to the layer below
            dh_future = da @ w_hh  # (B, H): to step t-1 of this layer
        d_out = d_in

    # The embedding row of each input character collects the gradient of its uses.
    np.add.at(grads["embedding.weight"], cache["x"], d_out)  # (V, E) += (B, T, E) at rows x
    return loss, grads, final


def global_norm(grads: Params) -> float:
    """The L2 norm of all gradients taken together, as if flattened into one vector."""
    return float(np.sqrt(sum(np.sum(np.asarray(g, dtype=np.float64) ** 2) for g in grads.values())))


def clip_by_global_norm(grads: Params, max_norm: float, eps: float = 0.0) -> tuple[Params, float]:
    """Scale every gradient by min(1, max_norm / (||g|| + eps)); return them and ||g|| (before).

    eps = 0 is optax's `clip_by_global_norm`; eps = 1e-6 is torch's `clip_grad_norm_`
    (Pascanu, Mikolov and Bengio, 2013, "On the difficulty of training recurrent
    neural networks"). The direction of the gradient is kept; only its length shrinks.
    A zero gradient has no direction and nothing to shrink: it stays zero (also for
    max_norm = 0, where the formula would divide 0 by 0).
    """
    norm = global_norm(grads)
    scale = 1.0 if norm == 0 else min(1.0, max_norm / (norm + eps))
    return {k: g * scale for k, g in grads.items()}, norm


def clip_by_value(grads: Params, max_value: float) -> Params:
    """Clamp every gradient component to [-max_value, max_value] (this changes the direction)."""
    return {k: np.clip(g, -max_value, max_value) for k, g in grads.items()}
