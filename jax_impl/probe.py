"""What the parity tools need from the JAX backend beyond its trainer, in public.

Mirrors `torch_impl.probe`: the forward logits of given weights, full float32
precision on a GPU, and the thread setting for running beside PyTorch.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np

from charclip.config import ModelConfig
from jax_impl import device as D
from jax_impl import model as M
from jax_impl.train import optax_update


def logits(model_cfg: ModelConfig, params: dict[str, np.ndarray], x: np.ndarray, hidden, device: str = "cpu",
           compute_dtype: str | None = None) -> np.ndarray:
    """The forward pass's logits (B, T, V) of `params` on tokens x (B, T) from `hidden` (or zeros).

    `compute_dtype` ("bfloat16", "float16"): computed as mixed precision training computes them.
    """
    D.enable_x64()  # float64 parameters stay float64
    dev = D.resolve(device)
    p = jax.device_put({k: jnp.asarray(v) for k, v in params.items()}, dev)
    dtype = next(iter(p.values())).dtype
    state = M.hidden_from_numpy(hidden) if hidden is not None else M.zero_state(model_cfg, x.shape[0], dtype)
    p, state = M.cast_for(p, state, None if compute_dtype is None else jnp.dtype(compute_dtype))
    out, _ = M.apply(p, jax.device_put(x, dev), jax.device_put(state, dev), cfg=model_cfg)
    return np.asarray(out.astype(dtype))


@contextlib.contextmanager
def full_precision(device: str):
    """On a GPU, float32 matmuls at full precision (JAX's default there is TF32); yields a note."""
    if device != "gpu":
        yield None
        return
    with jax.default_matmul_precision("highest"):
        yield "JAX: full float32 precision pinned (default_matmul_precision = 'highest')"


@contextlib.contextmanager
def one_thread():
    """Nothing to change: XLA's pool is what torch's one thread makes room for."""
    yield


def port_quantities(apply, params: dict[str, np.ndarray], trainable: list[str], batches, *,
                    loss: str, lr: float, max_norm: float) -> dict:
    """A user's JAX function `apply(params, x)` through the port ladder (`charclip.parity.port`).

    `params` holds every entry of the torch module's `state_dict`; gradients are taken for
    the `trainable` ones. Same quantities as `torch_impl.probe.port_quantities`, with
    `optax.clip_by_global_norm(max_norm)` chained before `optax.sgd(lr)`.
    """
    import optax

    D.enable_x64()  # float64 parameters stay float64
    full = {k: jnp.asarray(v) for k, v in params.items()}
    frozen = {k: v for k, v in full.items() if k not in trainable}
    dtype = next(iter(full.values())).dtype

    def as_array(a: np.ndarray) -> jax.Array:
        a = jnp.asarray(a)
        return a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a

    def loss_of(train, x, y):
        out = apply({**frozen, **train}, x)
        if loss == "mse":
            return jnp.mean((out - y) ** 2), out
        logp = jax.nn.log_softmax(out.reshape(-1, out.shape[-1]), axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, y.reshape(-1)[:, None], axis=-1)), out

    tx = optax.chain(optax.clip_by_global_norm(max_norm), optax.sgd(lr))
    clip = optax.clip_by_global_norm(max_norm)

    @jax.jit
    def step(train, opt_state, x, y):
        (value, out), grads = jax.value_and_grad(loss_of, has_aux=True)(train, x, y)
        clipped, _ = optax_update(clip, grads, clip.init(train), train)
        updates, opt_state = optax_update(tx, grads, opt_state, train)
        return optax.apply_updates(train, updates), opt_state, value, out, grads, optax.tree.norm(grads), clipped

    train = {k: full[k] for k in trainable}
    opt_state = tx.init(train)

    def numpy(tree) -> dict[str, np.ndarray]:
        return {k: np.asarray(v).copy() for k, v in tree.items()}

    x, y = batches[0]
    train, opt_state, value, out, grads, norm, clipped = step(train, opt_state, as_array(x), as_array(y))
    first = {"output": np.asarray(out), "loss": float(value), "grad": numpy(grads), "grad_norm": float(norm),
             "clipped": numpy(clipped), "after_step": numpy(train)}
    losses, params_per_step = [float(value)], [first["after_step"]]
    for x, y in batches[1:]:
        train, opt_state, value, *_ = step(train, opt_state, as_array(x), as_array(y))
        losses.append(float(value))
        params_per_step.append(numpy(train))
    return {**first, "losses": losses, "params": params_per_step}
