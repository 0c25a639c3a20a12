"""Dropout masks, drawn once in NumPy for both backends (char-rnn's placement).

With `--dropout p`, every recurrent layer's output is multiplied by a mask before it
goes on: into the next layer, or, for the last layer, into the linear head. The
embedding and the recurrent connections (the carried h and c) are never dropped, and
evaluation and sampling use no mask at all. Dropout is inverted (Srivastava et al.
2014, as torch.nn.Dropout does it): a kept unit is scaled by 1/(1 - p) while training,
so the expected activation is the same as without dropout and inference needs no
rescaling.

    mask[k][b, t, j] = 1/(1 - p)  if u >= p,   0  if u < p,    u ~ U[0, 1) (float32)

Both backends are handed the same arrays, so they drop the same units and a float64 run
with dropout still agrees across them to rounding. The generator of update `step` is
keyed by (seed, STREAM, step) alone, not by a running generator: the checkpoint's step
is the stream's position, so a resumed run draws exactly the masks the uninterrupted run
draws, with nothing more to store. The uniforms are float32 whatever the dtype (half the
bits of float64 to draw; 2^-24 resolution in p), so float32 and float64 runs drop the
same units.
"""

from __future__ import annotations

import numpy as np

STREAM = 0x64726F70  # "drop": keeps these draws apart from the other seeded streams (weights, batch offsets)


def masks(model_cfg, cfg, step: int, batch: int, seq_len: int) -> tuple[np.ndarray, ...] | None:
    """The masks of update `step` (0-based): one (batch, seq_len, hidden) array per recurrent layer.

    Values are 0 and 1/(1 - p) in `cfg.dtype`; None when `cfg.dropout` is 0 (no dropout).
    `model_cfg` is a ModelConfig and `cfg` a TrainConfig. With `accumulate` K the trainer
    splits the rows (streams) like the rows of the batch.
    """
    p = cfg.dropout
    if p == 0:
        return None
    rng = np.random.default_rng([cfg.seed, STREAM, step])
    u = rng.random((model_cfg.num_layers, batch, seq_len, model_cfg.hidden_size), dtype=np.float32)
    out = np.empty(u.shape, dtype=cfg.dtype)
    # Written into a preallocated array: one pass over the uniforms, no temporary of the mask's size
    np.multiply(u >= np.float32(p), np.asarray(1.0 / (1.0 - p), dtype=cfg.dtype), out=out)
    return tuple(out)
