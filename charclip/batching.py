"""Batches for truncated BPTT in the classic char-rnn way, identical for both backends.

The token array is cut into `batch_size` parallel streams of equal length.
Batch i of an epoch holds, for every stream, the `seq_len` tokens after
i * seq_len and, as targets, the same window shifted by one. Consecutive
batches continue each stream, so the hidden state can be carried over. Each
epoch starts the streams at a small offset drawn from the run's seed, so
epochs do not repeat the same windows; the offset is a pure function of
(seed, epoch), which is what makes a resumed run see the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from charclip.errors import CharclipError


@dataclass(frozen=True)
class Position:
    """Where a run is in its data: the epoch and the index of the next batch in it."""

    epoch: int = 0
    batch: int = 0


class Streams:
    def __init__(
        self, tokens: np.ndarray, batch_size: int, seq_len: int, *, what: str = "training text"
    ):
        need = batch_size * (seq_len + 1) + seq_len  # one batch after the largest epoch offset
        if len(tokens) < need:
            raise CharclipError(
                f"the {what} has {len(tokens)} characters, fewer than one batch needs "
                f"({need} = batch {batch_size} x (seq-len {seq_len} + 1) + seq-len); "
                "use a longer corpus or a smaller --batch-size / --seq-len"
            )
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.stream_len = (
            len(tokens) - seq_len
        ) // batch_size  # leaves room for any offset < seq_len

    @property
    def batches_per_epoch(self) -> int:
        return (self.stream_len - 1) // self.seq_len

    def offset(self, seed: int, epoch: int) -> int:
        return int(np.random.default_rng([seed, epoch]).integers(0, self.seq_len))

    def batch(self, seed: int, pos: Position) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and targets of one batch, both int64 of shape (batch_size, seq_len)."""
        start = self.offset(seed, pos.epoch)
        streams = self.tokens[start : start + self.batch_size * self.stream_len].reshape(
            self.batch_size, self.stream_len
        )
        t = pos.batch * self.seq_len
        return streams[:, t : t + self.seq_len], streams[:, t + 1 : t + 1 + self.seq_len]

    def next(self, pos: Position) -> Position:
        if pos.batch + 1 < self.batches_per_epoch:
            return Position(pos.epoch, pos.batch + 1)
        return Position(pos.epoch + 1, 0)

    def eval_batches(self, limit: int):
        """The first `limit` batches of epoch 0 at offset 0, for a comparable validation loss."""
        streams = self.tokens[: self.batch_size * self.stream_len].reshape(
            self.batch_size, self.stream_len
        )
        for i in range(min(limit, self.batches_per_epoch)):
            t = i * self.seq_len
            yield streams[:, t : t + self.seq_len], streams[:, t + 1 : t + 1 + self.seq_len]


def split(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Contiguous split: training first, validation at the end."""
    n_val = int(round(len(tokens) * val_fraction))
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]
