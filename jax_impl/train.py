"""One training step in JAX: loss, grad, clip, Adam, update, as one jitted function.

`Trainer` implements `charclip.contract.Trainer` and mirrors `charclip.torch.train.Trainer`
method for method; it only holds the state between calls of the pure, jitted
`train_step`, which is compiled once per run (the shapes never change).
`charclip.jax.distributed.MeshTrainer` is this class over a mesh: it overrides only the
placement hooks at the end.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from charclip.config import ModelConfig, TrainConfig, compute_dtype, loss_scaled
from charclip.contract import StepResult, update_applies, verdict
from charclip.jax import clipping
from charclip.jax import device as D
from charclip.jax import model as M


def optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Clipping chained before Adam: the optax spelling of clip-then-step.

    Adam's learning rate is an injected hyperparameter (`optax.inject_hyperparams`), so the
    step can be handed each update's rate from `charclip.schedules` without recompiling.
    """
    clip = cfg.clip
    clip.check_for("jax")
    adam = optax.inject_hyperparams(
        optax.adam, static_args=("b1", "b2", "eps"), hyperparam_dtype=jnp.dtype(cfg.dtype)
    )(learning_rate=cfg.lr, b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps)
    if clip.mode == "norm" and clip.impl == "library":
        tx = optax.chain(optax.clip_by_global_norm(clip.max_norm), adam)
    elif clip.mode == "norm":
        ours = clipping.clip_by_global_norm(clip.max_norm, convention=clip.convention_in("jax"))
        tx = optax.chain(ours, adam)
    elif clip.mode == "value" and clip.impl == "library":
        tx = optax.chain(optax.clip(clip.max_value), adam)
    elif clip.mode == "value":
        tx = optax.chain(clipping.clip(clip.max_value), adam)
    else:
        tx = adam
    return optax.chain(loss_scale_holder(cfg), tx) if loss_scaled(cfg) else tx


# ---- fp16's dynamic loss scale: torch.amp.GradScaler's rule, written for a jitted step ----


class LossScaleState(NamedTuple):
    scale: jax.Array  # float32: the factor the loss is multiplied by before the backward pass
    good_steps: (
        jax.Array
    )  # int32: steps since the last overflow or growth (GradScaler's growth tracker)


def loss_scale_holder(cfg: TrainConfig) -> optax.GradientTransformation:
    """A transformation that only holds the loss scale in the optimizer state (updates pass unchanged).

    Kept in `opt_state`, the scale travels wherever the optimizer state does (checkpoints,
    meshes, the jitted step's arguments) without a new argument. The step reads it with
    `loss_scale_of` and writes it with `with_loss_scale`.
    """

    def init(params):
        del params
        return LossScaleState(
            jnp.asarray(cfg.loss_scale_init, jnp.float32), jnp.asarray(0, jnp.int32)
        )

    def update(updates, state, params=None):
        del params
        return updates, state

    return optax.GradientTransformation(init, update)


def _is_scale(s) -> bool:
    return isinstance(s, LossScaleState)


def loss_scale_of(opt_state) -> LossScaleState | None:
    found = [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=_is_scale) if _is_scale(s)]
    return found[0] if found else None


def with_loss_scale(opt_state, new: LossScaleState):
    return jax.tree_util.tree_map(
        lambda s: new if _is_scale(s) else s, opt_state, is_leaf=_is_scale
    )


def next_loss_scale(cfg: TrainConfig, s: LossScaleState, found_inf) -> LossScaleState:
    """torch's `_amp_update_scale_`: back off and restart the count after an overflow; grow after
    `loss_scale_interval` clean steps in a row (unless the grown scale would be infinite)."""
    good = s.good_steps + 1
    grown = s.scale * jnp.asarray(cfg.loss_scale_growth, jnp.float32)
    grow = (good == cfg.loss_scale_interval) & jnp.isfinite(grown)
    scale = jnp.where(
        found_inf,
        s.scale * jnp.asarray(cfg.loss_scale_backoff, jnp.float32),
        jnp.where(grow, grown, s.scale),
    )
    good = jnp.where(found_inf | (good == cfg.loss_scale_interval), jnp.zeros_like(good), good)
    return LossScaleState(scale, good)


def unscale(grads, scale):
    """The gradient divided by the loss scale (times its float32 reciprocal, as GradScaler.unscale_),
    and whether any component of the scaled gradient is infinite or NaN (GradScaler's test,
    made before the multiply)."""
    found_inf = ~jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    inv = jnp.asarray(1, jnp.float32) / scale
    return jax.tree.map(lambda g: g * inv.astype(g.dtype), grads), found_inf


def gradient_norm(cfg: TrainConfig):
    """The norm the configured clipper measures: the reference's is finite wherever the true norm is."""
    return clipping.global_norm if cfg.clip.impl == "charclip" else optax.tree.norm


def adopt(policy: str, loss, norm, new, old, found_inf=False):
    """`new` where the step's update applies (`charclip.contract.update_applies`), else `old`.

    Branch-free under jit (`jnp.where`, not `if`): loss and norm are tracers there.
    """
    ok = update_applies(policy, jnp.isfinite(norm) & jnp.isfinite(loss), found_inf)
    if ok is True:
        return new
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def optax_update(tx: optax.GradientTransformation, grads, opt_state, params):
    """`tx.update`, with JAX's standard dtype promotion around optax's own arithmetic.

    optax computes Adam's bias correction as b1 ** count, a Python float and an int32 count,
    which strict promotion refuses; the tests run charclip's code under strict promotion
    (parity_tests/conftest.py), so only optax's part is exempted.
    """
    with jax.numpy_dtype_promotion("standard"):
        return tx.update(grads, opt_state, params)


def with_learning_rate(opt_state, lr):
    """`opt_state` with Adam's injected learning rate set to `lr` (same dtype, so no recompile)."""

    def put(s):
        if hasattr(s, "hyperparams") and "learning_rate" in s.hyperparams:
            old = s.hyperparams["learning_rate"]
            return s._replace(
                hyperparams={**s.hyperparams, "learning_rate": jnp.asarray(lr, old.dtype)}
            )
        return s

    return jax.tree.map(put, opt_state, is_leaf=lambda s: hasattr(s, "hyperparams"))


def loss_and_grads(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    params,
    x,
    y,
    state,
    *,
    layer: str = "fast",
    unroll: int = 1,
    scale=None,
    masks=None,
):
    """((mean loss, final state), gradient) of the batch, as `accumulate` equal micro-batches.

    With K > 1 micro-batches of B/K streams each, the gradient is the sum of the gradients of
    loss_k / K, in order (what K `backward()` calls of loss_k / K leave in torch's `.grad`), and
    the loss is the mean of the K losses. A `lax.scan` over the micro-batches keeps one copy of
    the model in the compiled program. With a loss `scale` (fp16) each backward pass starts
    from (loss_k / K) * scale, as `scaler.scale(loss / K).backward()` does: the gradient
    returned is scaled, and the loss is not. `masks` (dropout, one (B, T, H) per layer, or
    None) are cut into micro-batches like the rows of x.
    """
    k = cfg.accumulate
    compute = None if cfg.precision == "full" else jnp.dtype(compute_dtype(cfg))

    def objective(p, xk, yk, sk, mk):
        loss_k, final_k = M.loss(
            p,
            xk,
            yk,
            sk,
            cfg=model_cfg,
            layer=layer,
            unroll=unroll,
            masks=mk,
            compute_dtype=compute,
        )
        part = loss_k / k if k > 1 else loss_k
        return (part if scale is None else part * scale), (part, final_k)

    grad = jax.value_and_grad(objective, has_aux=True)
    if k == 1:
        (_, aux), g = grad(params, x, y, state, masks)
        return aux, g
    b = x.shape[0] // k
    xs, ys = x.reshape(k, b, -1), y.reshape(k, b, -1)  # (K, B/K, T)
    states = tuple(
        jnp.swapaxes(s.reshape(s.shape[0], k, b, s.shape[2]), 0, 1) for s in state
    )  # (K, L, B/K, H)
    ms = (
        None if masks is None else tuple(m.reshape(k, b, *m.shape[1:]) for m in masks)
    )  # (K, B/K, T, H) each

    def micro(acc, batch):
        (_, (loss_k, final_k)), g = grad(params, *batch)
        return jax.tree.map(jnp.add, acc, (loss_k, g)), final_k

    zero = (jnp.zeros((), jnp.dtype(cfg.dtype)), jax.tree.map(jnp.zeros_like, params))
    (loss, grads), finals = jax.lax.scan(micro, zero, (xs, ys, states, ms))
    final = tuple(
        jnp.swapaxes(f, 0, 1).reshape(f.shape[1], k * b, f.shape[3]) for f in finals
    )  # (L, B, H)
    return (loss, final), grads


def make_train_step(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    tx: optax.GradientTransformation,
    *,
    layer: str = "fast",
    unroll: int = 1,
):
    """The pure step (params, opt_state, state, x, y, lr, masks) -> (params, opt_state, state, metrics), jitted.

    `layer` picks the recurrent layer (`charclip.jax.model.LAYERS`): "fast", the default, is
    `charclip.jax.fastrnn`'s hand-written backward pass; "scan" is autodiff of the reference.
    """
    D.enable_x64()  # the clipping inside measures in float64
    if layer not in M.LAYERS:
        raise ValueError(f"unknown layer {layer!r}; choose one of {', '.join(M.LAYERS)}")
    measure = gradient_norm(cfg)
    scaled = loss_scaled(cfg)

    def train_step(
        params, opt_state, state, x, y, lr, masks=None
    ):  # masks: dropout's, or None (compiled without)
        scaler = loss_scale_of(opt_state) if scaled else None
        (loss, final), grads = loss_and_grads(
            model_cfg,
            cfg,
            params,
            x,
            y,
            state,
            layer=layer,
            unroll=unroll,
            scale=None if scaler is None else scaler.scale,
            masks=masks,
        )
        found_inf = False
        if scaled:  # fp16: unscale BEFORE measuring and clipping
            grads, found_inf = unscale(grads, scaler.scale)
        norm = measure(
            grads
        )  # measured before clipping, as the chosen clipper measures it (XLA computes it once)
        opt_state = with_learning_rate(opt_state, lr)
        updates, new_opt_state = optax_update(tx, grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        new_params, new_opt_state, final = adopt(
            cfg.nonfinite,
            loss,
            norm,
            (new_params, new_opt_state, final),
            (params, opt_state, state),
            found_inf,
        )
        metrics = {"loss": loss, "grad_norm": norm}
        if scaled:  # the scale moves whether or not the update applied: back off after an overflow
            new_opt_state = with_loss_scale(new_opt_state, next_loss_scale(cfg, scaler, found_inf))
            metrics["loss_scale"], metrics["found_inf"] = scaler.scale, found_inf
        return new_params, new_opt_state, final, metrics

    return jax.jit(train_step)


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
        layer: str = "fast",
    ):
        D.enable_x64()  # float64 runs, and the clipping's float64 measurements
        self.model_cfg, self.cfg, self.layer = model_cfg, cfg, layer
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
        compute = None if cfg.precision == "full" else jnp.dtype(compute_dtype(cfg))
        self._eval_loss = jax.jit(
            lambda p, x, y, s: M.loss(p, x, y, s, cfg=model_cfg, layer=layer, compute_dtype=compute)
        )
        self._apply = jax.jit(_apply_updates(self.tx))

    def reset_hidden(self) -> None:
        self.hidden = None

    def _hidden_for(self, batch: int):
        if self.hidden is None:
            return self._put_hidden(M.zero_state(self.model_cfg, batch, self.dtype))
        return self.hidden

    def step(
        self,
        x: np.ndarray,
        y: np.ndarray,
        lr: float | None = None,
        masks: tuple[np.ndarray, ...] | None = None,
    ) -> StepResult:
        """One optimizer step on the batch (B, T); `lr` (the schedule's rate) replaces the configured one.

        `masks`: dropout's (`charclip.dropout`, one (B, T, H) per layer), or None.
        """
        lr = self.cfg.lr if lr is None else lr
        params, opt_state, hidden, m = self.train_step(
            self.params, self.opt_state, self._hidden_for(len(x)), x, y, lr, masks
        )
        result = verdict(
            m["loss"],
            m["grad_norm"],
            self.cfg.clip,
            self.cfg.nonfinite,
            loss_scale=m.get("loss_scale"),
            found_inf=m.get("found_inf"),
        )  # raises: nothing adopted
        # Under "skip" the jitted step already kept the old values (branch-free), so adopt it either way.
        self.params, self.opt_state, self.hidden = params, opt_state, hidden
        return result

    def apply_gradients(self, grads: dict[str, np.ndarray], lr: float | None = None) -> None:
        """Clip `grads` (by parameter name) with this trainer's clipping, then take one Adam step."""
        g = self._put_params(grads)
        lr = self.cfg.lr if lr is None else lr
        self.params, self.opt_state = self._apply(g, self.opt_state, self.params, lr)

    def evaluate(self, batches) -> float:
        """Mean cross-entropy (nats per character) over `batches`, hidden state carried."""
        total, n, hidden = 0.0, 0, None
        for x, y in batches:
            hidden = (
                hidden
                if hidden is not None
                else self._put_hidden(M.zero_state(self.model_cfg, len(x), self.dtype))
            )
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
        scaler = loss_scale_of(self.opt_state)
        if scaler is not None:
            out["loss_scale"] = np.array(scaler.scale, dtype=np.float32)
            out["loss_scale_good_steps"] = np.array(int(scaler.good_steps), dtype=np.int64)
        return out

    def _load_adam(self, adam: dict[str, np.ndarray]) -> None:
        names = list(self.params)
        new = _adam(self.opt_state)._replace(
            count=jnp.asarray(int(adam["step"]), jnp.int32),
            mu={k: jnp.asarray(adam[f"exp_avg.{k}"]) for k in names},
            nu={k: jnp.asarray(adam[f"exp_avg_sq.{k}"]) for k in names},
        )
        opt_state = _replace_adam(self.opt_state, new)
        if loss_scale_of(opt_state) is not None and "loss_scale" in adam:
            opt_state = with_loss_scale(
                opt_state,
                LossScaleState(
                    jnp.asarray(adam["loss_scale"], jnp.float32),
                    jnp.asarray(int(adam["loss_scale_good_steps"]), jnp.int32),
                ),
            )
        self.opt_state = self._put_opt_state(opt_state)

    # ---- placement hooks: one device here; a mesh in charclip.jax.distributed.MeshTrainer ----

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
        return make_train_step(self.model_cfg, self.cfg, self.tx, layer=self.layer)


def _apply_updates(tx: optax.GradientTransformation):
    def apply(grads, opt_state, params, lr):
        updates, opt_state = optax_update(tx, grads, with_learning_rate(opt_state, lr), params)
        return optax.apply_updates(params, updates), opt_state

    return apply


def _is_adam(x) -> bool:
    return isinstance(x, optax.ScaleByAdamState)


def _adam(opt_state) -> optax.ScaleByAdamState:
    return next(s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=_is_adam) if _is_adam(s))


def _replace_adam(opt_state, new: optax.ScaleByAdamState):
    return jax.tree_util.tree_map(lambda s: new if _is_adam(s) else s, opt_state, is_leaf=_is_adam)
