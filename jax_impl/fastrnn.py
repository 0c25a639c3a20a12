"""The char-RNN's recurrent layers with a hand-written backward pass (`jax.custom_vjp`).

Same model, same parameters, same numbers as `charclip.jax.model`'s `lax.scan`
reference (PyTorch layouts and gate orders); only the order of the work differs.
Autodiff of the reference computes dW_hh inside the backward loop: one small
(G*H, B) x (B, H) product per time step, accumulated. Here the backward loop
does only what must be sequential, as cuDNN does:

    backward loop, t = T-1 .. 0, carrying dh (and dc for the LSTM):
        dh   += dL/dh_t from the layer above
        da_t  = dL/d(pre-activations at t), from dh, dc and the gates saved by the forward pass
        dh    = da_t @ W_hh                 (dL/dh_{t-1}; (B, G*H) x (G*H, H))
    after the loop, once over all T*B rows:
        dW_hh = da^T @ h_prev               ((G*H, T*B) x (T*B, H): one large matmul)
        db_hh = sum of da over rows

dW_ih and db_ih are one matmul too, in the backward pass of `project`, the input
projection x @ W_ih^T + b_ih of all steps at once, outside the layer. Layer 0's
input projection is a lookup table (see `input_table`).

Everything inside is time-major, (T, B, ...), so each step reads and writes one
contiguous (B, ...) slab, and T*B rows reshape for free.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from charclip.config import ModelConfig

# ---------------------------------------------------------------- one time step, forward


def _rnn_forward(w_hh_t, b_hh, carry, xw_t):
    """h' = tanh(a), a = xw_t + h W_hh^T + b_hh. Saved for backward: a (tanh' is taken from it)."""
    (h,) = carry
    a = xw_t + h @ w_hh_t + b_hh
    h = jnp.tanh(a)
    return (h,), (h, a)


def _lstm_forward(w_hh_t, b_hh, carry, xw_t):
    """PyTorch's LSTM step (gates i, f, g, o).

    Saved: s, the sigmoid of gates i, f and o with g's pre-activation in g's quarter (tanh' is
    taken from it), g itself, and c'.
    """
    h, c = carry
    hid = h.shape[-1]
    a = xw_t + h @ w_hh_t + b_hh  # (B, 4H) pre-activations
    s = jax.nn.sigmoid(a)  # one sigmoid over all four gates; g's quarter is replaced below
    i, f, o = s[:, :hid], s[:, hid : 2 * hid], s[:, 3 * hid :]
    a_g = a[:, 2 * hid : 3 * hid]
    g = jnp.tanh(a_g)
    c = f * c + i * g
    h = o * jnp.tanh(c)
    return (h, c), (h, (s.at[:, 2 * hid : 3 * hid].set(a_g), g, c))


def _gru_forward(w_hh_t, b_hh, carry, xw_t):
    """PyTorch's GRU step (gates r, z, n).

    Saved: sigmoid(r, z), n, W_hn h + b_hn, and n's pre-activation (tanh' is taken from it).
    """
    (h,) = carry
    hid = h.shape[-1]
    hw = h @ w_hh_t + b_hh  # (B, 3H)
    rz = jax.nn.sigmoid(xw_t[:, : 2 * hid] + hw[:, : 2 * hid])  # one sigmoid over both gates
    r, z = rz[:, :hid], rz[:, hid:]
    hn = hw[:, 2 * hid :]
    a_n = xw_t[:, 2 * hid :] + r * hn
    n = jnp.tanh(a_n)
    h_new = (1 - z) * n + z * h
    return (h_new,), (h_new, (rz, n, hn, a_n))


# ---------------------------------------------------------------- one time step, backward
#
# Each takes the carried cotangent, the cotangent arriving from above (dhs_t), and what the
# forward step saved (plus h_{t-1}, or c_{t-1} for the LSTM); it returns the new carry and
# the pre-activation derivatives (d xw_t, d hw_t), where hw_t = h_{t-1} W_hh^T + b_hh.
# They coincide (d hw_t is then None, stored once) except for the GRU's candidate n,
# where W_hn h + b_hn is multiplied by r.


def tanh_grad(a):
    """tanh'(a) = sech(a)^2 = 4e / (1 + e)^2 with e = exp(-2|a|), from the pre-activation a.

    The textbook 1 - h^2 (or (1 - h)(1 + h)) from the rounded h = tanh(a) cannot be accurate
    where tanh saturates: h near 1 carries about -log2(1 - |h|) fewer correct bits of 1 - |h|,
    and JAX's float32 tanh is itself a few ulp off there (worst relative error of the derivative
    1.8e-2 over |a| in [3, 6], torch's 2.4e-3; this form: 2.8e-7; docs/fast-layer.md). Here
    e is in (0, 1] and nothing cancels: a few float32 ulp everywhere, and 0 where e underflows.
    """
    e = jnp.exp(-2 * jnp.abs(a))
    return 4 * e / ((1 + e) * (1 + e))


def _rnn_backward(w_hh, carry, xs):
    (dh,), (dh_above, _, a, _) = carry, xs
    da = (dh + dh_above) * tanh_grad(a)
    return (da @ w_hh,), (da, None)


def _lstm_backward(w_hh, carry, xs):
    (dh, dc), (dh_above, _, (s, g, c), c_prev) = carry, xs
    hid = dh.shape[-1]
    i, f, a_g, o = s[:, :hid], s[:, hid : 2 * hid], s[:, 2 * hid : 3 * hid], s[:, 3 * hid :]
    dh = dh + dh_above
    tc = jnp.tanh(c)
    dc = dc + dh * o * tanh_grad(c)
    # d(gate) times the activation's derivative: sigmoid' = s (1 - s) (torch's form, as accurate
    # as torch's; docs/fast-layer.md), tanh' from the pre-activation
    da = jnp.concatenate(
        [
            dc * g * i * (1 - i),
            dc * c_prev * f * (1 - f),
            dc * i * tanh_grad(a_g),
            dh * tc * o * (1 - o),
        ],
        axis=-1,
    )
    return (da @ w_hh, dc * f), (da, None)


def _gru_backward(w_hh, carry, xs):
    (dh,), (dh_above, _, (rz, n, hn, a_n), h_prev) = carry, xs
    hid = dh.shape[-1]
    r, z = rz[:, :hid], rz[:, hid:]
    dh = dh + dh_above
    dan = dh * (1 - z) * tanh_grad(a_n)  # through h' = (1 - z) n + z h and n = tanh(a_n)
    drz = jnp.concatenate([dan * hn, dh * (h_prev - n)], axis=-1) * rz * (1 - rz)
    dxw = jnp.concatenate([drz, dan], axis=-1)
    dhw = jnp.concatenate([drz, dan * r], axis=-1)  # n's pre-activation holds r * (W_hn h + b_hn)
    return (dh * z + dhw @ w_hh,), (dxw, dhw)


_FORWARD = {"rnn": _rnn_forward, "lstm": _lstm_forward, "gru": _gru_forward}
_BACKWARD = {"rnn": _rnn_backward, "lstm": _lstm_backward, "gru": _gru_backward}


# ---------------------------------------------------------------- weight gradients over all rows


def _weight_grad(d, x):
    """d^T @ x over all T*B rows: (T, B, G) and (T, B, K) -> (G, K), one matmul.

    d^T is laid out explicitly first (the barrier keeps XLA from folding the transpose
    back into the dot): on a CPU, XLA runs the dot with a transposed operand about a
    third slower than the plain (G, rows) x (rows, K) product, more than the copy costs
    (`python -m benchmarks.layouts`, docs/fast-layer.md).
    """
    rows = d.shape[0] * d.shape[1]
    d_t = jax.lax.optimization_barrier(d.reshape(rows, -1).T)  # (G, T*B)
    return d_t @ x.reshape(rows, -1)


@jax.custom_vjp
def project(x, w, b):
    """The input projection of every step at once: x (T, B, K) @ w^T (K, G) + b -> (T, B, G)."""
    return x @ w.T + b.reshape(
        (1,) * (x.ndim - 1) + b.shape
    )  # the bias broadcast explicitly over the leading axes


def _project_fwd(x, w, b):
    return project(x, w, b), (x, w)


def _project_bwd(res, d):
    x, w = res
    return d @ w, _weight_grad(d, x), d.sum(axis=(0, 1))


project.defvjp(_project_fwd, _project_bwd)


# ---------------------------------------------------------------- the layer


def _scan_forward(cell, xw, state, w_hh, b_hh, unroll):
    if cell not in _FORWARD:
        raise ValueError(f"unknown cell {cell!r}; choose one of {', '.join(_FORWARD)}")
    # W_hh^T laid out once, outside the loop; the bias as a (1, G*H) row, broadcast over B explicitly
    step = functools.partial(_FORWARD[cell], w_hh.T, b_hh[None, :])
    final, (hs, saved) = jax.lax.scan(step, state, xw, unroll=unroll)
    return hs, final, saved


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 5))
def layer(cell: str, xw, state, w_hh, b_hh, unroll: int):
    """One recurrent layer over a whole sequence, time-major.

    xw: (T, B, G*H), the input projection x_t W_ih^T + b_ih of every step; state: (h0,)
    or (h0, c0), each (B, H); w_hh (G*H, H) and b_hh (G*H,) in PyTorch's layout.
    Returns hs (T, B, H), every step's h, and the final state.
    """
    hs, final, _ = _scan_forward(cell, xw, state, w_hh, b_hh, unroll)
    return hs, final


def _layer_fwd(cell, xw, state, w_hh, b_hh, unroll):
    hs, final, saved = _scan_forward(cell, xw, state, w_hh, b_hh, unroll)
    return (hs, final), (hs, saved, state, w_hh)


def _layer_bwd(cell, unroll, res, cotangents):
    hs, saved, state, w_hh = res
    dhs, dfinal = (
        cotangents  # the final state's cotangent seeds the carry: it is h_{T-1} (and c_{T-1})
    )
    h_prev = jnp.concatenate([state[0][None], hs[:-1]])  # (T, B, H): h_{t-1} for every t
    # c_{t-1} when the state has a cell part (the LSTM), else h_{t-1}
    extra = jnp.concatenate([state[1][None], saved[2][:-1]]) if len(state) > 1 else h_prev
    step = functools.partial(_BACKWARD[cell], w_hh)
    dstate, (dxw, dhw) = jax.lax.scan(
        step, dfinal, (dhs, hs, saved, extra), reverse=True, unroll=unroll
    )
    dhw = dxw if dhw is None else dhw
    return dxw, dstate, _weight_grad(dhw, h_prev), dhw.sum(axis=(0, 1))


layer.defvjp(_layer_fwd, _layer_bwd)


# ---------------------------------------------------------------- the model


def input_table(params, tokens, name: str = "rnn"):
    """Layer 0's input projection of every vocabulary entry: embedding @ W_ih0^T + b_ih0, (V, G*H).

    The embedding lookup and layer 0's projection are both linear in the one-hot token,
    so their product is a table with one row per character: projecting V rows instead
    of T*B, and gathering those rows, replaces the (T*B, E) x (E, G*H) matmul of the
    forward pass and both of its backward matmuls.

    Rows of characters absent from `tokens` are zeroed first: the plain model never reads
    them, so they must not reach W_ih0's gradient either (a NaN embedding row of an unused
    character would otherwise turn it into NaN through 0 * NaN).
    """
    w_ih = params[f"{name}.weight_ih_l0"]
    embedding = params["embedding.weight"].astype(
        w_ih.dtype
    )  # in the compute dtype under mixed precision
    present = jnp.zeros(embedding.shape[0], bool).at[tokens.ravel()].set(True)
    used = jnp.where(present[:, None], embedding, jnp.zeros_like(embedding))
    return used @ w_ih.T + params[f"{name}.bias_ih_l0"][None, :]


def apply(params, x, state, *, cfg: ModelConfig, table: bool = True, unroll: int = 1, masks=None):
    """`charclip.jax.model.apply` computed with `layer`: logits (B, T, V) and the final state, each part (L, B, H).

    `masks` (None, or one dropout mask (B, T, H) per layer) multiply each layer's output outside
    `layer`, so autodiff carries the product's cotangent, dhs * mask, into the layer's backward.
    """
    tokens = x.T  # (T, B): time-major from here on
    # Under mixed precision (charclip.jax.model.loss) the recurrent weights are in the compute
    # dtype and the embedding in the master dtype; otherwise both are the same.
    master, compute = params["embedding.weight"].dtype, params["rnn.weight_ih_l0"].dtype
    finals = []
    for k in range(cfg.num_layers):
        if k == 0 and table:
            # gathered in the embedding's (master) dtype, then rounded: the rows' gradients sum in it
            xw = input_table(params, tokens).astype(master)[tokens].astype(compute)  # (T, B, G*H)
        else:
            if k == 0:
                seq = params["embedding.weight"][tokens].astype(compute)  # (T, B, E)
            xw = project(
                seq, params[f"rnn.weight_ih_l{k}"], params[f"rnn.bias_ih_l{k}"]
            )  # (T, B, G*H)
        seq, s_k = layer(
            cfg.cell,
            xw,
            tuple(part[k] for part in state),
            params[f"rnn.weight_hh_l{k}"],
            params[f"rnn.bias_hh_l{k}"],
            unroll,
        )
        if masks is not None:
            seq = seq * jnp.swapaxes(masks[k], 0, 1)  # (T, B, H), time-major like seq
        finals.append(s_k)
    final = tuple(jnp.stack([f[i] for f in finals]) for i in range(len(state)))
    logits = (seq @ params["head.weight"].T).astype(master) + params["head.bias"][
        None, None, :
    ]  # (T, B, V)
    return jnp.swapaxes(logits, 0, 1), final
