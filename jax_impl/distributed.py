"""Training over several devices in one process: a `jax.sharding.Mesh`, and `shard_map` by hand.

`charclip train --backend jax --devices N --mesh LAYOUT` trains one global batch over
N devices (virtual CPU devices on a machine without accelerators). The layouts:

    data       batch split over a "data" axis; parameters replicated
    model      parameters split over a "model" axis; batch replicated
    fsdp       batch and parameters split over the same "data" axis
    2d         a (N/2, 2) mesh: batch over "data", parameters over "model"
    shard_map  the fsdp layout written out by hand with `jax.shard_map`

A parameter is split along its first axis whose length the mesh axis divides; one
with no such axis (a bias of odd length, say) stays replicated, so every layout mixes
split and whole tensors.

For the first four, the step is `charclip.jax.train`'s own jitted step, given shardings:
the compiler inserts the collectives, and `optax.tree.norm` (or the reference
`charclip.jax.clipping`) on a sharded gradient is the global norm, computed across devices.
The `shard_map` step is the teaching version of what the compiler does: each device
sees only its slices, and the global norm is an explicit `psum` (docs/distributed.md):

    g = sqrt( psum_i( sum of grad^2 over device i's slices of split tensors )
              + sum of grad^2 over replicated tensors )        (each counted once)
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from charclip.config import LAYOUTS as _LAYOUTS
from charclip.config import ClipConfig, ModelConfig, TrainConfig
from charclip.errors import CharclipError
from charclip.jax import clipping
from charclip.jax import device as D
from charclip.jax import model as M
from charclip.jax import train as T

LAYOUTS = _LAYOUTS["jax"]
BATCH_AXIS = {"data": "data", "model": None, "fsdp": "data", "2d": "data", "shard_map": "data"}
PARAM_AXIS = {"data": None, "model": "model", "fsdp": "data", "2d": "model", "shard_map": "data"}


def use_devices(n: int, device: str = "cpu") -> list:
    """The first n devices, asking JAX for n virtual CPU devices if its backend has not started yet."""
    if n < 1:
        raise CharclipError(f"--devices must be 1 or more, got {n}")
    if device == "cpu":
        if (
            jax.config.jax_num_cpu_devices < n
        ):  # more than asked for already is fine: the first n are used
            try:
                jax.config.update(
                    "jax_num_cpu_devices", n
                )  # only possible before the first array is made
            except RuntimeError:
                pass  # already started: use what it has
        devices = jax.devices("cpu")
    else:
        D.resolve("gpu")  # one line when JAX sees no GPU
        devices = jax.devices("gpu")
    if len(devices) < n:
        raise CharclipError(
            f"--devices {n}: JAX has only {len(devices)} {device} device(s) in this process "
            "(virtual CPU devices must be requested before JAX starts)"
        )
    return devices[:n]


def make_mesh(layout: str, devices) -> Mesh:
    if layout not in LAYOUTS:
        raise CharclipError(f"unknown --mesh {layout!r}; use one of {', '.join(LAYOUTS)}")
    n = len(devices)
    if layout == "2d":
        if n % 2:
            raise CharclipError(f"--mesh 2d needs an even number of devices, got {n}")
        return Mesh(np.array(devices).reshape(n // 2, 2), ("data", "model"))
    return Mesh(np.array(devices), (PARAM_AXIS[layout] or BATCH_AXIS[layout],))


def param_spec(shape: tuple[int, ...], axis: str | None, size: int) -> P:
    """Split along the first dimension that `size` divides; replicate when none does."""
    for d, length in enumerate(shape):
        if axis is not None and length % size == 0:
            return P(*([None] * d), axis)
    return P()


def _split_dim(spec: P, axis: str) -> int | None:
    return spec.index(axis) if axis in spec else None


# ---- the shard_map step: every collective written out --------------------------------


def sharded_global_norm(grads: dict, split: dict, axis: str) -> jax.Array:
    """The global L2 norm from inside shard_map, where each device holds slices.

    A split tensor's squares are summed over this device's slice, then over the
    devices (`psum`). A replicated tensor is whole on every device: it is added once,
    outside the psum; inside it would count N times.
    """
    sliced = sum(
        (jnp.sum(jnp.square(g)) for k, g in grads.items() if split[k] is not None),
        jnp.zeros((), _dtype(grads)),
    )
    whole = sum(
        (jnp.sum(jnp.square(g)) for k, g in grads.items() if split[k] is None),
        jnp.zeros((), _dtype(grads)),
    )
    return jnp.sqrt(lax.psum(sliced, axis) + whole)


def _dtype(tree):
    return jax.tree.leaves(tree)[0].dtype


def _clip(grads: dict, norm: jax.Array, clip) -> dict:
    """The configured clipping by the psum'd norm: `charclip.jax.clipping`'s, optax's formula bit for bit."""
    if clip.mode == "norm":
        return clipping.clip_tree_with_norm(grads, clip.max_norm, norm)
    if clip.mode == "value":
        return clipping.clip_tree_by_value(grads, clip.max_value)
    return grads


def make_clipped_gradient(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    specs: dict,
    axis: str = "data",
    *,
    layer: str = "fast",
):
    """The per-device function (params slices, state, x, y, masks) -> (clipped slices, norm, loss, final state).

    `masks` (dropout's, or None) hold this device's streams, like x.
    """
    split = {k: _split_dim(s, axis) for k, s in specs.items()}

    def clipped_gradient(params, state, x, y, masks=None):
        n = lax.psum(1, axis)  # devices on the axis
        # 1. Every device gathers the whole parameters (the all-gather of FSDP).
        full = {
            k: v if split[k] is None else lax.all_gather(v, axis, axis=split[k], tiled=True)
            for k, v in params.items()
        }
        # 2. Loss and gradient of this device's streams only (B/N of them).
        (loss, final), grads = jax.value_and_grad(M.loss, has_aux=True)(
            full, x, y, state, cfg=model_cfg, layer=layer, masks=masks
        )
        # 3. The mean over devices = the gradient of the whole batch's mean loss. A split
        #    parameter keeps only its own slice of it (the reduce-scatter of FSDP).
        grads = {
            k: lax.pmean(g, axis)
            if split[k] is None
            else lax.psum_scatter(g, axis, scatter_dimension=split[k], tiled=True) / n
            for k, g in grads.items()
        }
        # 4. The global norm, each element counted once; 5. clip every slice by it.
        norm = sharded_global_norm(grads, split, axis)
        return _clip(grads, norm, cfg.clip), norm, lax.pmean(loss, axis), final

    return clipped_gradient


def make_shard_map_step(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    specs: dict,
    opt_specs,
    *,
    layer: str = "fast",
):
    """`charclip.jax.train.make_train_step`'s step, with every device's part written out in shard_map."""
    clipped_gradient = make_clipped_gradient(model_cfg, cfg, specs, layer=layer)

    def step(params, opt_state, state, x, y, lr, masks=None):
        grads, norm, loss, final = clipped_gradient(params, state, x, y, masks)
        opt_state = T.with_learning_rate(opt_state, lr)
        updates, new_opt_state = T.optax_update(
            tx, grads, opt_state, params
        )  # Adam is elementwise: slices are enough
        new_params = optax.apply_updates(params, updates)
        # Norm and loss are the same on every device, so every device keeps or drops alike.
        new_params, new_opt_state, final = T.adopt(
            cfg.nonfinite,
            loss,
            norm,
            (new_params, new_opt_state, final),
            (params, opt_state, state),
        )
        return new_params, new_opt_state, final, {"loss": loss, "grad_norm": norm}

    batch, hidden, mask = P("data", None), P(None, "data", None), P("data", None, None)
    # check_vma=False: gradients inside are this device's own; every sum over devices is
    # written above. (With the check on, JAX would already psum the gradient of a
    # replicated input, and the pmean above would then scale it by N.)
    return jax.shard_map(
        step,
        mesh=mesh,
        in_specs=(specs, opt_specs, hidden, batch, batch, P(), mask),
        out_specs=(specs, opt_specs, hidden, P()),
        check_vma=False,
    )


# ---- the trainer ----------------------------------------------------------------------


class MeshTrainer(T.Trainer):
    """`charclip.jax.train.Trainer` over a mesh: same methods; only the placement hooks differ."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        cfg: TrainConfig,
        params: dict[str, np.ndarray],
        *,
        layout: str,
        devices,
        adam: dict[str, np.ndarray] | None = None,
        hidden: dict[str, np.ndarray] | None = None,
        device: str = "cpu",
    ):
        self.layout = layout
        self.mesh = make_mesh(layout, devices)
        batch_axis, param_axis = BATCH_AXIS[layout], PARAM_AXIS[layout]
        if batch_axis and cfg.batch_size % self.mesh.shape[batch_axis]:
            raise CharclipError(
                f"--batch-size {cfg.batch_size} does not split over {self.mesh.shape[batch_axis]} devices "
                f"on the mesh's data axis; use a multiple of it"
            )
        if layout == "shard_map" and cfg.accumulate > 1:
            raise CharclipError(
                "--mesh shard_map takes one micro-batch per step; use --accumulate 1 or another --mesh"
            )
        if layout == "shard_map" and cfg.precision != "full":
            raise CharclipError(
                f"--mesh shard_map writes its step out by hand in full precision; for --precision "
                f"{cfg.precision} use another --mesh (data, model, fsdp, 2d)"
            )
        if layout == "shard_map" and cfg.clip.mode == "norm" and cfg.clip.impl == "charclip":
            raise CharclipError(
                "--mesh shard_map writes its clipping out itself (optax's formula); "
                "use --clip-impl library, or another --mesh for charclip's implementation"
            )
        self.spec = partial(
            param_spec, axis=param_axis, size=self.mesh.shape[param_axis] if param_axis else 1
        )
        self.specs = {k: self.spec(np.shape(v)) for k, v in params.items()}
        self.shardings = {k: self._on(s) for k, s in self.specs.items()}
        self.batch_sharding = self._on(P(batch_axis, None))  # (B, T)
        self.state_sharding = self._on(P(None, batch_axis, None))  # (L, B, H)
        self.mask_sharding = self._on(
            P(batch_axis, None, None)
        )  # each dropout mask (B, T, H): streams split like x
        super().__init__(model_cfg, cfg, params, adam=adam, hidden=hidden, device=device)
        self.device = self.mesh.devices.flat[0]

    def _on(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    def _optimizer(self):
        # shard_map clips inside its step; the others use charclip.jax.train's chain (clip, then Adam).
        cfg = self.cfg
        return (
            T.optimizer(replace(cfg, clip=ClipConfig(mode="none")))
            if self.layout == "shard_map"
            else T.optimizer(cfg)
        )

    def _put_params(self, params):
        return jax.device_put({k: np.asarray(v) for k, v in params.items()}, self.shardings)

    def _init_opt_state(self):
        # Adam's moments have their parameter's shape, so the same rule places them; scalars are replicated.
        self.opt_specs = jax.tree.map(
            lambda a: self.spec(a.shape), jax.eval_shape(self.tx.init, self.params)
        )
        self.opt_shardings = jax.tree.map(self._on, self.opt_specs)
        return jax.jit(self.tx.init, out_shardings=self.opt_shardings)(self.params)

    def _put_opt_state(self, opt_state):
        return jax.device_put(opt_state, self.opt_shardings)

    def _put_hidden(self, hidden):
        return jax.device_put(hidden, self.state_sharding)

    def _compile_step(self):
        if self.layout == "shard_map":
            step = make_shard_map_step(
                self.model_cfg,
                self.cfg,
                self.tx,
                self.mesh,
                self.specs,
                self.opt_specs,
                layer=self.layer,
            )
        else:
            step = T.make_train_step(self.model_cfg, self.cfg, self.tx, layer=self.layer)
        b, s, r = self.batch_sharding, self.state_sharding, self._on(P())
        return jax.jit(
            step,
            in_shardings=(self.shardings, self.opt_shardings, s, b, b, r, self.mask_sharding),
            out_shardings=(self.shardings, self.opt_shardings, s, r),
        )


def mesh_factory(world: int, layout: str, device: str = "cpu"):
    """The trainer factory (the `charclip.contract` signature) over `world` devices laid out by `layout`."""
    if layout not in LAYOUTS:
        raise CharclipError(f"unknown --mesh {layout!r}; use one of {', '.join(LAYOUTS)}")
    devices = use_devices(world, device)
    return partial(MeshTrainer, layout=layout, devices=devices)
