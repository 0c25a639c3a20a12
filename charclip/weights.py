"""Initial weights from one seeded NumPy generator, in PyTorch's layout and distributions.

Both backends start from these arrays, so the same seed gives the same initial
model in PyTorch and in JAX. The names, shapes and layouts are those of
`charclip.torch.model.CharRNN().state_dict()`; the distributions are PyTorch's
defaults:

- `embedding.weight` (V, E): N(0, 1), as nn.Embedding.
- `rnn.weight_ih_l{k}` (G*H, E or H), `rnn.weight_hh_l{k}` (G*H, H), `rnn.bias_ih_l{k}`,
  `rnn.bias_hh_l{k}` (G*H,): U(-1/sqrt(H), 1/sqrt(H)), as nn.RNN/LSTM/GRU. G is 1, 4
  (gates i, f, g, o) or 3 (gates r, z, n).
- `head.weight` (V, H), `head.bias` (V,): U(-1/sqrt(H), 1/sqrt(H)), which is what
  nn.Linear's kaiming_uniform(a=sqrt(5)) and its bias rule come to.
"""

from __future__ import annotations

import numpy as np

from charclip.config import ModelConfig


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The state_dict names and shapes, in the order PyTorch lists them."""
    H, G = cfg.hidden_size, cfg.gates
    shapes: dict[str, tuple[int, ...]] = {"embedding.weight": (cfg.vocab_size, cfg.embedding_dim)}
    for k in range(cfg.num_layers):
        n_in = cfg.embedding_dim if k == 0 else H
        shapes[f"rnn.weight_ih_l{k}"] = (G * H, n_in)
        shapes[f"rnn.weight_hh_l{k}"] = (G * H, H)
        shapes[f"rnn.bias_ih_l{k}"] = (G * H,)
        shapes[f"rnn.bias_hh_l{k}"] = (G * H,)
    shapes["head.weight"] = (cfg.vocab_size, H)
    shapes["head.bias"] = (cfg.vocab_size,)
    return shapes


def init_params(cfg: ModelConfig, seed: int, dtype: str = "float32") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    bound = 1.0 / np.sqrt(cfg.hidden_size)
    params = {}
    for name, shape in param_shapes(cfg).items():
        if name == "embedding.weight":
            values = rng.standard_normal(shape)
        else:
            values = rng.uniform(-bound, bound, shape)
        params[name] = values.astype(dtype)
    return params


def scale_spectral_radius(w_hh: np.ndarray, rho: float) -> np.ndarray:
    """W_hh rescaled so that its spectral radius (largest |eigenvalue|) is rho."""
    radius = np.max(np.abs(np.linalg.eigvals(w_hh.astype(np.float64))))
    return (w_hh * (rho / radius)).astype(w_hh.dtype)
