"""Three ports of torch modules nobody here wrote, each with the slips a port can make.

Used by the tests, `benchmarks/port.py`, docs/porting.md and notebook 4. Imports torch, jax,
flax and equinox (the `port` extra); `charclip.parity` itself never imports this module.

- `transformer`: `nn.TransformerEncoder` of `nn.TransformerEncoderLayer`s (post-norm, GELU)
  between a Linear embedding and a Linear head, ported to Flax NNX (arrays matched by path,
  the packed attention projection by `mapping`; Flax's (in, out) kernels transposed);
- `gru`: a multi-layer `nn.GRU` and a Linear head, ported as a plain function over the
  state_dict with `lax.scan`, tapped per module;
- `convnet`: Conv2d, BatchNorm2d (eval), ReLU, MaxPool2d, Conv2d, AdaptiveAvgPool2d, Linear,
  ported to Equinox (OIHW weights as torch has them; the conv biases reshaped to (C, 1, 1)).

Each `make_*` returns `(torch_model, jax_side, batches, options)`; `broken=` picks a wrong
variant of the port (`BROKEN[name]` lists them, with where the proof must localise it).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx
from torch import nn

from charclip.parity.port import Optimizer
from charclip.parity.tap import tap

# name -> {broken variant: (phase, where) the proof must name}
BROKEN = {
    "transformer": {
        "layernorm_eps": ("forward", "encoder.layers.0.norm1"),
        "tanh_gelu": ("forward", "encoder.layers.0.activation"),
        "transposed_weight": ("forward", "encoder.layers.0.self_attn"),
    },
    "gru": {
        "gate_order": ("forward", "gru"),
        "missing_bias": ("forward", "gru"),
        "custom_backward": ("backward", "gru.bias_hh_l1"),
    },
    "convnet": {
        "transposed_weight": ("forward", "conv2"),
        "adam_eps_in_sqrt": ("step", "conv1.weight"),
    },
}


def _batches(rng, n: int, x_shape: tuple, classes: int, y_shape: tuple) -> list:
    return [(rng.standard_normal(x_shape), rng.integers(0, classes, y_shape)) for _ in range(n)]


# --- nn.TransformerEncoderLayer -> Flax NNX -------------------------------------------------


class TorchEncoder(nn.Module):
    def __init__(self, d_in: int, d_model: int, heads: int, layers: int, classes: int):
        super().__init__()
        self.embed = nn.Linear(d_in, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model,
            heads,
            dim_feedforward=2 * d_model,
            dropout=0.0,
            activation=nn.GELU(),
            batch_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x):  # (B, T, d_in) -> (B, T, classes)
        return self.head(self.encoder(self.embed(x)))


class Attention(nnx.Module):
    """Multi-head self-attention with one packed q, k, v projection, as torch's MultiheadAttention."""

    def __init__(self, d: int, heads: int, rngs: nnx.Rngs):
        self.in_proj = nnx.Linear(d, 3 * d, rngs=rngs)
        self.out_proj = nnx.Linear(d, d, rngs=rngs)
        self.heads = heads

    def __call__(self, x):  # (B, T, d)
        b, t, d = x.shape
        q, k, v = jnp.split(self.in_proj(x), 3, axis=-1)
        q, k, v = (a.reshape(b, t, self.heads, d // self.heads) for a in (q, k, v))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d // self.heads)
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).reshape(b, t, d)
        return self.out_proj(out)


class Gelu(nnx.Module):
    def __init__(self, approximate: bool = False):
        self.approximate = approximate

    def __call__(self, x):
        return jax.nn.gelu(x, approximate=self.approximate)


class EncoderLayer(nnx.Module):
    """Post-norm: x = norm1(x + attention(x)); x = norm2(x + linear2(gelu(linear1(x))))."""

    def __init__(
        self, d: int, heads: int, rngs: nnx.Rngs, eps: float = 1e-5, approximate: bool = False
    ):
        self.self_attn = Attention(d, heads, rngs)
        self.linear1, self.linear2 = (
            nnx.Linear(d, 2 * d, rngs=rngs),
            nnx.Linear(2 * d, d, rngs=rngs),
        )
        # torch's LayerNorm: the mean of squared deviations, not E[x^2] - E[x]^2
        self.norm1 = nnx.LayerNorm(d, epsilon=eps, use_fast_variance=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(d, epsilon=eps, use_fast_variance=False, rngs=rngs)
        self.activation = Gelu(approximate)

    def __call__(self, x):
        x = self.norm1(x + self.self_attn(x))
        return self.norm2(x + self.linear2(self.activation(self.linear1(x))))


class Stack(nnx.Module):
    def __init__(self, layers: list):
        self.layers = nnx.List(layers)

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class NnxEncoder(nnx.Module):
    def __init__(
        self,
        d_in: int,
        d_model: int,
        heads: int,
        layers: int,
        classes: int,
        *,
        eps: float = 1e-5,
        approximate: bool = False,
        seed: int = 0,
    ):
        rngs = nnx.Rngs(seed)
        self.embed = nnx.Linear(d_in, d_model, rngs=rngs)
        self.encoder = Stack(
            [EncoderLayer(d_model, heads, rngs, eps, approximate) for _ in range(layers)]
        )
        self.head = nnx.Linear(d_model, classes, rngs=rngs)

    def __call__(self, x):
        return self.head(self.encoder(self.embed(x)))


def transformer_mapping(layers: int, out_proj_layout: str = "transpose") -> dict:
    """torch packs q, k, v in `self_attn.in_proj_weight`; the NNX port names it `self_attn.in_proj`."""
    m = {}
    for i in range(layers):
        a = f"encoder.layers.{i}.self_attn"
        m[f"{a}.in_proj.kernel"] = (f"{a}.in_proj_weight", "transpose")
        m[f"{a}.in_proj.bias"] = f"{a}.in_proj_bias"
        m[f"{a}.out_proj.kernel"] = (f"{a}.out_proj.weight", out_proj_layout)
    return m


def make_transformer(
    broken: str | None = None,
    *,
    d_in: int = 6,
    d_model: int = 8,
    heads: int = 2,
    layers: int = 2,
    seq: int = 5,
    batch: int = 3,
    classes: int = 4,
    steps: int = 4,
    seed: int = 0,
):
    torch.manual_seed(seed)
    model = TorchEncoder(d_in, d_model, heads, layers, classes).eval()
    port = NnxEncoder(
        d_in,
        d_model,
        heads,
        layers,
        classes,
        eps=1e-6 if broken == "layernorm_eps" else 1e-5,
        approximate=broken == "tanh_gelu",
    )
    mapping = transformer_mapping(layers, "same" if broken == "transposed_weight" else "transpose")
    batches = _batches(
        np.random.default_rng(seed), steps, (batch, seq, d_in), classes, (batch, seq)
    )
    return (
        model,
        port,
        batches,
        dict(loss="cross_entropy", optimizer="adamw", lr=1e-3, max_norm=None, mapping=mapping),
    )


# --- multi-layer nn.GRU -> a plain function -------------------------------------------------


class TorchGRU(nn.Module):
    def __init__(self, d_in: int, hidden: int, layers: int, classes: int):
        super().__init__()
        self.gru = nn.GRU(d_in, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):  # (B, T, d_in) -> (B, T, classes)
        out, _ = self.gru(x)
        return self.head(out)


@jax.custom_vjp
def _scale_grad_bug(h):
    return h


# forward right, backward wrong: the gradient through the last layer's output comes back halved
_scale_grad_bug.defvjp(lambda h: (h, None), lambda _, g: (0.5 * g,))


def gru_port(layers: int, broken: str | None = None):
    """`forward(params, x)` over the state_dict: torch's GRU equations, gates in (r, z, n) order."""

    def cell(p, layer):
        w_ih, w_hh = p[f"gru.weight_ih_l{layer}"], p[f"gru.weight_hh_l{layer}"]
        b_ih, b_hh = p[f"gru.bias_ih_l{layer}"], p[f"gru.bias_hh_l{layer}"]
        if broken == "missing_bias":
            b_hh = jnp.zeros_like(b_hh)  # the hidden-side bias forgotten

        def step(h, xi):  # h (B, H), xi (B, 3H): the input projection, precomputed
            gh = h @ w_hh.T + b_hh[None, :]
            r_i, z_i, n_i = jnp.split(xi, 3, axis=-1)
            r_h, z_h, n_h = jnp.split(gh, 3, axis=-1)
            if broken == "gate_order":
                (r_i, z_i), (r_h, z_h) = (z_i, r_i), (z_h, r_h)  # read as (z, r, n)
            r, z = jax.nn.sigmoid(r_i + r_h), jax.nn.sigmoid(z_i + z_h)
            n = jnp.tanh(n_i + r * n_h)
            h = (1 - z) * n + z * h
            return h, h

        return step, w_ih, b_ih

    def forward(p, x):  # x (B, T, d_in)
        hs, seq = [], jnp.swapaxes(x, 0, 1)  # (T, B, d)
        for layer in range(layers):
            step, w_ih, b_ih = cell(p, layer)
            h0 = jnp.zeros((x.shape[0], w_ih.shape[0] // 3), x.dtype)
            h, seq = jax.lax.scan(step, h0, seq @ w_ih.T + b_ih[None, None, :])
            hs.append(h)
        out = jnp.swapaxes(seq, 0, 1)  # (B, T, H)
        if broken == "custom_backward":
            out = _scale_grad_bug(out)
        tap("gru", (out, jnp.stack(hs)))  # torch's GRU returns (output, h_n)
        return tap("head", out @ p["head.weight"].T + p["head.bias"][None, None, :])

    return forward


def make_gru(
    broken: str | None = None,
    *,
    d_in: int = 3,
    hidden: int = 6,
    layers: int = 2,
    seq: int = 7,
    batch: int = 4,
    classes: int = 5,
    steps: int = 4,
    seed: int = 0,
):
    torch.manual_seed(seed)
    model = TorchGRU(d_in, hidden, layers, classes)
    batches = _batches(
        np.random.default_rng(seed), steps, (batch, seq, d_in), classes, (batch, seq)
    )
    options = dict(
        loss="cross_entropy",
        optimizer=Optimizer("sgd", momentum=0.9, nesterov=True),
        lr=0.1,
        max_norm=None,
        clip_value=0.05,
    )  # value clipping: the same arithmetic in torch and optax
    return model, gru_port(layers, broken), batches, options


# --- a conv net with BatchNorm2d in eval mode -> Equinox ------------------------------------


class TorchConvNet(nn.Module):
    def __init__(self, channels: int = 3, classes: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * channels, classes)

    def forward(self, x):  # (B, 1, H, W) -> (B, classes)
        h = self.pool(self.act(self.bn1(self.conv1(x))))
        return self.head(self.gap(self.act(self.conv2(h))).flatten(1))


class BatchNormEval(eqx.Module):
    """BatchNorm2d in eval mode: the running statistics, per channel of a (C, H, W) input."""

    weight: jax.Array
    bias: jax.Array
    running_mean: jax.Array
    running_var: jax.Array
    eps: float = eqx.field(static=True, default=1e-5)

    def __call__(self, x):
        shape = (-1, 1, 1)
        scale = self.weight.reshape(shape) / jnp.sqrt(self.running_var.reshape(shape) + self.eps)
        return (x - self.running_mean.reshape(shape)) * scale + self.bias.reshape(shape)


class EqxConvNet(eqx.Module):
    conv1: eqx.nn.Conv2d
    bn1: BatchNormEval
    conv2: eqx.nn.Conv2d
    head: eqx.nn.Linear

    def __init__(self, channels: int = 3, classes: int = 4, *, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.conv1 = eqx.nn.Conv2d(1, channels, 3, padding=1, key=k1)
        c = jnp.zeros(channels)
        self.bn1 = BatchNormEval(c + 1, c, c, c + 1)
        self.conv2 = eqx.nn.Conv2d(channels, 2 * channels, 3, key=k2)
        self.head = eqx.nn.Linear(2 * channels, classes, key=k3)

    def __call__(self, x):  # (B, 1, H, W); Equinox layers take one example, so vmap over the batch
        each = jax.vmap
        h = tap("conv1", each(self.conv1)(x))
        h = tap("bn1", each(self.bn1)(h))
        h = tap("act", jax.nn.relu(h))
        b, c, hh, ww = h.shape
        h = tap("pool", h.reshape(b, c, hh // 2, 2, ww // 2, 2).max(axis=(3, 5)))  # MaxPool2d(2)
        h = tap("conv2", each(self.conv2)(h))
        h = tap("act#1", jax.nn.relu(h))
        h = tap("gap", h.mean(axis=(2, 3), keepdims=True))
        return tap("head", each(self.head)(h.reshape(b, -1)))


def make_convnet(
    broken: str | None = None,
    *,
    channels: int = 3,
    size: int = 8,
    batch: int = 4,
    classes: int = 4,
    steps: int = 4,
    seed: int = 0,
):
    torch.manual_seed(seed)
    model = TorchConvNet(channels, classes)
    with (
        torch.no_grad()
    ):  # running statistics as after some training, so eval-mode BatchNorm does something
        model.bn1.running_mean.uniform_(-0.5, 0.5)
        model.bn1.running_var.uniform_(0.5, 2.0)
    model.eval()
    port = EqxConvNet(channels, classes, key=jax.random.key(seed))
    options = dict(loss="cross_entropy", optimizer="adam", lr=1e-2, max_norm=None)
    if broken == "transposed_weight":
        options["mapping"] = {
            "conv2.weight": ("conv2.weight", lambda w: jnp.swapaxes(w, 2, 3))
        }  # kernel H, W swapped
    if broken == "adam_eps_in_sqrt":
        options["jax_optimizer"] = optax.adam(
            1e-2, eps=0.0, eps_root=1e-8
        )  # sqrt(v + eps), not sqrt(v) + eps
    batches = _batches(
        np.random.default_rng(seed), steps, (batch, 1, size, size), classes, (batch,)
    )
    return model, port, batches, options


MAKERS = {"transformer": make_transformer, "gru": make_gru, "convnet": make_convnet}
