"""The char-RNN as pure JAX functions over PyTorch's state_dict.

`params` is a dict whose keys, shapes and layouts are exactly those of
`charclip.torch.model.CharRNN(cfg).state_dict()` (see `charclip.weights`), so a
checkpoint moves between the backends without conversion. Gate order follows
PyTorch: i, f, g, o for the LSTM; r, z, n for the GRU, whose candidate is
n = tanh(W_in x + b_in + r * (W_hn h + b_hn)).

Each layer computes its input projection for all time steps as one matmul,
then runs the recurrence as a `lax.scan` over time: the readable reference,
differentiated by autodiff. `layer="fast"` computes the same model with
`charclip.jax.fastrnn`, whose hand-written backward pass is what training uses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from charclip.config import CELLS, ModelConfig
from charclip.jax import device as D
from charclip.jax import fastrnn
from charclip.weights import init_params


def init(cfg: ModelConfig, seed: int, dtype: str = "float32") -> dict[str, jax.Array]:
    """The same initial weights as charclip.torch for the same seed (drawn by charclip.weights)."""
    D.enable_x64()  # float64 weights stay float64
    return {k: jnp.asarray(v) for k, v in init_params(cfg, seed, dtype).items()}


def zero_state(cfg: ModelConfig, batch: int, dtype) -> tuple[jax.Array, ...]:
    """The initial hidden state: (h,) or, for an LSTM, (h, c); each (L, B, H)."""
    h = jnp.zeros((cfg.num_layers, batch, cfg.hidden_size), dtype)
    return tuple(h for _ in cfg.state_parts)


def _cell(cell: str, xw_t, state, w_hh, b_hh):
    """One time step. xw_t = x_t W_ih^T + b_ih, precomputed; state = (h,) or (h, c)."""
    hw = (
        state[0] @ w_hh.T + b_hh[None, :]
    )  # (B, G*H); biases broadcast explicitly (tests forbid rank promotion)
    if cell == "rnn":
        return (jnp.tanh(xw_t + hw),)
    if cell == "lstm":
        i, f, g, o = jnp.split(xw_t + hw, 4, axis=-1)
        c = jax.nn.sigmoid(f) * state[1] + jax.nn.sigmoid(i) * jnp.tanh(g)
        return (jax.nn.sigmoid(o) * jnp.tanh(c), c)
    if cell != "gru":
        raise ValueError(f"unknown cell {cell!r}; choose one of {', '.join(CELLS)}")
    x_r, x_z, x_n = jnp.split(xw_t, 3, axis=-1)
    h_r, h_z, h_n = jnp.split(hw, 3, axis=-1)
    r = jax.nn.sigmoid(x_r + h_r)
    z = jax.nn.sigmoid(x_z + h_z)
    n = jnp.tanh(x_n + r * h_n)  # PyTorch's form: the reset gate multiplies W_hn h + b_hn
    return ((1 - z) * n + z * state[0],)


_MASTER_PRECISION = (
    "embedding.weight",
    "head.bias",
)  # kept in the master dtype under mixed precision

LAYERS = (
    "scan",
    "fast",
    "fast-no-table",
)  # the reference; charclip.jax.fastrnn with and without its lookup table


def apply(params, x, state, *, cfg: ModelConfig, layer: str = "scan", unroll: int = 1, masks=None):
    """Logits (B, T, V) for tokens x (B, T) and the final state, each part (L, B, H).

    `masks`: None, or one dropout mask (B, T, H) per layer (`charclip.dropout`), multiplying
    that layer's output on its way into the next layer or the head.
    """
    if layer != "scan":
        if layer not in LAYERS:
            raise ValueError(f"unknown layer {layer!r}; choose one of {', '.join(LAYERS)}")
        return fastrnn.apply(
            params, x, state, cfg=cfg, table=layer == "fast", unroll=unroll, masks=masks
        )
    seq = params["embedding.weight"][x].astype(
        params["rnn.weight_ih_l0"].dtype
    )  # (B, T, E), in the compute dtype
    finals = []
    for k in range(cfg.num_layers):
        xw = (
            seq @ params[f"rnn.weight_ih_l{k}"].T + params[f"rnn.bias_ih_l{k}"][None, None, :]
        )  # (B, T, G*H), all steps at once
        w_hh, b_hh = params[f"rnn.weight_hh_l{k}"], params[f"rnn.bias_hh_l{k}"]

        def step(s, xw_t, w_hh=w_hh, b_hh=b_hh):
            s = _cell(cfg.cell, xw_t, s, w_hh, b_hh)
            return s, s[0]

        s_k, hs = jax.lax.scan(
            step, tuple(part[k] for part in state), jnp.swapaxes(xw, 0, 1), unroll=unroll
        )
        seq = jnp.swapaxes(hs, 0, 1)  # (B, T, H)
        if masks is not None:
            seq = seq * masks[k]  # dropout: the carried state s_k is not dropped, only what goes on
        finals.append(s_k)
    final = tuple(jnp.stack([f[i] for f in finals]) for i in range(len(state)))
    return _head(seq, params["head.weight"], params["head.bias"]), final


def _head(seq, weight, bias):
    """The linear head; under mixed precision its output is widened to the bias's dtype before the bias is added."""
    return (seq @ weight.T).astype(bias.dtype) + bias[None, None, :]


def loss(
    params,
    x,
    y,
    state,
    *,
    cfg: ModelConfig,
    layer: str = "scan",
    unroll: int = 1,
    masks=None,
    compute_dtype=None,
):
    """Mean cross-entropy over every position (nats per character), and the final state.

    `masks`: dropout's, one (B, T, H) per layer (`charclip.dropout`), or None.

    `compute_dtype` (bfloat16, float16): mixed precision, the policy charclip.torch.model.CharRNN
    follows too. The recurrent weights, the head's weight, the carried state and the masks are
    cast to it (casts that autodiff turns into casts of the gradients back to the master
    dtype) and the model runs in it; embedding rows are gathered in the master dtype and then
    rounded, the head's output returns to the master dtype before its bias is added, and the
    softmax runs in the master dtype. So the two large gradient sums, over the gathered rows
    and over the head's B*T outputs, accumulate in float32: autodiff would otherwise sum them
    in bfloat16 (`lax.reduce_sum` does not widen; `jnp.sum` and torch's sum do).
    """
    master = params["head.weight"].dtype
    params, state = cast_for(params, state, compute_dtype)
    if masks is not None and compute_dtype is not None:
        masks = tuple(m.astype(compute_dtype) for m in masks)
    logits, final = apply(params, x, state, cfg=cfg, layer=layer, unroll=unroll, masks=masks)
    logits, final = logits.astype(master), tuple(part.astype(master) for part in final)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, y[..., None], axis=-1)
    return jnp.mean(nll), final


def cast_for(params, state, compute_dtype):
    """Parameters and state as mixed precision runs them (`loss`); unchanged when `compute_dtype` is None.

    The embedding and the head's bias stay in the master dtype (see `apply`).
    """
    if compute_dtype is None:
        return params, state
    params = {
        k: v if k in _MASTER_PRECISION else v.astype(compute_dtype) for k, v in params.items()
    }
    return params, tuple(part.astype(compute_dtype) for part in state)


def hidden_to_numpy(state) -> dict[str, np.ndarray] | None:
    if state is None:
        return None
    names = ("h", "c")
    return {names[i]: np.asarray(part).copy() for i, part in enumerate(state)}


def hidden_from_numpy(h: dict[str, np.ndarray] | None):
    if h is None:
        return None
    return (jnp.asarray(h["h"]), jnp.asarray(h["c"])) if "c" in h else (jnp.asarray(h["h"]),)
