"""Frozen dataclasses shared by both backends and the CLI: one configuration system."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from charclip.errors import CharclipError
from charclip.schedules import SCHEDULES

CELLS = ("rnn", "lstm", "gru")
GATES = {"rnn": 1, "lstm": 4, "gru": 3}  # rows of W_ih / W_hh per hidden unit (PyTorch layout)
DTYPES = ("float32", "float64")
NONFINITE = ("error", "skip", "propagate")


@dataclass(frozen=True)
class ModelConfig:
    """Embedding -> `num_layers` recurrent layers of `cell` -> linear head to the vocabulary."""

    vocab_size: int
    cell: str = "lstm"
    hidden_size: int = 256
    num_layers: int = 2
    embedding_dim: int = 64

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise CharclipError(f"unknown cell {self.cell!r}; choose one of {', '.join(CELLS)}")
        for name in ("vocab_size", "hidden_size", "num_layers", "embedding_dim"):
            _positive_int(name, getattr(self, name))

    @property
    def gates(self) -> int:
        return GATES[self.cell]


@dataclass(frozen=True)
class ClipConfig:
    """How gradients are clipped: by global norm, by value, or not at all."""

    mode: str = "norm"  # "norm" | "value" | "none"
    max_norm: float = 0.5  # measured: clips the default run's warm-up spikes only (4 of 1500 steps)
    max_value: float = 5.0
    impl: str = "library"  # "library" | "reference"

    def __post_init__(self) -> None:
        if self.mode not in ("norm", "value", "none"):
            raise CharclipError(f"unknown clipping mode {self.mode!r}; use norm, value or none")
        if self.impl not in ("library", "reference"):
            raise CharclipError(f"unknown --clip-impl {self.impl!r}; use library or reference")
        if self.mode == "norm":
            _positive_float("--clip-norm", self.max_norm)
        if self.mode == "value":
            _positive_float("--clip-value", self.max_value)

    @property
    def threshold(self) -> float | None:
        """The norm threshold drawn on plots, or None when norm clipping is off."""
        return self.max_norm if self.mode == "norm" else None


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run apart from the model's shape."""

    steps: int = 1500
    batch_size: int = 64
    seq_len: int = 64
    lr: float = 3e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    seed: int = 0
    dtype: str = "float32"
    val_fraction: float = 0.1
    eval_every: int = 250
    eval_batches: int = 16
    checkpoint_every: int = 500
    nonfinite: str = "error"  # what a step with a NaN/inf loss or gradient does: error | skip | propagate
    accumulate: int = 1  # micro-batches per optimizer step (batch_size / accumulate streams each); clipped once, on their mean
    schedule: str = "constant"  # learning-rate schedule: constant | cosine | step (charclip.schedules)
    warmup_steps: int = 0  # linear warmup before the schedule (cosine, step)
    min_lr: float = 0.0  # cosine: the floor reached at decay_steps
    decay_steps: int = 0  # cosine: the step where it reaches min_lr (0: the run's steps)
    decay_every: int = 500  # step: steps between decays
    decay_factor: float = 0.5  # step: the rate is multiplied by this every decay_every steps
    clip: ClipConfig = field(default_factory=ClipConfig)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "checkpoint_every"):
            _positive_int(name.replace("_", "-"), getattr(self, name))
        _positive_float("--lr", self.lr)
        if self.dtype not in DTYPES:
            raise CharclipError(f"unknown --dtype {self.dtype!r}; use float32 or float64")
        if self.nonfinite not in NONFINITE:
            raise CharclipError(f"unknown --nonfinite {self.nonfinite!r}; use one of {', '.join(NONFINITE)}")
        _positive_int("accumulate", self.accumulate)
        if self.batch_size % self.accumulate:
            raise CharclipError(f"--batch-size {self.batch_size} does not split into --accumulate {self.accumulate} "
                                "equal micro-batches; use a multiple of it")
        if self.schedule not in SCHEDULES:
            raise CharclipError(f"unknown --schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}")
        for name in ("warmup_steps", "decay_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise CharclipError(f"--{name.replace('_', '-')} must be a non-negative integer, got {value!r}")
        _positive_int("decay-every", self.decay_every)
        if not (isinstance(self.min_lr, (int, float)) and math.isfinite(self.min_lr) and 0 <= self.min_lr <= self.lr):
            raise CharclipError(f"--min-lr must lie in [0, --lr {self.lr:g}], got {self.min_lr!r}")
        if not (isinstance(self.decay_factor, (int, float)) and 0 < self.decay_factor <= 1):
            raise CharclipError(f"--decay-factor must lie in (0, 1], got {self.decay_factor!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise CharclipError(f"--val-fraction must lie strictly between 0 and 1, got {self.val_fraction}")


def _positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CharclipError(f"{name} must be a positive integer, got {value!r}")


def _positive_float(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise CharclipError(f"{name} must be a positive finite number, got {value!r}")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def model_from_dict(d: dict) -> ModelConfig:
    return ModelConfig(**d)


def train_from_dict(d: dict) -> TrainConfig:
    d = dict(d)
    d["clip"] = ClipConfig(**d["clip"])
    return TrainConfig(**d)
