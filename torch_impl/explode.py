"""The gradient of a last-step loss with respect to every hidden state, in PyTorch.

Mirrors `jax_impl.explode`. The model's own modules run one
time step per call (so nn.RNN's kernels do the work), and each intermediate
hidden state keeps its gradient with `retain_grad`. Used by `charclip explode`
(docs/exploding-gradients.md).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from charclip.config import ModelConfig
from torch_impl import model as M


def grad_through_time(model_cfg: ModelConfig, params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray):
    """Norms of dL/dh_{T-k} for k = 0..T, and the hidden states h_0..h_T.

    L is the cross-entropy of the last step only (mean over the batch), so the
    gradient reaching h_{T-k} has passed through exactly k recurrent Jacobians.
    h_0 is the zero initial state. Returns `norms` (T+1,), with norms[k] the
    L2 norm of dL/dh_{T-k} over all layers and sequences, and `states`
    (T+1, L, B, H).
    """
    model = M.build(model_cfg, params)
    dtype = next(model.parameters()).dtype
    B, T = x.shape
    h = torch.zeros(model_cfg.num_layers, B, model_cfg.hidden_size, dtype=dtype, requires_grad=True)
    c = torch.zeros_like(h) if "c" in model_cfg.state_parts else None
    hs = [h]
    for t in range(T):
        _, state = model.rnn(model.embedding(torch.from_numpy(x[:, t : t + 1])), h if c is None else (h, c))
        h, c = state if c is not None else (state, None)  # h (L, B, H)
        h.retain_grad()  # a non-leaf tensor keeps its .grad only when asked
        hs.append(h)
    loss = F.cross_entropy(model.head(h[-1]), torch.from_numpy(y[:, -1]))  # the top layer's h_T predicts y_T
    loss.backward()
    norms = np.array([torch.linalg.vector_norm(hs[T - k].grad).item() for k in range(T + 1)])
    return norms, np.stack([s.detach().numpy() for s in hs])
