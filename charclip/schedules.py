"""Learning-rate schedules, written once in plain Python for both backends.

The training loop asks `learning_rate(cfg, step)` before every optimizer step and
hands the number to the backend's trainer, so PyTorch and JAX use the same float at
every step, and a resumed run (whose step and configuration are in the checkpoint)
continues the schedule exactly where it stopped.

    constant   lr
    cosine     nanoGPT's shape: linear warmup over `warmup_steps` to lr, then a half
               cosine from lr down to `min_lr` at `decay_steps`, flat at min_lr after
    step       char-rnn's shape: linear warmup, then lr * decay_factor ** (n // decay_every)
               where n counts the steps after the warmup

`step` is 0-based: the rate of the update that turns step `step` into `step + 1`.
"""

from __future__ import annotations

import math

from charclip.errors import CharclipError

SCHEDULES = ("constant", "cosine", "step")


def learning_rate(cfg, step: int) -> float:
    """The learning rate of update number `step` (0-based) under `cfg` (a TrainConfig)."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CharclipError(f"a schedule's step must be a non-negative integer, got {step!r}")
    if cfg.schedule == "constant":
        return cfg.lr
    if step < cfg.warmup_steps:  # nanoGPT's warmup: lr * (step + 1) / (warmup + 1), never zero
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "cosine":
        horizon = cfg.decay_steps or cfg.steps
        if step >= horizon:
            return cfg.min_lr
        ratio = (step - cfg.warmup_steps) / max(horizon - cfg.warmup_steps, 1)
        return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)
    if cfg.schedule == "step":
        return cfg.lr * cfg.decay_factor ** ((step - cfg.warmup_steps) // cfg.decay_every)
    raise CharclipError(f"unknown schedule {cfg.schedule!r}; use one of {', '.join(SCHEDULES)}")
