"""One training step in JAX: loss, grad, clip, Adam, update, as one jitted function.

`Trainer` mirrors `torch_impl.train.Trainer` method for method; it only holds
the state between calls of the pure, jitted `train_step`, which is compiled
once per run (the shapes never change).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from charclip.config import ModelConfig, TrainConfig
from charclip.errors import CharclipError
from charclip.run import NonFiniteStep, StepResult
from jax_impl import model as M


def device_of(device: str):
    if device == "cpu":
        return jax.devices("cpu")[0]
    try:
        return jax.devices("gpu")[0]
    except RuntimeError:
        raise CharclipError("--device gpu: JAX sees no GPU on this machine (is jax[cuda] installed?); use --device cpu") from None


def optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Clipping chained before Adam: the optax spelling of clip-then-step."""
    clip = cfg.clip
    adam = optax.adam(cfg.lr, b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps)
    if clip.mode == "norm" and clip.impl == "library":
        return optax.chain(optax.clip_by_global_norm(clip.max_norm), adam)
    if clip.mode == "norm":
        from jax_impl import clipping

        return optax.chain(clipping.clip_by_global_norm(clip.max_norm), adam)
    if clip.mode == "value" and clip.impl == "library":
        return optax.chain(optax.clip(clip.max_value), adam)
    if clip.mode == "value":
        from jax_impl import clipping

        return optax.chain(clipping.clip(clip.max_value), adam)
    return adam


def gradient_norm(cfg: TrainConfig):
    """The norm the configured clipper measures: the reference's is finite wherever the true norm is."""
    if cfg.clip.impl == "reference":
        from jax_impl import clipping

        return clipping.global_norm
    return optax.tree.norm


def make_train_step(model_cfg: ModelConfig, cfg: TrainConfig, tx: optax.GradientTransformation, *, unroll: int = 1):
    """The pure step (params, opt_state, state, x, y) -> (params, opt_state, state, metrics), jitted."""
    measure = gradient_norm(cfg)

    def train_step(params, opt_state, state, x, y):
        (loss, final), grads = jax.value_and_grad(M.loss, has_aux=True)(params, x, y, state, cfg=model_cfg, unroll=unroll)
        norm = measure(grads)  # measured before clipping, as the chosen clipper measures it (XLA computes it once)
        updates, new_opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        if cfg.nonfinite == "skip":
            # Branch-free under jit: keep the old values when the step is not finite.
            ok = jnp.isfinite(norm) & jnp.isfinite(loss)
            keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new, old)
            new_params, new_opt_state, final = keep(new_params, params), keep(new_opt_state, opt_state), keep(final, state)
        return new_params, new_opt_state, final, {"loss": loss, "grad_norm": norm}

    return jax.jit(train_step)


class Trainer:
    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, params: dict[str, np.ndarray], *,
                 adam: dict[str, np.ndarray] | None = None, hidden: dict[str, np.ndarray] | None = None,
                 device: str = "cpu"):
        self.model_cfg, self.cfg = model_cfg, cfg
        self.device = device_of(device)
        self.dtype = jnp.dtype(cfg.dtype)
        self.params = jax.device_put({k: jnp.asarray(v) for k, v in params.items()}, self.device)
        self.tx = optimizer(cfg)
        # Everything the step receives is placed on the device up front: arguments that are
        # committed on later calls but not on the first would compile a second executable.
        self.opt_state = jax.device_put(self.tx.init(self.params), self.device)
        if adam is not None:
            self._load_adam(adam)
        self.state = jax.device_put(M.hidden_from_numpy(hidden), self.device) if hidden is not None else None
        self.train_step = make_train_step(model_cfg, cfg, self.tx)
        self._eval_loss = jax.jit(lambda p, x, y, s: M.loss(p, x, y, s, cfg=model_cfg))

    def reset_hidden(self) -> None:
        self.state = None

    def _state_for(self, batch: int):
        if self.state is None:
            return jax.device_put(M.zero_state(self.model_cfg, batch, self.dtype), self.device)
        return self.state

    def step(self, x: np.ndarray, y: np.ndarray) -> StepResult:
        params, opt_state, state, m = self.train_step(self.params, self.opt_state, self._state_for(len(x)), x, y)
        loss, norm = float(m["loss"]), float(m["grad_norm"])
        clip = self.cfg.clip
        result = StepResult(loss=loss, grad_norm=norm, clipped=clip.mode == "norm" and norm > clip.max_norm)
        if not (np.isfinite(norm) and np.isfinite(loss)):
            if self.cfg.nonfinite == "error":
                raise NonFiniteStep(result)  # the new state is simply not adopted
            result.skipped = self.cfg.nonfinite == "skip"
        self.params, self.opt_state, self.state = params, opt_state, state
        return result

    def evaluate(self, batches) -> float:
        """Mean cross-entropy (nats per character) over `batches`, hidden state carried."""
        total, n, state = 0.0, 0, None
        for x, y in batches:
            state = state if state is not None else M.zero_state(self.model_cfg, len(x), self.dtype)
            loss, state = self._eval_loss(self.params, x, y, state)
            total, n = total + float(loss), n + 1
        return total / n

    def params_numpy(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(v).copy() for k, v in self.params.items()}

    def hidden_state(self) -> dict[str, np.ndarray] | None:
        return None if self.state is None else M.hidden_to_numpy(self.state)

    def adam_state(self) -> dict[str, np.ndarray]:
        """Adam's moments and step under the checkpoint's neutral names."""
        adam = _adam(self.opt_state)
        out = {f"exp_avg.{k}": np.asarray(v).copy() for k, v in adam.mu.items()}
        out.update({f"exp_avg_sq.{k}": np.asarray(v).copy() for k, v in adam.nu.items()})
        out["step"] = np.array(int(adam.count), dtype=np.int64)
        return out

    def _load_adam(self, adam: dict[str, np.ndarray]) -> None:
        names = list(self.params)
        new = _adam(self.opt_state)._replace(
            count=jnp.asarray(int(adam["step"]), jnp.int32),
            mu={k: jnp.asarray(adam[f"exp_avg.{k}"]) for k in names},
            nu={k: jnp.asarray(adam[f"exp_avg_sq.{k}"]) for k in names},
        )
        self.opt_state = jax.device_put(_replace_adam(self.opt_state, new), self.device)


def _is_adam(x) -> bool:
    return isinstance(x, optax.ScaleByAdamState)


def _adam(opt_state) -> optax.ScaleByAdamState:
    return next(s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=_is_adam) if _is_adam(s))


def _replace_adam(opt_state, new: optax.ScaleByAdamState):
    return jax.tree_util.tree_map(lambda s: new if _is_adam(s) else s, opt_state, is_leaf=_is_adam)
