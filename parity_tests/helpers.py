"""Small shared pieces for the tests: a short corpus and tiny configurations."""

from __future__ import annotations

import json
from pathlib import Path

from charclip import checkpoint as ckpt_io
from charclip import cli, corpus
from charclip.config import ClipConfig, ModelConfig, TrainConfig


def small_corpus(tmp_path, chars: int = 30_000):
    """The first `chars` characters of the embedded Shakespeare, as a file."""
    path = tmp_path / "small.txt"
    path.write_text(corpus.shakespeare()[:chars], encoding="utf-8")
    return path


def tiny_model(vocab_size: int, cell: str = "lstm", layers: int = 1) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab_size, cell=cell, hidden_size=24, num_layers=layers, embedding_dim=8
    )


def tiny_train(**overrides) -> TrainConfig:
    base = dict(
        steps=20,
        batch_size=8,
        seq_len=16,
        lr=1e-2,
        eval_every=10,
        eval_batches=2,
        checkpoint_every=10,
        dtype="float64",
        clip=ClipConfig(max_norm=1.0),
    )
    base.update(overrides)
    return TrainConfig(**base)


def train_cli(tmp_path, backend, data, *extra, name=None):
    """A 20-step float64 run of a small 2-layer LSTM through the CLI; returns its run folder."""
    out = tmp_path / (name or backend)
    argv = [
        "train",
        "--backend",
        backend,
        "--data",
        str(data),
        "--out",
        str(out),
        "--steps",
        "20",
        "--batch-size",
        "8",
        "--seq-len",
        "16",
        "--hidden",
        "24",
        "--embed",
        "8",
        "--layers",
        "2",
        "--dtype",
        "float64",
        "--clip-norm",
        "0.5",
        "--eval-every",
        "10",
        "--eval-batches",
        "2",
        "--sample-chars",
        "0",
        "--no-progress",
        *extra,
    ]
    assert cli.main(argv) == 0
    return out


def reseal(folder: Path) -> None:
    """Record the SHA-256 of a checkpoint's edited checkpoint.json, as a careful forger would, so
    that a test's edit meets the loader's other checks rather than the seal."""
    raw = (Path(folder) / ckpt_io.META_FILE).read_bytes()
    (Path(folder) / ckpt_io.META_SEAL_FILE).write_text(ckpt_io.seal(raw), encoding="ascii")


def rewrite_meta(folder: Path, meta: dict) -> None:
    """Write `meta` as the checkpoint's checkpoint.json, resealed."""
    (Path(folder) / ckpt_io.META_FILE).write_text(json.dumps(meta), encoding="utf-8")
    reseal(folder)
