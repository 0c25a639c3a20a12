"""Frozen dataclasses shared by both backends and the CLI: one configuration system.

Every field a user can set carries its command-line spelling in its metadata
(`option(...)`): the flag, the help text, the choices and what `--resume` does with
it. `charclip.cli` builds its parsers from these, so a default, a help text and the
resume rule are each written once, here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from charclip.clipspec import CONVENTIONS, NONFINITE_POLICIES
from charclip.errors import CharclipError
from charclip.schedules import SCHEDULES

# Whose code clips (the framework's library, or charclip's drop-ins), and the formula each
# backend's library clips by (docs/clipping.md, step 2).
CLIP_IMPLS = ("library", "charclip")
CLIP_IMPL_CHOICES = CLIP_IMPLS + ("reference",)  # "reference": the former name, accepted and mapped
LIBRARY_CONVENTION = {"torch": "torch", "jax": "optax"}
# The cells, described once: rows of W_ih / W_hh per hidden unit (PyTorch layout), and the parts
# of the state carried from step to step (each (L, B, H)). Every backend asks this table.
CELL_GATES_AND_STATE = {"rnn": (1, ("h",)), "lstm": (4, ("h", "c")), "gru": (3, ("h",))}
CELLS = tuple(CELL_GATES_AND_STATE)
GATES = {cell: gates for cell, (gates, _) in CELL_GATES_AND_STATE.items()}
BACKENDS = ("torch", "jax")
DEVICES = ("cpu", "gpu")
# How several devices share a run: torch's processes (--parallel), JAX's mesh (--mesh);
# docs/distributed.md.
LAYOUTS = {"torch": ("ddp", "fsdp"), "jax": ("data", "model", "fsdp", "2d", "shard_map")}
DTYPES = ("float32", "float64")
# Arithmetic of the forward and backward passes. "full": in --dtype; "bf16" / "fp16": a bfloat16 /
# float16 copy of the float32 master weights each step, gradients and Adam in float32 (docs/precision.md).
PRECISIONS = ("full", "bf16", "fp16")
COMPUTE_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
# What --resume does with an option: "kept" (the checkpoint's value wins; a given flag is named
# as ignored), "extends" (--steps: the checkpoint's unless given), "used" (applies to this invocation).
RESUME_RULES = ("kept", "extends", "used")
_DTYPE_MAX = {
    "float32": 3.4028234663852886e38,
    "float64": 1.7976931348623157e308,
}  # numpy.finfo(dtype).max


def option(
    default=dataclasses.MISSING,
    *,
    flag: str,
    help: str,
    choices: tuple | None = None,
    resume: str = "kept",
    group: str | None = None,
    type=None,
    shown: str | None = None,
    metavar: str | None = None,
    action: str | None = None,
    const=None,
    default_factory=dataclasses.MISSING,
):
    """A dataclass field that is also a command-line option (see `charclip.cli`)."""
    assert resume in RESUME_RULES, resume
    meta = {
        "flag": flag,
        "help": help,
        "choices": choices,
        "resume": resume,
        "group": group,
        "type": type,
        "shown": shown,
        "metavar": metavar,
        "action": action,
        "const": const,
    }
    return field(default=default, default_factory=default_factory, metadata=meta)


def options(cls) -> list[dataclasses.Field]:
    """The fields of `cls` that are command-line options, in declaration order."""
    return [f for f in dataclasses.fields(cls) if "flag" in f.metadata]


def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _clip_impl(
    default: str,
    *,
    help: str,
    resume: str = "kept",
    group: str | None = None,
    shown: str | None = None,
):
    """--clip-impl, as train and parity declare it: whose code clips (CLIP_IMPL_CHOICES)."""
    return option(
        default,
        flag="--clip-impl",
        choices=CLIP_IMPL_CHOICES,
        resume=resume,
        group=group,
        shown=shown,
        help=help,
    )


@dataclass(frozen=True)
class ModelConfig:
    """Embedding -> `num_layers` recurrent layers of `cell` -> linear head to the vocabulary."""

    vocab_size: int
    cell: str = option("lstm", flag="--cell", choices=CELLS, group="model", help="recurrent cell")
    hidden_size: int = option(256, flag="--hidden", group="model", help="hidden units per layer")
    num_layers: int = option(2, flag="--layers", group="model", help="stacked recurrent layers")
    embedding_dim: int = option(64, flag="--embed", group="model", help="embedding size")

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise CharclipError(f"unknown cell {self.cell!r}; choose one of {', '.join(CELLS)}")
        for name in ("vocab_size", "hidden_size", "num_layers", "embedding_dim"):
            _positive_int(_flag(type(self), name), getattr(self, name))

    @property
    def gates(self) -> int:
        """Rows of W_ih / W_hh per hidden unit: 1 (rnn), 4 (lstm), 3 (gru)."""
        return GATES[self.cell]

    @property
    def state_parts(self) -> tuple[str, ...]:
        """The carried state's parts, each (L, B, H): ("h",), or ("h", "c") for the LSTM."""
        return CELL_GATES_AND_STATE[self.cell][1]


@dataclass(frozen=True)
class ClipConfig:
    """How gradients are clipped: by global norm, by value, or not at all."""

    mode: str = option(
        "norm",
        flag="--no-clip",
        action="store_const",
        const="none",
        group="clipping",
        help="do not clip (the mode is norm, or value with --clip-value)",
    )  # "norm" | "value" | "none"
    # measured: 0.5 clips the default run's warm-up spikes only (4 of 1500 steps)
    max_norm: float = option(
        0.5,
        flag="--clip-norm",
        metavar="TAU",
        group="clipping",
        help="clip the global L2 norm of the gradient to TAU (the default mode)",
    )
    # 5.0 serves ClipConfig(mode="value") in Python; on the command line --clip-value takes its V
    max_value: float = option(
        5.0,
        flag="--clip-value",
        metavar="V",
        group="clipping",
        shown="none, V is required",
        help="instead, clamp every gradient component to [-V, V]",
    )
    # Whose code clips, and by which formula (docs/clipping.md), are two questions: two options.
    impl: str = _clip_impl(
        "library",
        group="clipping",
        help=(
            "library: torch's clip_grad_norm_ / optax.clip_by_global_norm; charclip: charclip's "
            "own (reference, the former name: charclip with --clip-convention optax)"
        ),
    )
    convention: str | None = option(
        None,
        flag="--clip-convention",
        choices=CONVENTIONS,
        type=str,
        group="clipping",
        shown="the backend's library's: torch in torch, optax in jax",
        help="torch: g * min(1, tau / (n + 1e-6)); optax: g * tau / n once n >= tau",
    )

    def __post_init__(self) -> None:
        if self.mode not in ("norm", "value", "none"):
            raise CharclipError(f"unknown clipping mode {self.mode!r}; use norm, value or none")
        if self.impl == "reference":  # the former spelling (old checkpoints keep it)
            object.__setattr__(self, "impl", "charclip")
            object.__setattr__(self, "convention", self.convention or "optax")
        if self.impl not in CLIP_IMPLS:
            raise CharclipError(f"unknown --clip-impl {self.impl!r}; use {' or '.join(CLIP_IMPLS)}")
        if self.convention is not None and self.convention not in CONVENTIONS:
            raise CharclipError(
                f"unknown --clip-convention {self.convention!r}; use {' or '.join(CONVENTIONS)}"
            )
        if self.mode == "norm":
            _positive_float("--clip-norm", self.max_norm)
        if self.mode == "value":
            _positive_float("--clip-value", self.max_value)

    def convention_in(self, backend: str) -> str:
        """The formula this run clips by in `backend` ("torch" or "jax"): the chosen one, else
        its library's."""
        return self.convention or LIBRARY_CONVENTION[backend]

    def check_for(self, backend: str) -> None:
        """A library clips by its own formula only: say so rather than silently use another."""
        own = LIBRARY_CONVENTION[backend]
        if self.impl == "library" and self.mode == "norm" and self.convention_in(backend) != own:
            library = (
                "torch's clip_grad_norm_" if backend == "torch" else "optax.clip_by_global_norm"
            )
            raise CharclipError(
                f"--clip-convention {self.convention} with --clip-impl library: "
                f"{library} has the {own} convention only; use --clip-impl charclip"
            )

    @property
    def threshold(self) -> float | None:
        """The norm threshold drawn on plots, or None when norm clipping is off."""
        return self.max_norm if self.mode == "norm" else None


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run apart from the model's shape."""

    steps: int = option(
        1500,
        flag="--steps",
        resume="extends",
        group="optimisation",
        help="training steps (with --resume: the checkpoint's, unless a larger number is given)",
    )
    batch_size: int = option(
        64, flag="--batch-size", group="optimisation", help="parallel streams per batch"
    )
    seq_len: int = option(64, flag="--seq-len", group="optimisation", help="truncated-BPTT length")
    lr: float = option(3e-3, flag="--lr", group="optimisation", help="Adam learning rate")
    beta1: float = (
        0.9  # Adam's, as torch.optim.Adam and optax.adam default them; not on the command line
    )
    beta2: float = 0.999
    eps: float = 1e-8
    seed: int = option(
        0,
        flag="--seed",
        group="optimisation",
        help="seed of the initial weights, the epochs' batch offsets and the closing sample",
    )
    dtype: str = option(
        "float32",
        flag="--dtype",
        choices=DTYPES,
        group="optimisation",
        help="floating-point type of parameters and arithmetic",
    )
    precision: str = option(
        "full",
        flag="--precision",
        choices=PRECISIONS,
        group="optimisation",
        help="full: compute in --dtype; bf16 or fp16: forward and backward in bfloat16 or float16 "
        "with float32 master weights and Adam state; fp16 with dynamic loss scaling",
    )
    # fp16's dynamic loss scale, torch.amp.GradScaler's rule and defaults: start at 2**16, halve it and
    # skip the step when the scaled gradient overflows, double it after `growth_interval` clean steps.
    loss_scale_init: float = 2.0**16
    loss_scale_growth: float = 2.0
    loss_scale_backoff: float = 0.5
    loss_scale_interval: int = 2000
    val_fraction: float = option(
        0.1,
        flag="--val-fraction",
        group="data and output",
        help="share of the text kept for validation, at its end",
    )
    eval_every: int = option(
        250, flag="--eval-every", group="reporting", help="steps between validation losses"
    )
    eval_batches: int = option(
        16, flag="--eval-batches", group="reporting", help="validation batches per evaluation"
    )
    checkpoint_every: int = option(
        500,
        flag="--checkpoint-every",
        group="reporting",
        help="steps between checkpoints (one is also written at the end)",
    )
    nonfinite: str = option(
        "error",
        flag="--nonfinite",
        choices=NONFINITE_POLICIES,
        group="clipping",
        help="a step with a NaN/inf loss or gradient: stop with a checkpoint (error), "
        "drop it (skip), or apply it anyway (propagate)",
    )
    accumulate: int = option(
        1,
        flag="--accumulate",
        metavar="K",
        group="optimisation",
        help="micro-batches per optimizer step, batch-size/K streams each; the gradient is their "
        "mean, clipped once after the last",
    )
    schedule: str = option(
        "constant",
        flag="--schedule",
        choices=SCHEDULES,
        group="optimisation",
        help="learning-rate schedule: constant; cosine (nanoGPT: warmup, then a half cosine to "
        "--min-lr at --decay-steps); step (char-rnn: x --decay-factor every --decay-every steps)",
    )
    warmup_steps: int = option(
        0,
        flag="--warmup-steps",
        group="optimisation",
        help="cosine and step schedules: steps of linear warmup to --lr first",
    )
    min_lr: float = option(
        0.0, flag="--min-lr", group="optimisation", help="cosine schedule: the floor it decays to"
    )
    decay_steps: int = option(
        0,
        flag="--decay-steps",
        group="optimisation",
        help="cosine schedule: the step where it reaches --min-lr (0: --steps, fixed when the run starts)",
    )
    decay_every: int = option(
        500, flag="--decay-every", group="optimisation", help="step schedule: steps between decays"
    )
    decay_factor: float = option(
        0.5,
        flag="--decay-factor",
        group="optimisation",
        help="step schedule: the rate is multiplied by this at every decay",
    )
    dropout: float = option(
        0.0,
        flag="--dropout",
        metavar="P",
        group="optimisation",
        help="char-rnn's dropout: each recurrent layer's output (into the next layer, or the head) "
        "loses each unit with probability P while training; never in evaluation or sampling",
    )
    clip: ClipConfig = field(default_factory=ClipConfig)

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "batch_size",
            "seq_len",
            "eval_every",
            "eval_batches",
            "checkpoint_every",
        ):
            _positive_int(_flag(type(self), name), getattr(self, name))
        _positive_float("--lr", self.lr)
        for name in ("beta1", "beta2"):  # Adam divides by 1 - beta**t: beta must lie in [0, 1)
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not 0.0 <= value < 1.0
            ):
                raise CharclipError(f"{name} must lie in [0, 1), got {value!r}")
        _positive_float("eps", self.eps)
        if (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0
        ):  # NumPy's generators need >= 0
            raise CharclipError(f"--seed must be a non-negative integer, got {self.seed!r}")
        if self.dtype not in DTYPES:
            raise CharclipError(f"unknown --dtype {self.dtype!r}; use float32 or float64")
        if self.precision not in PRECISIONS:
            raise CharclipError(
                f"unknown --precision {self.precision!r}; use one of {', '.join(PRECISIONS)}"
            )
        # Adam's first step moves a parameter by lr / (1 - beta1): it must be a number of the parameters'
        # dtype (float32 master weights under bf16/fp16), or torch cannot even form it.
        if self.lr / (1.0 - self.beta1) > _DTYPE_MAX.get(self.dtype, math.inf):
            raise CharclipError(
                f"--lr {self.lr:g} is too large for {self.dtype} parameters: Adam's first step "
                f"(lr / (1 - beta1)) would exceed {self.dtype}'s largest number; use a smaller --lr"
            )
        if self.precision != "full" and self.dtype != "float32":
            raise CharclipError(
                f"--precision {self.precision} keeps float32 master weights; it needs --dtype float32, "
                f"not {self.dtype}"
            )
        # Powers of two keep scaling, unscaling and every rescale exact in float32, so both
        # backends (torch rounds factor * scale once in double, JAX in float32) hold the same scale.
        _power_of_two("loss_scale_init", self.loss_scale_init, 2.0**-24, 2.0**64)
        _power_of_two("loss_scale_growth", self.loss_scale_growth, 2.0, 2.0**8)
        _power_of_two("loss_scale_backoff", self.loss_scale_backoff, 2.0**-8, 0.5)
        _positive_int("loss_scale_interval", self.loss_scale_interval)
        if self.nonfinite not in NONFINITE_POLICIES:
            raise CharclipError(
                f"unknown --nonfinite {self.nonfinite!r}; use one of {', '.join(NONFINITE_POLICIES)}"
            )
        _positive_int("--accumulate", self.accumulate)
        if self.batch_size % self.accumulate:
            raise CharclipError(
                f"--batch-size {self.batch_size} does not split into --accumulate {self.accumulate} "
                "equal micro-batches; use a multiple of it"
            )
        if self.schedule not in SCHEDULES:
            raise CharclipError(
                f"unknown --schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}"
            )
        for name in ("warmup_steps", "decay_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise CharclipError(
                    f"--{name.replace('_', '-')} must be a non-negative integer, got {value!r}"
                )
        _positive_int("--decay-every", self.decay_every)
        if not (
            isinstance(self.min_lr, (int, float))
            and math.isfinite(self.min_lr)
            and 0 <= self.min_lr <= self.lr
        ):
            raise CharclipError(f"--min-lr must lie in [0, --lr {self.lr:g}], got {self.min_lr!r}")
        if not (isinstance(self.decay_factor, (int, float)) and 0 < self.decay_factor <= 1):
            raise CharclipError(f"--decay-factor must lie in (0, 1], got {self.decay_factor!r}")
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not 0.0 <= self.dropout < 1.0
        ):
            raise CharclipError(
                f"--dropout must lie in [0, 1), got {self.dropout!r}"
            )  # p = 1 would drop every unit
        if not 0.0 < self.val_fraction < 1.0:
            raise CharclipError(
                f"--val-fraction must lie strictly between 0 and 1, got {self.val_fraction}"
            )


def compute_dtype(cfg: TrainConfig) -> str:
    """The dtype the forward and backward passes run in: --dtype, or bfloat16 / float16."""
    return COMPUTE_DTYPES.get(cfg.precision, cfg.dtype)


def loss_scaled(cfg: TrainConfig) -> bool:
    """Whether the run uses a dynamic loss scale (fp16 only: bfloat16 has float32's range)."""
    return cfg.precision == "fp16"


def _power_of_two(name: str, value, low: float, high: float) -> None:
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and low <= value <= high
    )
    if not ok or math.frexp(value)[0] != 0.5:
        raise CharclipError(
            f"{name} must be a power of two between {low:g} and {high:g}, got {value!r}"
        )


def _flag(cls, name: str) -> str:
    """The option a user types for the field `name` (messages name it), or the field's name if it has none."""
    return next((f.metadata["flag"] for f in options(cls) if f.name == name), name)


def _choice(cls, name: str, value) -> None:
    """A field declared with choices holds one of them (None where None is its default)."""
    f = next(f for f in options(cls) if f.name == name)
    if value not in f.metadata["choices"] and not (value is None and default_of(f) is None):
        choices = ", ".join(f.metadata["choices"])
        raise CharclipError(f"unknown {f.metadata['flag']} {value!r}; use one of {choices}")


def _positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CharclipError(f"{name} must be a positive integer, got {value!r}")


def _positive_float(name: str, value: float) -> None:
    if not (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    ):
        raise CharclipError(f"{name} must be a positive finite number, got {value!r}")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def model_from_dict(d: dict) -> ModelConfig:
    return ModelConfig(**d)


def train_from_dict(d: dict) -> TrainConfig:
    d = dict(d)
    d["clip"] = ClipConfig(**d["clip"])
    return TrainConfig(**d)


def _backend(default: str | None, shown: str | None = None):
    return option(
        default,
        flag="--backend",
        choices=BACKENDS,
        type=str,
        resume="used",
        shown=shown,
        help="framework to run in",
    )


def _device():
    return option("cpu", flag="--device", choices=DEVICES, resume="used", help="where to run")


@dataclass(frozen=True)
class RunOptions:
    """What one `charclip train` invocation does around the run; not stored in the checkpoint."""

    backend: str | None = _backend(
        None, shown="torch; with --resume, the backend that wrote the checkpoint"
    )
    device: str = _device()
    data: str | None = option(
        None,
        flag="--data",
        metavar="PATH",
        type=str,
        resume="used",
        group="data and output",
        shown="the embedded Shakespeare; with --resume, the checkpoint's corpus",
        help="UTF-8 text file to train on",
    )
    out: str | None = option(
        None,
        flag="--out",
        metavar="DIR",
        type=str,
        resume="used",
        group="data and output",
        shown="runs/<backend>-<time>; with --resume, the resumed run's folder",
        help="run folder for checkpoints, metrics and plots; it must be new or empty",
    )
    resume: str | None = option(
        None,
        flag="--resume",
        metavar="RUN",
        type=str,
        resume="used",
        group="data and output",
        help="continue the run saved in RUN (a run or step folder); its configuration is kept",
    )
    overwrite: bool = option(
        False,
        flag="--overwrite",
        action="store_true",
        resume="used",
        group="data and output",
        help="train afresh in a --out folder that holds an earlier run, deleting its checkpoints, "
        "metrics and plot",
    )
    keep: int = option(
        2,
        flag="--keep",
        resume="used",
        group="data and output",
        help="newest checkpoints kept; the final and the best-validation ones are kept besides",
    )
    sample_chars: int = option(
        400,
        flag="--sample-chars",
        resume="used",
        group="reporting",
        help="characters sampled at the end (0: none)",
    )
    no_progress: bool = option(
        False,
        flag="--no-progress",
        action="store_true",
        resume="used",
        group="reporting",
        help="no progress bar",
    )
    nproc: int = option(
        1,
        flag="--nproc",
        resume="used",
        group="several devices (docs/distributed.md)",
        help="torch: processes, the global batch split between them",
    )
    parallel: str = option(
        "ddp",
        flag="--parallel",
        choices=LAYOUTS["torch"],
        resume="used",
        group="several devices (docs/distributed.md)",
        help="torch: replicated (DDP) or sharded (FSDP2) parameters",
    )
    devices: int = option(
        1,
        flag="--devices",
        resume="used",
        group="several devices (docs/distributed.md)",
        help="jax: devices in the mesh (virtual ones on the CPU)",
    )
    mesh: str = option(
        "data",
        flag="--mesh",
        choices=LAYOUTS["jax"],
        resume="used",
        group="several devices (docs/distributed.md)",
        help="jax: shard the batch, the parameters, both on one axis, both on two axes, or fsdp by hand",
    )

    def __post_init__(self) -> None:
        for name in ("backend", "device", "parallel", "mesh"):
            _choice(type(self), name, getattr(self, name))
        # '' would read as "not given" and silently start something else
        for name in ("data", "out", "resume"):
            if getattr(self, name) == "":
                what = "file" if name == "data" else "folder"
                flag = _flag(type(self), name)
                raise CharclipError(f"{flag} was given an empty path; name a {what}")
        if isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep < 1:
            raise CharclipError(f"--keep must be 1 or more, got {self.keep}")
        chars = self.sample_chars
        if isinstance(chars, bool) or not isinstance(chars, int) or chars < 0:
            raise CharclipError(f"--sample-chars must be zero or more, got {self.sample_chars}")
        for name in ("nproc", "devices"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CharclipError(f"{_flag(type(self), name)} must be 1 or more, got {value!r}")


@dataclass(frozen=True)
class SampleOptions:
    """`charclip sample`: how text is drawn from a checkpoint."""

    backend: str = _backend("torch")
    device: str = _device()
    prime: str = option(
        "\n",
        flag="--prime",
        resume="used",
        shown="a newline",
        help="text to start from (its characters must be in the vocabulary)",
    )
    length: int = option(
        500, flag="--length", resume="used", help="characters to generate after the prime"
    )
    temperature: float = option(
        0.8,
        flag="--temperature",
        resume="used",
        help="divides the logits: below 1 sharper, above 1 flatter",
    )
    top_k: int | None = option(
        None,
        flag="--top-k",
        type=int,
        resume="used",
        shown="all characters",
        help="sample among the k likeliest characters only",
    )
    top_p: float | None = option(
        None,
        flag="--top-p",
        type=float,
        resume="used",
        shown="no nucleus filter",
        help="nucleus sampling: among the fewest likeliest characters whose probabilities "
        "add up to at least P",
    )
    seed: int = option(
        0, flag="--seed", resume="used", help="seed of the sampling noise (sample i uses seed + i)"
    )
    num_samples: int = option(
        1,
        flag="--num-samples",
        metavar="N",
        resume="used",
        help="independent samples to print, each from the prime",
    )

    def __post_init__(self) -> None:
        for name in ("backend", "device"):
            _choice(type(self), name, getattr(self, name))
        # NumPy's generators take only non-negative seeds
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise CharclipError(f"--seed must be zero or more, got {self.seed}")
        n = self.num_samples
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise CharclipError(f"--num-samples must be 1 or more, got {self.num_samples}")


@dataclass(frozen=True)
class EvalOptions:
    """`charclip eval`: which text a checkpoint's loss is measured on."""

    backend: str = _backend("torch")
    device: str = _device()
    data: str | None = option(
        None,
        flag="--data",
        metavar="PATH",
        type=str,
        resume="used",
        shown="the validation split of the checkpoint's corpus",
        help="text to evaluate, whole",
    )

    def __post_init__(self) -> None:
        for name in ("backend", "device"):
            _choice(type(self), name, getattr(self, name))
        if self.data == "":  # '' would read as "not given" and silently evaluate another text
            raise CharclipError("--data was given an empty path; name a file")


# ---- the tools' subcommands: parity, explode, bench --------------------------------------------


@dataclass(frozen=True)
class ParityOptions:
    """`charclip parity`: the configuration on which torch and JAX are compared, quantity by
    quantity."""

    cell: str = option(
        "lstm",
        flag="--cell",
        choices=(*CELLS, "all"),
        resume="used",
        help="recurrent cell compared (all: each in turn)",
    )
    layers: int = option(1, flag="--layers", resume="used", help="stacked recurrent layers")
    dtype: str = option(
        "float64",
        flag="--dtype",
        choices=DTYPES,
        resume="used",
        help="float64 shows the algorithms agree; float32 shows the rounding they add",
    )
    precision: str = option(
        "full",
        flag="--precision",
        choices=PRECISIONS,
        resume="used",
        help="bf16 / fp16: both backends train in mixed precision (needs --dtype float32); "
        "tolerances derived from the unit roundoff",
    )
    steps: int = option(
        50, flag="--steps", resume="used", help="length of the compared training trajectory"
    )
    hidden: int = option(32, flag="--hidden", resume="used", help="hidden units per layer")
    batch_size: int = option(
        8, flag="--batch-size", resume="used", help="parallel streams per batch"
    )
    seq_len: int = option(32, flag="--seq-len", resume="used", help="truncated-BPTT length")
    device: str = option(
        "cpu", flag="--device", choices=DEVICES, resume="used", help="where both backends run"
    )
    clip_impl: str = _clip_impl(
        "charclip",
        resume="used",
        help="clipping compared: charclip's own implementations (one convention, "
        "optax's, on both sides; reference is the former name) or the libraries' (torch adds 1e-6 "
        "to the norm, "
        "optax does not)",
    )
    seed: int = option(
        0, flag="--seed", resume="used", help="seed of the shared initial weights and batches"
    )
    dropout: float = option(
        0.0,
        flag="--dropout",
        metavar="P",
        resume="used",
        help="train the compared trajectory with dropout P, both backends given the same masks",
    )
    json: str | None = option(
        None,
        flag="--json",
        metavar="PATH",
        type=str,
        resume="used",
        shown="not written",
        help="write the report as JSON",
    )
    plot: str | None = option(
        None,
        flag="--plot",
        metavar="PATH",
        type=str,
        resume="used",
        shown="not drawn",
        help="write the per-step drift plot (PNG)",
    )
    no_progress: bool = option(
        False, flag="--no-progress", action="store_true", resume="used", help="no progress bar"
    )

    def __post_init__(self) -> None:
        for name in ("cell", "dtype", "precision", "device", "clip_impl"):
            _choice(type(self), name, getattr(self, name))
        if self.clip_impl == "reference":  # the former spelling of the same thing
            object.__setattr__(self, "clip_impl", "charclip")
        for name in ("layers", "hidden", "batch_size", "seq_len"):
            _positive_int(_flag(type(self), name), getattr(self, name))

    @property
    def ladder_clip_impl(self) -> str:
        """The ladder's spelling: "library", or "reference" (charclip's code, optax's convention on
        both sides, so that the two backends clip by one formula)."""
        return "library" if self.clip_impl == "library" else "reference"


@dataclass(frozen=True)
class ExplodeOptions:
    """`charclip explode`: which experiments run, in which backends, and where the report goes."""

    out: str | None = option(
        None,
        flag="--out",
        metavar="DIR",
        type=str,
        resume="used",
        shown="runs/explode-<time>",
        help="folder for report.md, results.json and figures",
    )
    quick: bool = option(
        False,
        flag="--quick",
        action="store_true",
        resume="used",
        help="fewer steps and thresholds: under a minute",
    )
    backend: str = option(
        "both",
        flag="--backend",
        choices=(*BACKENDS, "both"),
        resume="used",
        help="framework(s) to run in",
    )
    paper: bool = option(
        False,
        flag="--paper",
        action="store_true",
        resume="used",
        help="rerun Pascanu, Mikolov & Bengio (2013) instead: the cliff, the bifurcation view and "
        "the temporal-order task (docs/paper-rerun.md); with --quick, the small setting",
    )
    no_progress: bool = option(
        False, flag="--no-progress", action="store_true", resume="used", help="no progress bar"
    )

    def __post_init__(self) -> None:
        _choice(type(self), "backend", self.backend)

    @property
    def backends(self) -> tuple[str, ...]:
        return BACKENDS if self.backend == "both" else (self.backend,)


@dataclass(frozen=True)
class BenchOptions:
    """`charclip bench` (also `python -m benchmarks`): which benchmarks run, where, and where
    results go."""

    quick: bool = option(
        False,
        flag="--quick",
        action="store_true",
        resume="used",
        help="a small grid (about 40 s on an idle 2-core machine)",
    )
    device: str = option(
        "cpu",
        flag="--device",
        choices=DEVICES,
        resume="used",
        help="where to run (gpu: CUDA for both backends)",
    )
    out: str | None = option(
        None,
        flag="--out",
        metavar="DIR",
        type=str,
        resume="used",
        shown="benchmarks/results/<machine>, or <machine>-quick with --quick",
        help="results folder",
    )
    only: tuple[str, ...] | None = option(
        None,
        flag="--only",
        metavar="NAME",
        action="append",
        type=str,
        resume="used",
        shown="every task",
        help="run only the tasks whose name contains NAME (repeatable), e.g. --only throughput; "
        "results go to "
        "benchmarks/results/<machine>-partial unless --out",
    )
    torch_threads: int | None = option(
        None,
        flag="--torch-threads",
        metavar="N",
        type=int,
        resume="used",
        shown="torch's own",
        help="torch intra-op threads for the torch/JAX comparisons",
    )

    def __post_init__(self) -> None:
        _choice(type(self), "device", self.device)
        if self.only is not None:
            object.__setattr__(self, "only", tuple(self.only))  # argparse appends to a list
        if self.torch_threads is not None and (
            isinstance(self.torch_threads, bool) or self.torch_threads < 1
        ):
            raise CharclipError(f"--torch-threads must be 1 or more, got {self.torch_threads}")
