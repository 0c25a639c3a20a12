"""What the parity tools need from the PyTorch backend beyond its trainer, in public.

Mirrors `charclip.jax.probe`: the forward logits of given weights, full float32
precision on a GPU, and the thread setting for running beside JAX.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from charclip.config import ModelConfig
from charclip.torch import device as D
from charclip.torch import model as M


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
    dev = D.resolve(device)
    with torch.no_grad():
        model = M.build(model_cfg, params, dev, compute_dtype)
        out, _ = model(torch.from_numpy(x).to(dev), M.hidden_from_numpy(hidden, dev))
    return out.cpu().numpy()


@contextlib.contextmanager
def full_precision(device: str):
    """On a GPU, no TF32 in cuDNN or matmuls; yields a note saying so (None on the CPU)."""
    if device != "gpu":
        yield None
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield "torch: full float32 precision pinned (cudnn.allow_tf32 = cuda.matmul.allow_tf32 = False)"
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@contextlib.contextmanager
def one_thread():
    """Run torch on one CPU thread while the backends alternate step by step.

    XLA's worker threads keep spinning for a moment after each JAX call; a second
    torch thread then fights them for the cores (measured on 2 cores: one tiny
    torch step took 0.5 s right after a JAX step, 2 ms with one thread).
    """
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
