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


def rounding_bound(
    params: Params, x: np.ndarray, y: np.ndarray, h0: np.ndarray | None, u: float
) -> Params:
    """A first-order bound on the rounding error of one step's gradients in a dtype of unit
    roundoff `u`, entry by entry, worked out from this draw's float64 values (Higham's running
    error analysis, "Accuracy and Stability of Numerical Algorithms", 3.3).

    Every quantity q of `loss_and_grads` carries e(q), a bound on |computed q - exact q|:

        a product a b:            e = |b| e(a) + |a| e(b) + u |a b|
        a sum of n terms t_i:     e = sum e(t_i) + (n - 1) u sum |t_i|   (any order)
        h = tanh(a):              e = (1 - h^2) e(a) + u |h|   (torch's float32 tanh: < 1 u)
        tanh' = 1 - h^2 from h:   e = 2 |h| e(h) + u (h^2 + (1 - h^2))
        softmax p:                e = p ((V + 3) u + 2 max_v e(z_v))

    (constants of a few u are rounded up, e.g. one rounding per bias add). Two mechanisms
    make e large against |q| on some draws, and the bound sees both from the values:
    cancellation, where sum |t_i| >> |sum t_i| (a pre-activation near 0, the head's
    sum_v W_v (p_v - onehot_v), 1 - p_y at a confident prediction), and tanh' near
    saturation, where e(h) ~ u |h| is 2 h^2 / (1 - h^2) times more relative to 1 - h^2
    (torch takes tanh' from the rounded h; charclip's JAX layer from the pre-activation,
    so this bound is torch's, the larger). The gradients of the embedding and of the
    weights accumulate over B * T positions: one more sum.
    """
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    m = {k: np.abs(v) for k, v in p.items()}
    B, T = x.shape
    L = _layers(p)
    H = p["rnn.weight_hh_l0"].shape[1]
    h0 = np.zeros((L, B, H)) if h0 is None else np.asarray(h0, dtype=np.float64)
    e_h0 = u * np.abs(h0)  # the initial state, rounded to the dtype once

    # Forward: (value, error bound) of every layer's input and output at every step.
    inputs = p["embedding.weight"][x]  # (B, T, E): rows of the dtype's table, exact
    e_inputs = np.zeros_like(inputs)
    layers = []
    for k in range(L):
        w_ih, w_hh = p[f"rnn.weight_ih_l{k}"], p[f"rnn.weight_hh_l{k}"]
        a_ih, a_hh = m[f"rnn.weight_ih_l{k}"], m[f"rnn.weight_hh_l{k}"]
        bias = p[f"rnn.bias_ih_l{k}"] + p[f"rnn.bias_hh_l{k}"]
        abs_bias = m[f"rnn.bias_ih_l{k}"] + m[f"rnn.bias_hh_l{k}"]
        n = w_ih.shape[1] + w_hh.shape[1] + 2  # terms of one pre-activation
        h, e_h = h0[k], e_h0[k]
        hs, e_hs = np.empty(x.shape + (w_hh.shape[0],)), np.empty(x.shape + (w_hh.shape[0],))
        for t in range(T):
            a = inputs[:, t] @ w_ih.T + h @ w_hh.T + bias  # (B, H)
            terms = np.abs(inputs[:, t]) @ a_ih.T + np.abs(h) @ a_hh.T + abs_bias
            e_a = n * u * terms + e_inputs[:, t] @ a_ih.T + e_h @ a_hh.T
            h = np.tanh(a)
            e_h = (1 - h**2) * e_a + u * np.abs(h)
            hs[:, t], e_hs[:, t] = h, e_h
        layers.append((inputs, e_inputs, hs, e_hs))
        inputs, e_inputs = hs, e_hs

    # The head and the loss's gradient d = (softmax(z) - onehot(y)) / (B T).
    top, e_top = inputs, e_inputs  # (B, T, H)
    z = top @ p["head.weight"].T + p["head.bias"]  # (B, T, V)
    V = z.shape[-1]
    e_z = (H + 1) * u * (np.abs(top) @ m["head.weight"].T + m["head.bias"])
    e_z += e_top @ m["head.weight"].T
    probs = np.exp(z - z.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    e_probs = probs * ((V + 3) * u + 2 * e_z.max(axis=-1, keepdims=True))
    d = probs.copy()
    d[np.arange(B)[:, None], np.arange(T)[None, :], y] -= 1.0
    e_d = (e_probs + 2 * u * np.abs(d)) / (B * T)  # the subtraction and the division
    d /= B * T
    positions = (B * T - 1) * u  # the accumulation over positions, per weight entry
    e = {
        "head.weight": np.einsum("btv,bth->vh", e_d, np.abs(top))
        + np.einsum("btv,bth->vh", np.abs(d), e_top)
        + (u + positions) * np.einsum("btv,bth->vh", np.abs(d), np.abs(top)),
        "head.bias": e_d.sum(axis=(0, 1)) + positions * np.abs(d).sum(axis=(0, 1)),
    }
    d_out = d @ p["head.weight"]  # (B, T, H)
    e_out = e_d @ m["head.weight"] + V * u * (np.abs(d) @ m["head.weight"])

    for k in reversed(range(L)):
        inputs, e_inputs, hs, e_hs = layers[k]
        w_ih, w_hh = p[f"rnn.weight_ih_l{k}"], p[f"rnn.weight_hh_l{k}"]
        a_ih, a_hh = m[f"rnn.weight_ih_l{k}"], m[f"rnn.weight_hh_l{k}"]
        names = [f"rnn.{w}_l{k}" for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        for name in names:
            e[name] = np.zeros_like(p[name])
        d_in, e_in = np.zeros_like(inputs), np.zeros_like(inputs)
        future, e_future = np.zeros(hs.shape[::2]), np.zeros(hs.shape[::2])
        for t in reversed(range(T)):
            h_prev, e_prev = (hs[:, t - 1], e_hs[:, t - 1]) if t > 0 else (h0[k], e_h0[k])
            dh = d_out[:, t] + future
            e_dh = e_out[:, t] + e_future + u * (np.abs(d_out[:, t]) + np.abs(future))
            h = hs[:, t]
            slope = 1 - h**2  # torch's tanh' from its rounded h
            e_slope = 2 * np.abs(h) * e_hs[:, t] + u * (h**2 + slope)
            da = dh * slope
            e_da = slope * e_dh + np.abs(dh) * e_slope + u * np.abs(da)
            for name, v, e_v in (
                (names[0], inputs[:, t], e_inputs[:, t]),
                (names[1], h_prev, e_prev),
            ):  # each product rounded, then accumulated over positions
                outer = np.abs(da).T @ np.abs(v)
                e[name] += e_da.T @ np.abs(v) + np.abs(da).T @ e_v + (u + positions) * outer
            for name in names[2:]:
                e[name] += e_da.sum(axis=0) + positions * np.abs(da).sum(axis=0)
            d_in[:, t] = da @ w_ih
            e_in[:, t] = e_da @ a_ih + w_ih.shape[0] * u * (np.abs(da) @ a_ih)
            future = da @ w_hh
            e_future = e_da @ a_hh + w_hh.shape[0] * u * (np.abs(da) @ a_hh)
        d_out, e_out = d_in, e_in

    e["embedding.weight"] = np.zeros_like(p["embedding.weight"])
    np.add.at(e["embedding.weight"], x, e_out + positions * np.abs(d_out))
    return e
