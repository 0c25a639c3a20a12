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

dW_ih is one matmul too, in the backward pass of `project`, the input products x @ W_ih^T
of all steps at once, outside the layer; b_ih is added in the loop (`Biased`). Layer 0's
input projection is a lookup table (see `input_table`), whose rows the loop gathers
(`Gathered`).

Everything inside is time-major, (T, B, ...), so each step reads and writes one
contiguous (B, ...) slab, and T*B rows reshape for free.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

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

    Saved: the sigmoids i, f and o, g's pre-activation a_g (tanh' is taken from it, and the
    backward recomputes g = tanh(a_g) instead of storing it), and c'. Each is its own (B, H)
    array, so the backward reads each gate as one contiguous block: an elementwise kernel that
    reads a column slice of a step's (B, 4H) slab runs several times slower on XLA's CPU
    backend (docs/fast-layer.md).
    """
    h, c = carry
    hid = h.shape[-1]
    a = xw_t + h @ w_hh_t + b_hh  # (B, 4H) pre-activations
    s = jax.nn.sigmoid(a)  # one sigmoid over all four gates; g's quarter is unused
    i, f, o = s[:, :hid], s[:, hid : 2 * hid], s[:, 3 * hid :]
    a_g = a[:, 2 * hid : 3 * hid]
    g = jnp.tanh(a_g)
    c = f * c + i * g
    h = o * jnp.tanh(c)
    return (h, c), (h, (i, f, a_g, o, c))


def _gru_forward(w_hh_t, b_hh, carry, xw_t):
    """PyTorch's GRU step (gates r, z, n).

    Saved: r, z, n, W_hn h + b_hn, and n's pre-activation (tanh' is taken from it), each its
    own (B, H) array (see `_lstm_forward`).
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
    return (h_new,), (h_new, (r, z, n, hn, a_n))


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
    (dh, dc), (dh_above, _, (i, f, a_g, o, c), c_prev) = carry, xs
    g = jnp.tanh(a_g)  # recomputed: cheaper than storing and reading it back
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
    (dh,), (dh_above, _, (r, z, n, hn, a_n), h_prev) = carry, xs
    dh = dh + dh_above
    dan = dh * (1 - z) * tanh_grad(a_n)  # through h' = (1 - z) n + z h and n = tanh(a_n)
    dr = dan * hn * r * (1 - r)
    dz = dh * (h_prev - n) * z * (1 - z)
    dxw = jnp.concatenate([dr, dz, dan], axis=-1)
    # n's pre-activation holds r * (W_hn h + b_hn)
    dhw = jnp.concatenate([dr, dz, dan * r], axis=-1)
    return (dh * z + dhw @ w_hh,), (dxw, dhw)


_FORWARD = {"rnn": _rnn_forward, "lstm": _lstm_forward, "gru": _gru_forward}
_BACKWARD = {"rnn": _rnn_backward, "lstm": _lstm_backward, "gru": _gru_backward}


# ---------------------------------------------------------------- weight gradients over all rows


def _weight_grad(d, x):
    """d^T @ x over all T*B rows: (T, B, G) and (T, B, K) -> (G, K), one matmul.

    Computed as (x^T d)^T: XLA's CPU dot contracting the first dimension of x (K, the
    narrower operand) runs at about the plain product's rate, faster than d^T laid out first
    or folded into the dot; the barrier keeps XLA from folding the final, small (K, G)
    transpose into the dot, which would make it the slow form again
    (`python -m benchmarks.layouts`, docs/fast-layer.md).
    """
    rows = d.shape[0] * d.shape[1]
    return jax.lax.optimization_barrier(x.reshape(rows, -1).T @ d.reshape(rows, -1)).T


@jax.custom_vjp
def project(x, w):
    """The input products of every step at once: x (T, B, K) @ w^T (K, G) -> (T, B, G).

    The bias b_ih is not added here but in the loop, step by step (`Biased`): a separate pass
    over the (T, B, G) result cost XLA's CPU backend a kernel of its own, while in the loop the
    add joins the step's elementwise kernel. The sums are the same, (x W^T + b_ih) + h W_hh^T
    + b_hh, in the same order.
    """
    return x @ w.T


def _project_fwd(x, w):
    return x @ w.T, (x, w)


def _project_bwd(res, d):
    x, w = res
    return d @ w, _weight_grad(d, x)


project.defvjp(_project_fwd, _project_bwd)


# ---------------------------------------------------------------- the layer


class Gathered(NamedTuple):
    """A layer's input projection as rows of a lookup table, gathered step by step in the loop.

    Layer 0's (`input_table`): each step gathers its B rows, and no (T, B, G*H) array of all
    steps' rows is formed; the backward adds the rows' gradients into a (V, G*H) table.
    """

    table: jax.Array  # (V, G*H), any float dtype; each row rounded to W_hh's dtype once gathered
    tokens: jax.Array  # (T, B) integer rows


class Biased(NamedTuple):
    """A layer's input projection without its bias, which the loop adds step by step."""

    xw: jax.Array  # (T, B, G*H): x_t W_ih^T
    bias: jax.Array  # (G*H,): b_ih


def _scan_forward(cell, xw, state, w_hh, b_hh, unroll):
    if cell not in _FORWARD:
        raise ValueError(f"unknown cell {cell!r}; choose one of {', '.join(_FORWARD)}")
    # W_hh^T laid out once, outside the loop; the bias as a (1, G*H) row, broadcast over B explicitly
    step = functools.partial(_FORWARD[cell], w_hh.T, b_hh[None, :])
    if isinstance(xw, Gathered):
        xs, dtype = xw.tokens, w_hh.dtype

        def inner(carry, tokens_t):
            return step(carry, xw.table[tokens_t].astype(dtype))

    elif isinstance(xw, Biased):
        xs, b_ih = xw.xw, xw.bias[None, :]

        def inner(carry, xw_t):
            return step(carry, xw_t + b_ih)

    else:
        xs, inner = xw, step
    final, (hs, saved) = jax.lax.scan(inner, state, xs, unroll=unroll)
    return hs, final, saved


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 5))
def layer(cell: str, xw, state, w_hh, b_hh, unroll: int):
    """One recurrent layer over a whole sequence, time-major.

    xw: (T, B, G*H), the input projection x_t W_ih^T + b_ih of every step, or that projection as
    `Gathered` table rows or `Biased` (x_t W_ih^T and b_ih apart), whose cotangent is of the
    same kind; state: (h0,) or (h0, c0), each (B, H); w_hh (G*H, H) and b_hh (G*H,) in PyTorch's
    layout.
    Returns hs (T, B, H), every step's h, and the final state.
    """
    hs, final, _ = _scan_forward(cell, xw, state, w_hh, b_hh, unroll)
    return hs, final


def _layer_fwd(cell, xw, state, w_hh, b_hh, unroll):
    hs, final, saved = _scan_forward(cell, xw, state, w_hh, b_hh, unroll)
    return (hs, final), (hs, saved, state, w_hh, _input_info(xw))


def _input_info(xw):
    """What the backward needs to know of the layer's input: its kind, a table's rows and dtype."""
    if isinstance(xw, Gathered):  # the table as an empty (V, 0) array: its row count and dtype
        return Gathered(xw.table[:, :0], xw.tokens)
    return Biased(None, None) if isinstance(xw, Biased) else None


def _layer_bwd(cell, unroll, res, cotangents):
    hs, saved, state, w_hh, info = res
    dhs, dfinal = (
        cotangents  # the final state's cotangent seeds the carry: it is h_{T-1} (and c_{T-1})
    )
    h_prev = jnp.concatenate([state[0][None], hs[:-1]])  # (T, B, H): h_{t-1} for every t
    # c_{t-1} when the state has a cell part (the LSTM), else h_{t-1}
    extra = jnp.concatenate([state[1][None], saved[-1][:-1]]) if len(state) > 1 else h_prev
    step = functools.partial(_BACKWARD[cell], w_hh)
    dstate, (dxw, dhw) = jax.lax.scan(
        step, dfinal, (dhs, hs, saved, extra), reverse=True, unroll=unroll
    )
    dhw = dxw if dhw is None else dhw
    if isinstance(info, Gathered):  # the table rows' gradients, summed in the table's dtype
        dtab = jnp.zeros((info.table.shape[0], dxw.shape[-1]), info.table.dtype)
        dxw = Gathered(dtab.at[info.tokens].add(dxw.astype(dtab.dtype)), None)
    elif isinstance(info, Biased):
        dxw = Biased(dxw, dxw.sum(axis=(0, 1)))
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
            xw = Gathered(input_table(params, tokens).astype(master), tokens)  # gathered per step
        else:
            if k == 0:
                seq = params["embedding.weight"][tokens].astype(compute)  # (T, B, E)
            w_ih, b_ih = params[f"rnn.weight_ih_l{k}"], params[f"rnn.bias_ih_l{k}"]
            xw = Biased(project(seq, w_ih), b_ih)  # b_ih is added in the loop
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
