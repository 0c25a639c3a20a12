"""The JAX side of `prove_port`: a plain function, a Flax NNX module or an Equinox module,
reduced to one function over the torch `state_dict`'s names; taps and submodule outputs
recorded on an eager forward pass; the loss, gradients, optax clipping and step, the trajectory.

Imported by `charclip.parity.port` only when a proof runs (it imports jax and optax; flax
and equinox only for their modules).
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from charclip.errors import CharclipError
from charclip.parity.tap import recording

LAYOUTS = ("same", "transpose", "oihw->hwio", "reshape")


@contextlib.contextmanager
def pinned_precision():
    """float32 matmuls at full precision (JAX's default on GPUs is TF32-like); yields what was pinned.

    Standard dtype and rank promotion too, whatever the caller's suite set: optax and Flax are
    written for them (a strict setting would fail inside the libraries, not in the port).
    """
    with (
        jax.default_matmul_precision("highest"),
        jax.numpy_dtype_promotion("standard"),
        jax.numpy_rank_promotion("allow"),
    ):
        yield "JAX: default_matmul_precision 'highest'"


def front_end(side) -> str:
    """ "nnx", "equinox" or "function": told apart by the classes' modules, importing neither library."""
    mods = [c.__module__ for c in type(side).__mro__]
    if any(m.startswith("flax.nnx") for m in mods):
        return "nnx"
    if any(m.startswith("equinox") for m in mods):
        return "equinox"
    if callable(side):
        return "function"
    raise CharclipError(
        f"the JAX side must be a function (params, x), a Flax NNX module or an Equinox module, "
        f"not {type(side).__name__}"
    )


def _key(k) -> str:
    for attr in ("name", "idx", "key"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _path(path) -> str:
    parts = [_key(k) for k in path]
    return ".".join(
        parts[:-1] if parts and parts[-1] == "value" else parts
    )  # NNX: a Variable's .value


def _apply_layout(layout, a, name: str, path: str):
    if callable(layout):
        return layout(a)
    if layout == "same":
        return a
    if layout == "transpose":
        return a.T
    if layout == "oihw->hwio":
        return jnp.transpose(a, (*range(2, a.ndim), 1, 0))  # (O, I, *K) -> (*K, I, O)
    raise CharclipError(
        f"unknown layout {layout!r} for {name} -> {path}; use one of {', '.join(LAYOUTS)} "
        f"or a function of the torch array"
    )


def _auto_layout(name: str, path: str, torch_shape: tuple, jax_shape: tuple) -> str:
    """Flax names a weight in its own layout `kernel`: (in, out) dense, (*K, in, out) conv; else torch's."""
    if path.rsplit(".", 1)[-1] == "kernel" and len(torch_shape) >= 2:
        return "transpose" if len(torch_shape) == 2 else "oihw->hwio"
    if torch_shape != jax_shape and [d for d in torch_shape if d != 1] == [
        d for d in jax_shape if d != 1
    ]:
        return "reshape"  # e.g. an Equinox conv bias (C, 1, 1) for torch's (C,)
    return "same"


class _Used(dict):
    """A dict that notes which keys a mapping function reads."""

    def __init__(self, *a):
        super().__init__(*a)
        self.read: set[str] = set()

    def __getitem__(self, k):
        self.read.add(k)
        return super().__getitem__(k)


def _module_parts(side, kind: str):
    """(leaves with paths, treedef, rebuild(leaves) -> module) of a module's arrays."""
    if kind == "nnx":
        from flax import nnx

        graphdef, state = nnx.split(side)
        flat, treedef = jax.tree_util.tree_flatten_with_path(state)
        return (
            flat,
            treedef,
            lambda leaves: nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves)),
        )
    import equinox as eqx

    arrays, static = eqx.partition(side, eqx.is_inexact_array)
    flat, treedef = jax.tree_util.tree_flatten_with_path(arrays)
    return (
        flat,
        treedef,
        lambda leaves: eqx.combine(jax.tree_util.tree_unflatten(treedef, leaves), static),
    )


def as_function(side, params: dict[str, np.ndarray], trainable: list[str], mapping: dict | None):
    """The JAX side as `(fn(params, x), layout notes, module builder or None)`; fn takes torch names and layouts.

    For a module every floating array is matched to a torch entry: by `mapping[path]` (a torch
    name, a (name, layout) pair, or a function of the whole params dict), else by its own path
    (Flax's `kernel`/`scale`/`embedding` standing for torch's `weight`). The layout change sits
    inside `fn`, so the gradients come back in torch's layout with no rounding added.
    """
    kind = front_end(side)
    mapping = dict(mapping or {})
    if kind == "function":
        if mapping:
            raise CharclipError(
                "mapping is for Flax NNX and Equinox modules; a plain function reads the "
                "state_dict's names itself"
            )
        return side, [], None, kind
    flat, _, rebuild = _module_parts(side, kind)
    paths = [_path(p) for p, _ in flat]
    unknown = sorted(set(mapping) - set(paths))
    if unknown:
        raise CharclipError(
            f"mapping names {unknown[0]!r}, which is no array of the JAX module (its arrays: "
            f"{', '.join(p for p, (_, v) in zip(paths, flat) if _floating(v))})"
        )
    plan, notes, used = [], [], set()
    for path, (_, leaf) in zip(paths, flat):
        if not _floating(leaf):
            plan.append(("const", leaf))
            continue
        spec = mapping.get(path)
        if callable(spec):
            probe = _Used({k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in params.items()})
            got = jax.eval_shape(spec, probe)
            if tuple(got.shape) != tuple(leaf.shape):
                raise CharclipError(
                    f"mapping[{path!r}] gives shape {tuple(got.shape)}; the JAX array is "
                    f"{tuple(leaf.shape)}"
                )
            used |= probe.read
            plan.append(("fn", spec))
            notes.append(f"{path} <- function of {', '.join(sorted(probe.read))}")
            continue
        name, layout = (
            (spec if isinstance(spec, tuple) else (spec, None))
            if spec is not None
            else (None, None)
        )
        if name is None:
            base, last = path.rsplit(".", 1) if "." in path else ("", path)
            stems = [path] + (
                [f"{base}.weight" if base else "weight"]
                if last in ("kernel", "scale", "embedding")
                else []
            )
            name = next((s for s in stems if s in params), None)
            if name is None:
                raise CharclipError(
                    f"JAX array {path!r} {tuple(leaf.shape)} matches no torch parameter; "
                    f"name it in mapping={{{path!r}: '<torch name>'}}"
                )
        if name not in params:
            raise CharclipError(
                f"mapping[{path!r}] names {name!r}, which is not in the torch state_dict"
            )
        layout = layout or _auto_layout(name, path, params[name].shape, tuple(leaf.shape))
        shape = (
            tuple(
                jax.eval_shape(
                    lambda a, lay=layout, n=name, q=path: _apply_layout(lay, a, n, q),
                    jax.ShapeDtypeStruct(params[name].shape, params[name].dtype),
                ).shape
            )
            if layout != "reshape"
            else tuple(leaf.shape)
        )
        if shape != tuple(leaf.shape) or (layout == "reshape" and params[name].size != leaf.size):
            raise CharclipError(
                f"torch {name} {params[name].shape} does not fit JAX {path} {tuple(leaf.shape)} "
                f"(layout {layout if isinstance(layout, str) else 'given'}: {shape})"
            )
        used.add(name)
        plan.append(("name", name, layout, tuple(leaf.shape)))
        if layout != "same":
            notes.append(
                f"{name} {tuple(params[name].shape)} -> {path} {tuple(leaf.shape)}: "
                f"{layout if isinstance(layout, str) else 'mapped'}"
            )
        if layout == "oihw->hwio":
            notes.append(
                f"{path.rsplit('.', 1)[0]}: Flax's channels-last output compared with its channel axis "
                f"moved to torch's place (N, C, ...)"
            )
    missing = [n for n in trainable if n not in used]
    if missing:
        raise CharclipError(
            f"torch parameter {missing[0]!r} {params[missing[0]].shape} has no counterpart in the "
            f"JAX module; add it to mapping={{'<JAX path>': {missing[0]!r}}}"
        )

    def build(p):
        leaves = []
        for item in plan:
            if item[0] == "const":
                leaves.append(item[1])
            elif item[0] == "fn":
                leaves.append(item[1](p))
            else:
                _, name, layout, shape = item
                a = p[name]
                leaves.append(
                    a.reshape(shape) if layout == "reshape" else _apply_layout(layout, a, name, "")
                )
        return rebuild(leaves)

    def fn(p, x):
        return build(p)(x)

    return fn, notes, build, kind


def _floating(v) -> bool:
    return hasattr(v, "dtype") and jnp.issubdtype(v.dtype, jnp.inexact)


def _submodules(module, kind: str) -> dict[int, str]:
    """id(submodule) -> its dotted path, for the module just built."""
    if kind == "nnx":
        from flax import nnx

        return {
            id(m): ".".join(str(k) for k in path) for path, m in nnx.iter_modules(module) if path
        }
    import equinox as eqx

    found: dict[int, str] = {}

    def walk(node, prefix):
        for path, leaf in jax.tree_util.tree_flatten_with_path(
            node, is_leaf=lambda v: v is not node and isinstance(v, eqx.Module)
        )[0]:
            if isinstance(leaf, eqx.Module):
                name = ".".join(filter(None, [prefix, _path(path)]))
                found[id(leaf)] = name
                walk(leaf, name)

    walk(module, "")
    return found


@contextlib.contextmanager
def _recording_calls(module, kind: str, out: list):
    """While inside, each submodule's call appends (its path, its output) to `out`."""
    names = _submodules(module, kind)
    objects = {}

    def visit(m):
        objects.setdefault(type(m), m)

    for m in _all(module, kind):
        visit(m)
    patched = []
    for cls in objects:
        own = cls.__dict__.get("__call__")
        original = cls.__call__

        def wrapper(self, *a, __original=original, **k):
            result = __original(self, *a, **k)
            if id(self) in names:
                out.append((names[id(self)], _channels_first(self, result)))
            return result

        try:
            type.__setattr__(cls, "__call__", wrapper)
            patched.append((cls, own))
        except (AttributeError, TypeError):
            continue
    try:
        yield
    finally:
        for cls, own in patched:
            if own is None:
                type.__delattr__(cls, "__call__")
            else:
                type.__setattr__(cls, "__call__", own)


def _channels_first(module, result):
    """A Flax convolution's output is channels-last (N, *spatial, C); torch's is (N, C, *spatial):
    the channel axis is moved to torch's place before comparing (stated in the report's notes)."""
    cls = type(module)
    if (
        cls.__module__.startswith("flax.nnx")
        and cls.__name__ in ("Conv", "ConvTranspose")
        and hasattr(result, "ndim")
        and result.ndim >= 3
    ):
        return jnp.moveaxis(result, -1, 1)
    return result


def _all(module, kind: str) -> list:
    if kind == "nnx":
        from flax import nnx

        return [m for path, m in nnx.iter_modules(module) if path]
    import equinox as eqx

    found = []

    def walk(node):
        for leaf in jax.tree_util.tree_leaves(
            node, is_leaf=lambda v: v is not node and isinstance(v, eqx.Module)
        ):
            if isinstance(leaf, eqx.Module):
                found.append(leaf)
                walk(leaf)

    walk(module)
    return found


def _leaves(value) -> list:
    return [leaf for leaf in jax.tree_util.tree_leaves(value) if _floating(leaf)]


def _level(leaf):
    return getattr(leaf, "_trace", None)


def recorded(fn, build, kind: str, p: dict, x, names: list[str]):
    """`fn(p, x)` and, as a list of arrays per entry, what `tap` marked and (for modules) each
    submodule's output, in call order; their names go to `names` (filled while tracing).

    The values leave through the traced function's outputs (`value_and_grad`'s aux), so only
    those of the forward pass's own level can: a submodule called under `jax.vmap` or
    `lax.scan` is skipped, and a tap there is an error (tap the batched value outside it).
    """
    top = _level(
        next(v for v in jax.tree_util.tree_leaves(p) if _floating(v) and _level(v) is not None)
    )
    calls: list = []
    with recording() as taps:
        if build is None:
            out = fn(p, x)
        else:
            module = build(p)
            with _recording_calls(module, kind, calls):
                out = module(x)
    tapped = {name for name, _ in taps}
    for name, v in taps:
        if any(_level(leaf) is not top for leaf in _leaves(v)):
            raise CharclipError(
                f"tap({name!r}, ...) was called inside jax.vmap, lax.scan or a nested jit; "
                f"tap the value where the forward pass itself computes it"
            )
    kept = [
        (n, v)
        for n, v in calls
        if n not in tapped and all(_level(leaf) is top for leaf in _leaves(v))
    ]
    merged = kept + list(taps)
    names[:] = [n for n, _ in merged]
    return out, [_leaves(v) for _, v in merged]


def build_optimizer(
    opt, lr: float, max_norm: float | None, clip_value: float | None, jax_optimizer=None
) -> optax.GradientTransformation:
    """optax matched to the torch.optim configuration (docs/divergences.md), clipping first."""
    parts = []
    if max_norm is not None:
        parts.append(optax.clip_by_global_norm(max_norm))
    if clip_value is not None:
        parts.append(optax.clip(clip_value))
    if jax_optimizer is not None:
        parts.append(jax_optimizer)
    elif opt.name == "sgd":
        if opt.weight_decay:
            parts.append(
                optax.add_decayed_weights(opt.weight_decay)
            )  # torch: added to the gradient
        parts.append(optax.sgd(lr, momentum=opt.momentum or None, nesterov=opt.nesterov))
    elif opt.name == "adam":
        if opt.weight_decay:
            parts.append(
                optax.add_decayed_weights(opt.weight_decay)
            )  # torch Adam: L2, into the gradient
        parts.append(optax.adam(lr, b1=opt.betas[0], b2=opt.betas[1], eps=opt.eps))
    else:
        parts.append(
            optax.adamw(
                lr, b1=opt.betas[0], b2=opt.betas[1], eps=opt.eps, weight_decay=opt.weight_decay
            )
        )
    return optax.chain(*parts)


def run(
    fn,
    build,
    kind: str,
    params: dict[str, np.ndarray],
    trainable: list[str],
    batches,
    *,
    dtype: str,
    loss: str,
    opt,
    lr: float,
    max_norm: float | None,
    clip_value: float | None,
    jax_optimizer=None,
    ladder: bool = True,
) -> dict:
    """The JAX side of the proof; the same quantities as `port_torch.run`."""
    jdtype = jnp.dtype(dtype)

    def array(a):  # cast in NumPy (bfloat16 from ml_dtypes): no JAX operation to compile
        a = np.asarray(a)
        return jnp.asarray(a.astype(jdtype) if np.issubdtype(a.dtype, np.floating) else a)

    full = {k: array(v) for k, v in params.items()}
    frozen = {k: v for k, v in full.items() if k not in trainable}

    names: list[str] = []

    def loss_of(train, x, y):
        out, taps = (
            recorded(fn, build, kind, {**frozen, **train}, x, names)
            if ladder
            else (fn({**frozen, **train}, x), [])
        )
        if loss == "mse":
            return jnp.mean((out - y) ** 2), (out, taps)
        logp = jax.nn.log_softmax(out.reshape(-1, out.shape[-1]), axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, y.reshape(-1)[:, None], axis=-1)), (out, taps)

    tx = build_optimizer(opt, lr, max_norm, clip_value, jax_optimizer)
    clip = build_optimizer(opt, lr, max_norm, clip_value, optax.identity())

    @jax.jit
    def step(train, opt_state, x, y):
        (value, (out, taps)), grads = jax.value_and_grad(loss_of, has_aux=True)(train, x, y)
        clipped, _ = clip.update(grads, clip.init(train), train)
        updates, opt_state = tx.update(grads, opt_state, train)
        return (
            optax.apply_updates(train, updates),
            opt_state,
            value,
            out,
            grads,
            optax.tree.norm(grads),
            clipped,
            taps,
        )

    def numpy(tree) -> dict[str, np.ndarray]:
        return {
            k: np.asarray(v).astype(np.float32 if v.dtype == jnp.bfloat16 else v.dtype)
            for k, v in tree.items()
        }

    train = {k: full[k] for k in trainable}
    start = numpy(train)
    opt_state = jax.jit(tx.init)(train)
    result: dict = {}
    losses, per_step = [], []
    for i, (x, y) in enumerate(batches):
        train, opt_state, value, out, grads, norm, clipped, taps = step(
            train, opt_state, array(x), array(y)
        )
        if i == 0 and ladder:
            result["taps"] = [
                (
                    n,
                    [
                        np.asarray(a).astype(np.float32 if a.dtype == jnp.bfloat16 else a.dtype)
                        for a in v
                    ],
                )
                for n, v in zip(names, taps)
            ]
            result.update(
                output=np.asarray(out).astype(
                    np.float32 if out.dtype == jnp.bfloat16 else out.dtype
                ),
                loss=float(value),
                grad=numpy(grads),
                grad_norm=float(norm),
                clipped=numpy(clipped),
            )
        losses.append(float(value))
        per_step.append(numpy(train))
    if ladder:
        result["update"] = {n: per_step[0][n] - start[n] for n in trainable}
    return {**result, "losses": losses, "params": per_step}
