"""One training step in PyTorch: forward, loss, backward, clip, Adam.

`Trainer` implements `charclip.contract.Trainer` and mirrors `charclip.jax.train.Trainer`
method for method; the loop around it (batches, logging, validation, checkpoints)
lives once, in `charclip.run`. `charclip.torch.distributed.DistributedTrainer` is this
class on one rank of a process group: it overrides only the placement hooks at the
end (`_parallel`, `_local`, `_global_loss`, `_whole`, `_placed`, `_gather_hidden`).
"""

from __future__ import annotations

import numpy as np
import torch

from charclip.config import ModelConfig, TrainConfig, compute_dtype, loss_scaled
from charclip.contract import NonFiniteStep, StepResult, verdict
from charclip.errors import CharclipError
from charclip.torch import clipping
from charclip.torch import device as D
from charclip.torch import model as M


class Trainer:
    def __init__(
        self,
        model_cfg: ModelConfig,
        cfg: TrainConfig,
        params: dict[str, np.ndarray],
        *,
        adam: dict[str, np.ndarray] | None = None,
        hidden: dict[str, np.ndarray] | None = None,
        device: str = "cpu",
    ):
        cfg.clip.check_for("torch")
        self.model_cfg, self.cfg = model_cfg, cfg
        self.device = D.resolve(device)
        compute = None if cfg.precision == "full" else compute_dtype(cfg)
        self.module = M.build(
            model_cfg, params, self.device, compute
        )  # the CharRNN, parameter names as in a checkpoint
        self.model = self._parallel(self.module)  # what the forward pass runs through
        self.optimizer = torch.optim.Adam(
            self.module.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps
        )
        self.scaler = self._scaler(
            adam
        )  # fp16's dynamic loss scale: torch's own GradScaler (disabled otherwise)
        if adam is not None:
            self._load_adam(adam)
        self.hidden = self._local_hidden(M.hidden_from_numpy(hidden, self.device))

    def reset_hidden(self) -> None:
        self.hidden = None

    def _clip(self) -> torch.Tensor:
        """Clip the gradients in place; return the global L2 norm measured before clipping."""
        clip, params = self.cfg.clip, list(self.module.parameters())
        if clip.mode == "norm" and clip.impl == "library":
            return torch.nn.utils.clip_grad_norm_(params, clip.max_norm)
        if clip.mode == "norm":
            convention = clip.convention_in("torch")
            return clipping.clip_grad_norm_(params, clip.max_norm, convention=convention)
        # The norm the configured implementation measures, as charclip.jax.train.gradient_norm picks it:
        # charclip's is finite wherever the true norm is (torch's overflows on huge finite entries).
        total_norm = (
            torch.nn.utils.get_total_norm if clip.impl == "library" else clipping.get_total_norm
        )
        norm = total_norm([p.grad for p in params])
        if clip.mode == "value":
            value_clip = (
                torch.nn.utils.clip_grad_value_
                if clip.impl == "library"
                else clipping.clip_grad_value_
            )
            value_clip(params, clip.max_value)
        return norm

    def step(
        self,
        x: np.ndarray,
        y: np.ndarray,
        lr: float | None = None,
        masks: tuple[np.ndarray, ...] | None = None,
    ) -> StepResult:
        """One optimizer step on the batch (B, T); `lr` (the schedule's rate) replaces the configured one.

        With `accumulate` K > 1 the batch is K micro-batches of B/K streams: each backward
        adds its share of the mean gradient, and clipping sees only the accumulated sum.
        `masks` (`charclip.dropout`, one (B, T, H) per layer, or None) are cut like the rows of x.
        """
        self.optimizer.zero_grad(set_to_none=True)
        losses, finals = [], []
        k = self.cfg.accumulate
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        local = None if masks is None else tuple(self._local(m) for m in masks)
        for xk, yk, hk, mk in _micro_batches(self._local(x), self._local(y), self.hidden, k, local):
            loss, h = M.loss(self.model, xk, yk, hk, mk)
            # Each backward starts from this rank's share of the batch's mean loss, as one process
            # would: the ranks' gradients are summed (DDP/FSDP), so fp16 overflows where one process does.
            self.scaler.scale(loss / (k * self._ranks())).backward()
            losses.append(loss.detach())
            finals.append(h)
        loss = torch.stack(losses).mean()  # equal micro-batches: the mean of their means
        self._summed()
        found_inf = (
            self._found_inf() if scale is not None else None
        )  # GradScaler's test, on the scaled gradient
        self.scaler.unscale_(
            self.optimizer
        )  # fp16: divide by the scale BEFORE clipping (a no-op otherwise)
        norm = self._whole(
            self._clip()
        ).item()  # after the last backward and the unscaling, before the step
        try:
            result = verdict(
                self._global_loss(loss),
                norm,
                self.cfg.clip,
                self.cfg.nonfinite,
                loss_scale=scale,
                found_inf=found_inf,
            )
        except (
            NonFiniteStep
        ):  # "error": no state changes, the scaler's record of this step included
            self.scaler = self._scaler(self.adam_state())
            raise
        if not result.skipped:
            for (
                group
            ) in self.optimizer.param_groups:  # None: the configured rate, as in charclip.jax
                group["lr"] = self.cfg.lr if lr is None else lr
            self.scaler.step(
                self.optimizer
            )  # fp16: skips by itself when the gradient holds inf or NaN
            self.hidden = _detached(
                _joined(finals)
            )  # truncated BPTT; a skipped batch leaves it as it was
        if self.scaler.is_enabled():
            self.scaler.update()  # back off after an overflow; grow after loss_scale_interval clean steps
        return result

    def apply_gradients(self, grads: dict[str, np.ndarray], lr: float | None = None) -> None:
        """Clip `grads` (by parameter name) with this trainer's clipping, then take one Adam step."""
        for name, p in self.module.named_parameters():
            p.grad = self._placed(
                p, grads[name]
            )  # placed like its parameter (a DTensor under FSDP)
        self._clip()
        for group in self.optimizer.param_groups:  # None: the configured rate, as in charclip.jax
            group["lr"] = self.cfg.lr if lr is None else lr
        self.optimizer.step()

    @torch.no_grad()
    def evaluate(self, batches) -> float:
        """Mean cross-entropy (nats per character) over `batches`, hidden state carried."""
        total, n, h = 0.0, 0, None
        for x, y in batches:
            loss, h = M.loss(self.model, self._local(x), self._local(y), h)
            total, n = total + self._global_loss(loss), n + 1
        return total / n

    def params_numpy(self) -> dict[str, np.ndarray]:
        return {
            k: self._whole(v).detach().cpu().numpy().copy()
            for k, v in self.module.state_dict().items()
        }

    def hidden_state(self) -> dict[str, np.ndarray] | None:
        return M.hidden_to_numpy(self._gather_hidden(self.hidden))

    def adam_state(self) -> dict[str, np.ndarray]:
        """Adam's moments and step under the checkpoint's neutral names."""
        out: dict[str, np.ndarray] = {}
        step = 0
        for name, p in self.module.named_parameters():
            st = self.optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                moment = self._whole(st[key]) if st else torch.zeros(p.shape, dtype=p.dtype)
                out[f"{key}.{name}"] = moment.detach().cpu().numpy().copy()
            step = int(st["step"]) if st else 0
        out["step"] = np.array(step, dtype=np.int64)
        if self.scaler.is_enabled():
            state = self.scaler.state_dict()
            out["loss_scale"] = np.array(state["scale"], dtype=np.float32)
            out["loss_scale_good_steps"] = np.array(state["_growth_tracker"], dtype=np.int64)
        return out

    def _found_inf(self) -> bool:
        """Whether any gradient entry is inf or NaN (on every rank alike: the gradients are reduced)."""
        grads = [self._whole(p.grad) for p in self.module.parameters() if p.grad is not None]
        return not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

    def _scaler(self, adam: dict[str, np.ndarray] | None) -> torch.amp.GradScaler:
        """fp16's GradScaler with the configured rule, at the scale and count stored in `adam` if there."""
        cfg = self.cfg
        scaler = torch.amp.GradScaler(
            self.device.type,
            init_scale=cfg.loss_scale_init,
            growth_factor=cfg.loss_scale_growth,
            backoff_factor=cfg.loss_scale_backoff,
            growth_interval=cfg.loss_scale_interval,
            enabled=loss_scaled(cfg),
        )
        if scaler.is_enabled() and adam is not None and "loss_scale" in adam:
            scaler.load_state_dict(
                {
                    "scale": float(adam["loss_scale"]),
                    "growth_factor": cfg.loss_scale_growth,
                    "backoff_factor": cfg.loss_scale_backoff,
                    "growth_interval": cfg.loss_scale_interval,
                    "_growth_tracker": int(adam["loss_scale_good_steps"]),
                }
            )
        return scaler

    def _load_adam(self, adam: dict[str, np.ndarray]) -> None:
        step = int(adam["step"])
        if step == 0:
            return
        for name, p in self.module.named_parameters():
            self.optimizer.state[p] = {
                "step": torch.tensor(float(step)),
                "exp_avg": self._placed(p, adam[f"exp_avg.{name}"]),
                "exp_avg_sq": self._placed(p, adam[f"exp_avg_sq.{name}"]),
            }

    # ---- placement hooks: one process here; one rank of a group in charclip.torch.distributed ----

    def _parallel(self, module: torch.nn.Module) -> torch.nn.Module:
        return module

    def _ranks(self) -> int:
        """How many processes' gradients are summed into the step's gradient."""
        return 1

    def _summed(self) -> None:
        """Turn the reduced gradients into the ranks' sum where the reduction averaged them."""

    def _local(self, x: np.ndarray) -> np.ndarray:
        """This process's streams of a global batch (B, T)."""
        return x

    def _local_hidden(self, h):
        return h

    def _global_loss(self, loss: torch.Tensor) -> float:
        return loss.item()

    def _whole(self, t: torch.Tensor) -> torch.Tensor:
        """The whole tensor behind a (possibly sharded) one."""
        return t

    def _placed(self, p: torch.Tensor, a: np.ndarray) -> torch.Tensor:
        """`a` as a tensor placed like parameter `p`."""
        return torch.from_numpy(np.array(a)).to(self.device)

    def _gather_hidden(self, h):
        return h


def _micro_batches(x: np.ndarray, y: np.ndarray, hidden, k: int, masks=None):
    """(x, y, hidden, masks) of each of k equal slices of the streams (rows of x and of each mask; axis 1 of
    the hidden state)."""
    if len(x) % k:
        raise CharclipError(
            f"{len(x)} streams do not split into --accumulate {k} equal micro-batches"
        )
    b = len(x) // k
    for i in range(k):
        rows = slice(i * b, (i + 1) * b)
        if k == 1 or hidden is None:
            h = hidden
        elif isinstance(hidden, tuple):
            h = tuple(t[:, rows].contiguous() for t in hidden)
        else:
            h = hidden[:, rows].contiguous()
        yield x[rows], y[rows], h, None if masks is None else tuple(m[rows] for m in masks)


def _joined(finals: list):
    """The micro-batches' final states side by side again (streams in order)."""
    if len(finals) == 1:
        return finals[0]
    if isinstance(finals[0], tuple):
        return tuple(torch.cat(parts, dim=1) for parts in zip(*finals))
    return torch.cat(finals, dim=1)


def _detached(h):
    return tuple(t.detach() for t in h) if isinstance(h, tuple) else h.detach()
