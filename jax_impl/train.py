"""One training step in JAX: loss, grad, clip, Adam, update, as one jitted function.

`Trainer` implements `charclip.contract.Trainer` and mirrors `torch_impl.train.Trainer`
method for method; it only holds the state between calls of the pure, jitted
`train_step`, which is compiled once per run (the shapes never change).
`jax_impl.distributed.MeshTrainer` is this class over a mesh: it overrides only the
placement hooks at the end.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from charclip.config import ModelConfig, TrainConfig
from charclip.contract import StepResult, update_applies, verdict
from jax_impl import clipping
from jax_impl import device as D
from jax_impl import model as M


def optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Clipping chained before Adam: the optax spelling of clip-then-step."""
    clip = cfg.clip
    adam = optax.adam(cfg.lr, b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps)
    if clip.mode == "norm" and clip.impl == "library":
        return optax.chain(optax.clip_by_global_norm(clip.max_norm), adam)
    if clip.mode == "norm":
        return optax.chain(clipping.clip_by_global_norm_reference(clip.max_norm), adam)
    if clip.mode == "value" and clip.impl == "library":
        return optax.chain(optax.clip(clip.max_value), adam)
    if clip.mode == "value":
        return optax.chain(optax.stateless(lambda g, _: clipping.clip_by_value(g, clip.max_value)), adam)
    return adam


def adopt(policy: str, loss, norm, new, old):
    """`new` where the step's update applies (`charclip.contract.update_applies`), else `old`.

    Branch-free under jit (`jnp.where`, not `if`): loss and norm are tracers there.
    """
    ok = update_applies(policy, jnp.isfinite(norm) & jnp.isfinite(loss))
    if ok is True:
        return new
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def make_train_step(model_cfg: ModelConfig, cfg: TrainConfig, tx: optax.GradientTransformation, *, unroll: int = 1):
    """The pure step (params, opt_state, state, x, y) -> (params, opt_state, state, metrics), jitted."""

    def train_step(params, opt_state, state, x, y):
        (loss, final), grads = jax.value_and_grad(M.loss, has_aux=True)(params, x, y, state, cfg=model_cfg, unroll=unroll)
        norm = optax.tree.norm(grads)  # measured before clipping, as optax.clip_by_global_norm measures it
        updates, new_opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        new_params, new_opt_state, final = adopt(cfg.nonfinite, loss, norm, (new_params, new_opt_state, final),
                                                 (params, opt_state, state))
        return new_params, new_opt_state, final, {"loss": loss, "grad_norm": norm}

    return jax.jit(train_step)


class Trainer:
    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, params: dict[str, np.ndarray], *,
                 adam: dict[str, np.ndarray] | None = None, hidden: dict[str, np.ndarray] | None = None,
                 device: str = "cpu"):
        self.model_cfg, self.cfg = model_cfg, cfg
        self.device = D.resolve(device)
        self.dtype = jnp.dtype(cfg.dtype)
        self.tx = self._optimizer()
        # Everything the step receives is placed up front: arguments that are committed on
        # later calls but not on the first would compile a second executable.
        self.params = self._put_params(params)
        self.opt_state = self._init_opt_state()
        if adam is not None:
            self._load_adam(adam)
        self.hidden = None if hidden is None else self._put_hidden(M.hidden_from_numpy(hidden))
        self.train_step = self._compile_step()
        self._eval_loss = jax.jit(lambda p, x, y, s: M.loss(p, x, y, s, cfg=model_cfg))
        self._apply = jax.jit(_apply_updates(self.tx))

    def reset_hidden(self) -> None:
        self.hidden = None

    def _hidden_for(self, batch: int):
        if self.hidden is None:
            return self._put_hidden(M.zero_state(self.model_cfg, batch, self.dtype))
        return self.hidden

    def step(self, x: np.ndarray, y: np.ndarray) -> StepResult:
        params, opt_state, hidden, m = self.train_step(self.params, self.opt_state, self._hidden_for(len(x)), x, y)
        result = verdict(m["loss"], m["grad_norm"], self.cfg.clip, self.cfg.nonfinite)  # raises: nothing adopted
        # Under "skip" the jitted step already kept the old values (branch-free), so adopt it either way.
        self.params, self.opt_state, self.hidden = params, opt_state, hidden
        return result

    def apply_gradients(self, grads: dict[str, np.ndarray]) -> None:
        """Clip `grads` (by parameter name) with this trainer's clipping, then take one Adam step."""
        g = self._put_params(grads)
        self.params, self.opt_state = self._apply(g, self.opt_state, self.params)

    def evaluate(self, batches) -> float:
        """Mean cross-entropy (nats per character) over `batches`, hidden state carried."""
        total, n, hidden = 0.0, 0, None
        for x, y in batches:
            hidden = hidden if hidden is not None else self._put_hidden(M.zero_state(self.model_cfg, len(x), self.dtype))
            loss, hidden = self._eval_loss(self.params, x, y, hidden)
            total, n = total + float(loss), n + 1
        return total / n

    def params_numpy(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(v).copy() for k, v in self.params.items()}

    def hidden_state(self) -> dict[str, np.ndarray] | None:
        return M.hidden_to_numpy(self.hidden)

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
        self.opt_state = self._put_opt_state(_replace_adam(self.opt_state, new))

    # ---- placement hooks: one device here; a mesh in jax_impl.distributed.MeshTrainer ----

    def _optimizer(self) -> optax.GradientTransformation:
        return optimizer(self.cfg)

    def _put_params(self, params):
        return jax.device_put({k: jnp.asarray(v) for k, v in params.items()}, self.device)

    def _init_opt_state(self):
        return jax.device_put(self.tx.init(self.params), self.device)

    def _put_opt_state(self, opt_state):
        return jax.device_put(opt_state, self.device)

    def _put_hidden(self, hidden):
        return jax.device_put(hidden, self.device)

    def _compile_step(self):
        return make_train_step(self.model_cfg, self.cfg, self.tx)


def _apply_updates(tx: optax.GradientTransformation):
    def apply(grads, opt_state, params):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return apply


def _is_adam(x) -> bool:
    return isinstance(x, optax.ScaleByAdamState)


def _adam(opt_state) -> optax.ScaleByAdamState:
    return next(s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=_is_adam) if _is_adam(s))


def _replace_adam(opt_state, new: optax.ScaleByAdamState):
    return jax.tree_util.tree_map(lambda s: new if _is_adam(s) else s, opt_state, is_leaf=_is_adam)
