"""One training step in PyTorch: forward, loss, backward, clip, Adam.

`Trainer` mirrors `jax_impl.train.Trainer` method for method; the loop around
it (batches, logging, validation, checkpoints) lives once, in `charclip.run`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from charclip.config import ModelConfig, TrainConfig
from charclip.errors import CharclipError
from charclip.run import NonFiniteStep, StepResult
from torch_impl import model as M


def device_name(device: str) -> str:
    # Intra-op threads stay at torch's default (OMP_NUM_THREADS to change). Measured on 2 cores:
    # the default step takes 124 ms with 2 threads and 219 ms with 1 on an idle machine; only
    # when the cores are busy (other processes, or XLA's pool in the same process) does 1 win.
    if device == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        raise CharclipError("--device gpu: PyTorch sees no CUDA GPU on this machine; use --device cpu")
    return "cuda"


class Trainer:
    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, params: dict[str, np.ndarray], *,
                 adam: dict[str, np.ndarray] | None = None, hidden: dict[str, np.ndarray] | None = None,
                 device: str = "cpu"):
        self.cfg = cfg
        self.device = device_name(device)
        self.model = M.build(model_cfg, params, self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
        if adam is not None:
            self._load_adam(adam)
        self.hidden = M.hidden_from_numpy(hidden, self.device)

    def reset_hidden(self) -> None:
        self.hidden = None

    def _loss(self, x: np.ndarray, y: np.ndarray, h):
        logits, h = self.model(torch.from_numpy(x).to(self.device), h)  # (B, T, V)
        target = torch.from_numpy(y).to(self.device)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1)), h

    def _clip(self) -> torch.Tensor:
        """Clip the gradients in place; return the global L2 norm measured before clipping."""
        clip, params = self.cfg.clip, self.model.parameters()
        if clip.mode == "norm" and clip.impl == "library":
            return torch.nn.utils.clip_grad_norm_(params, clip.max_norm)
        if clip.mode == "norm":
            from torch_impl import clipping

            return clipping.clip_grad_norm_(params, clip.max_norm, convention="optax")  # as jax_impl, for parity
        grads = [p.grad for p in self.model.parameters()]
        norm = torch.nn.utils.get_total_norm(grads)
        if clip.mode == "value":
            if clip.impl == "library":
                torch.nn.utils.clip_grad_value_(self.model.parameters(), clip.max_value)
            else:
                from torch_impl import clipping

                clipping.clip_grad_value_(self.model.parameters(), clip.max_value)
        return norm

    def step(self, x: np.ndarray, y: np.ndarray) -> StepResult:
        loss, h = self._loss(x, y, self.hidden)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = self._clip().item()  # after backward, before the optimizer step
        result = StepResult(loss=loss.item(), grad_norm=norm, clipped=self.cfg.clip.mode == "norm" and norm > self.cfg.clip.max_norm)
        if not (math.isfinite(norm) and math.isfinite(result.loss)):
            if self.cfg.nonfinite == "error":
                raise NonFiniteStep(result)
            if self.cfg.nonfinite == "skip":
                result.skipped = True
                return result  # no update, hidden state not advanced: as if the batch were absent
        self.optimizer.step()
        self.hidden = tuple(t.detach() for t in h) if isinstance(h, tuple) else h.detach()  # truncated BPTT
        return result

    @torch.no_grad()
    def evaluate(self, batches) -> float:
        """Mean cross-entropy (nats per character) over `batches`, hidden state carried."""
        total, n, h = 0.0, 0, None
        for x, y in batches:
            loss, h = self._loss(x, y, h)
            total, n = total + loss.item(), n + 1
        return total / n

    def params_numpy(self) -> dict[str, np.ndarray]:
        return M.to_numpy(self.model)

    def hidden_state(self) -> dict[str, np.ndarray] | None:
        return M.hidden_to_numpy(self.hidden)

    def adam_state(self) -> dict[str, np.ndarray]:
        """Adam's moments and step under the checkpoint's neutral names."""
        out: dict[str, np.ndarray] = {}
        step = 0
        for name, p in self.model.named_parameters():
            st = self.optimizer.state.get(p, {})
            out[f"exp_avg.{name}"] = st["exp_avg"].cpu().numpy().copy() if st else np.zeros(p.shape, p.detach().cpu().numpy().dtype)
            out[f"exp_avg_sq.{name}"] = st["exp_avg_sq"].cpu().numpy().copy() if st else np.zeros_like(out[f"exp_avg.{name}"])
            step = int(st["step"]) if st else 0
        out["step"] = np.array(step, dtype=np.int64)
        return out

    def _load_adam(self, adam: dict[str, np.ndarray]) -> None:
        step = int(adam["step"])
        if step == 0:
            return
        for name, p in self.model.named_parameters():
            self.optimizer.state[p] = {
                "step": torch.tensor(float(step)),
                "exp_avg": torch.from_numpy(np.array(adam[f"exp_avg.{name}"])).to(self.device),
                "exp_avg_sq": torch.from_numpy(np.array(adam[f"exp_avg_sq.{name}"])).to(self.device),
            }
