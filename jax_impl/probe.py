"""What the parity tools need from the JAX backend beyond its trainer, in public.

Mirrors `charclip.torch.probe`: the forward logits of given weights, full float32
precision on a GPU, and the thread setting for running beside PyTorch.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np

from charclip.config import ModelConfig
from charclip.jax import device as D
from charclip.jax import model as M


def logits(
    model_cfg: ModelConfig,
    params: dict[str, np.ndarray],
    x: np.ndarray,
    hidden,
    device: str = "cpu",
    compute_dtype: str | None = None,
) -> np.ndarray:
    """The forward pass's logits (B, T, V) of `params` on tokens x (B, T) from `hidden` (or zeros).

    `compute_dtype` ("bfloat16", "float16"): computed as mixed precision training computes them.
    """
    D.enable_x64()  # float64 parameters stay float64
    dev = D.resolve(device)
    p = jax.device_put({k: jnp.asarray(v) for k, v in params.items()}, dev)
    dtype = next(iter(p.values())).dtype
    state = (
        M.hidden_from_numpy(hidden)
        if hidden is not None
        else M.zero_state(model_cfg, x.shape[0], dtype)
    )
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
