"""Autoregressive sampling in JAX: one character in, next-character logits out."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from charclip import sampling
from charclip.config import ModelConfig
from charclip.jax import device as D
from charclip.jax import model as M
from charclip.vocab import Vocab


def sample(
    cfg: ModelConfig,
    params: dict[str, np.ndarray],
    vocab: Vocab,
    prime: str,
    length: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    device: str = "cpu",
    emit=None,
) -> str:
    D.enable_x64()  # a float64 checkpoint samples in float64
    dev = D.resolve(device)
    p = jax.device_put({k: jnp.asarray(v) for k, v in params.items()}, dev)
    dtype = next(iter(p.values())).dtype
    forward = jax.jit(lambda p, token, state: M.apply(p, token, state, cfg=cfg))

    def step(token: int, state):
        state = state if state is not None else M.zero_state(cfg, 1, dtype)
        logits, state = forward(p, jnp.full((1, 1), token, jnp.int32), state)  # (1, 1, V)
        return np.asarray(logits[0, -1]), state

    return sampling.generate(
        step,
        vocab,
        prime,
        length,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        emit=emit,
    )
