"""Small shared pieces for the tests: a short corpus and tiny configurations."""

from __future__ import annotations

from charclip import corpus
from charclip.config import ClipConfig, ModelConfig, TrainConfig


def small_corpus(tmp_path, chars: int = 30_000):
    """The first `chars` characters of the embedded Shakespeare, as a file."""
    path = tmp_path / "small.txt"
    path.write_text(corpus.shakespeare()[:chars], encoding="utf-8")
    return path


def tiny_model(vocab_size: int, cell: str = "lstm", layers: int = 1) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, cell=cell, hidden_size=24, num_layers=layers, embedding_dim=8)


def tiny_train(**overrides) -> TrainConfig:
    base = dict(steps=20, batch_size=8, seq_len=16, lr=1e-2, eval_every=10, eval_batches=2,
                checkpoint_every=10, dtype="float64", clip=ClipConfig(max_norm=1.0))
    base.update(overrides)
    return TrainConfig(**base)
