"""The contract between the training loop (`charclip.run`) and a backend's trainer, as code.

A backend's `train.Trainer(model_cfg, train_cfg, params, *, adam=None, hidden=None,
device="cpu")` satisfies the `Trainer` protocol below; `charclip.backends` finds the
right factory for a (backend, devices, layout). Everything crossing the boundary is
NumPy: parameters and Adam moments by PyTorch `state_dict` name, the carried hidden
state as {"h"} or {"h", "c"}, each (layers, batch, hidden).

The verdict on a step (was it clipped; is it finite; is the update applied, skipped
or an error) is decided here once, by `verdict`, and `update_applies` is the same
rule in a form that also works on arrays inside a jitted step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from charclip.clipspec import NONFINITE_POLICIES

# BACKENDS: declared in charclip.config, named here too for the callers that import it from here
from charclip.config import BACKENDS, ClipConfig  # noqa: F401


@dataclass
class StepResult:
    loss: float
    grad_norm: float  # global L2 norm of the gradient, measured before clipping
    clipped: bool  # norm clipping changed the gradient (norm above the threshold)
    skipped: bool = False  # the update was skipped (non-finite policy "skip", or an fp16 overflow)
    overflow: bool = False  # fp16: the scaled gradient overflowed (finite loss); skipped, the loss scale backed off
    loss_scale: float | None = None  # fp16: the loss scale this step's backward pass used


class NonFiniteStep(Exception):
    """A step whose loss or gradient was NaN or infinite, under the "error" policy."""

    def __init__(self, result: StepResult):
        super().__init__(f"loss {result.loss}, gradient norm {result.grad_norm}")
        self.result = result


def update_applies(policy: str, finite, found_inf=False):
    """Whether a step's update is applied, given whether its loss and gradient are finite.

    "skip" applies only finite steps; "propagate" applies every step; "error" applies
    it too, but `verdict` raises first, so the caller never adopts it. Under fp16 loss
    scaling, `found_inf` (a non-finite value in the unscaled gradient) skips the step
    whatever the policy, as torch.amp.GradScaler does. `finite` and `found_inf` may be
    Python bools or boolean arrays (inside a jitted step); the result has the same kind.
    """
    if policy not in NONFINITE_POLICIES:
        raise ValueError(
            f"nonfinite policy must be one of {', '.join(NONFINITE_POLICIES)} (got {policy!r})"
        )
    applies = finite if policy == "skip" else True
    if isinstance(
        found_inf, (bool, int, np.bool_, np.integer)
    ):  # `~True` is -2: no bitwise operators on these
        return False if found_inf else applies
    return ~found_inf & applies if applies is not True else ~found_inf


def verdict(
    loss: float,
    grad_norm: float,
    clip: ClipConfig,
    policy: str,
    loss_scale: float | None = None,
    found_inf: bool | None = None,
) -> StepResult:
    """The step's result from its loss and pre-clip norm; raises NonFiniteStep under "error".

    Norm clipping acted when the norm is above the threshold (at the threshold itself
    the optax convention leaves the gradient unchanged, and torch's scale is 1 - 1e-6/tau:
    counted as not clipped in both).

    With a loss scale (fp16), `found_inf` is the trainer's own finding (a non-finite entry
    in the scaled gradient, GradScaler's test; None: the norm's finiteness stands in). Such
    a step is skipped and the scale backs off, under every policy, as GradScaler does; with
    a finite loss it is an overflow (`overflow`), the expected event of dynamic loss
    scaling, not an error. A non-finite loss still raises under "error".
    """
    loss, grad_norm = float(loss), float(grad_norm)
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    result = StepResult(
        loss=loss,
        grad_norm=grad_norm,
        clipped=clip.mode == "norm" and grad_norm > clip.max_norm,
        loss_scale=None if loss_scale is None else float(loss_scale),
    )
    if loss_scale is not None and found_inf is None:
        found_inf = not math.isfinite(grad_norm)
    found_inf = loss_scale is not None and bool(found_inf)
    result.overflow = found_inf and math.isfinite(loss)
    if not finite and policy == "error" and not result.overflow:
        raise NonFiniteStep(result)
    result.skipped = not update_applies(policy, finite, found_inf=found_inf)
    return result


@runtime_checkable
class Trainer(Protocol):
    """What `charclip.run` needs from a backend. Both backends' `train.Trainer` implement it."""

    def step(
        self,
        x: np.ndarray,
        y: np.ndarray,
        lr: float | None = None,
        masks: tuple[np.ndarray, ...] | None = None,
    ) -> StepResult:
        """One training step on int64 batches (B, T): forward, loss, backward, clip, optimizer.

        `lr` is this update's learning rate (from `charclip.schedules`; None: the configured
        one). `masks` are the dropout masks of this update (`charclip.dropout.masks`: one
        (B, T, H) per layer, for the global batch, each multiplying that layer's output), or
        None for no dropout. With `accumulate` K, the batch (and the masks' rows) are K
        micro-batches whose mean gradient is clipped once. Raises NonFiniteStep (before
        changing any state) under "error".
        """

    def evaluate(self, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> float:
        """Mean cross-entropy (nats/char) over `batches`, hidden state carried from zero; no update, no dropout."""

    def apply_gradients(self, grads: dict[str, np.ndarray], lr: float | None = None) -> None:
        """Clip `grads` (by parameter name) with the configured clipping and take one optimizer step."""

    def reset_hidden(self) -> None:
        """Start the carried hidden state afresh (zeros) at the next step."""

    def params_numpy(self) -> dict[str, np.ndarray]:
        """The parameters by `state_dict` name, as NumPy copies."""

    def adam_state(self) -> dict[str, np.ndarray]:
        """`step`, `exp_avg.<name>`, `exp_avg_sq.<name>`: Adam's state under the checkpoint's names."""

    def hidden_state(self) -> dict[str, np.ndarray] | None:
        """The carried hidden state, or None before the first step of an epoch."""
