"""Autoregressive sampling in PyTorch: one character in, next-character logits out."""

from __future__ import annotations

import numpy as np
import torch

from charclip import sampling
from charclip.config import ModelConfig
from charclip.torch import device as D
from charclip.torch import model as M
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
    dev = D.resolve(device)
    model = M.build(cfg, params, dev).eval()

    @torch.no_grad()
    def step(token: int, h):
        logits, h = model(torch.tensor([[token]], device=dev), h)  # (1, 1, V)
        return logits[0, -1].cpu().numpy(), h

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
