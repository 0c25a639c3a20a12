"""The registry of backends: which module or trainer factory serves a (backend, devices, layout).

The core never imports a framework itself; it asks here, and the import happens
only when a backend is chosen. A missing framework becomes one line.
"""

from __future__ import annotations

import importlib
from functools import partial

from charclip.config import BACKENDS, LAYOUTS
from charclip.errors import CharclipError

FRAMEWORKS = ("torch", "jax", "jaxlib", "optax")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise CharclipError(f"unknown backend {backend!r}; use {' or '.join(BACKENDS)}")
    return backend


def module(backend: str, name: str):
    """`charclip.torch.<name>` or `charclip.jax.<name>`, with a clear error when the framework is missing."""
    check_backend(backend)
    try:
        return importlib.import_module(f"{backend}_impl.{name}")
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in FRAMEWORKS:
            raise CharclipError(
                f"the {backend} backend needs {e.name}, which is not installed"
            ) from None
        raise


def _check_devices(backend: str, devices: int) -> None:
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        flag = "--nproc" if backend == "torch" else "--devices"
        raise CharclipError(f"{flag} must be 1 or more, got {devices!r}")


def trainer_factory(
    backend: str, devices: int = 1, layout: str | None = None, *, device: str = "cpu"
):
    """A callable `(model_cfg, train_cfg, params, *, adam=None, hidden=None, device="cpu") -> Trainer`.

    One device: the backend's `train.Trainer`. Several JAX devices: a `MeshTrainer` over
    a mesh laid out by `layout`, in this process. Several torch processes are launched by
    `launcher`, whose rank 0 gets its trainer from `charclip.torch.distributed.leader_factory`.
    """
    check_backend(backend)
    _check_devices(backend, devices)
    if devices == 1:
        return module(backend, "train").Trainer
    if layout not in LAYOUTS[backend]:
        raise CharclipError(
            f"unknown layout {layout!r} for {backend}; use one of {', '.join(LAYOUTS[backend])}"
        )
    if backend == "jax":
        return module("jax", "distributed").mesh_factory(devices, layout, device)
    raise CharclipError(
        "several torch processes need `launcher('torch', N, layout)`; a trainer alone cannot spawn them"
    )


def launcher(backend: str, devices: int, layout: str | None):
    """`launch(train_fn, model_cfg, cfg, **kwargs)`: runs the training loop `train_fn` with the right trainers.

    In one process `train_fn` is called here with `make_trainer=trainer_factory(...)`; for
    torch over several processes, `charclip.torch.distributed.launch` starts the ranks and
    calls `train_fn` on rank 0 with the leader's factory (the others follow it).
    """
    check_backend(backend)
    _check_devices(backend, devices)
    if backend == "torch" and devices > 1:
        if layout not in LAYOUTS["torch"]:
            raise CharclipError(
                f"unknown --parallel {layout!r}; use one of {', '.join(LAYOUTS['torch'])}"
            )
        return partial(module("torch", "distributed").launch_training, world=devices, layout=layout)

    def launch(train_fn, *args, **kwargs):
        factory = trainer_factory(backend, devices, layout, device=_device_of(kwargs))
        return train_fn(*args, make_trainer=factory, **kwargs)

    return launch


def _device_of(kwargs: dict) -> str:
    """The device of a `train_fn` call: its RunOptions' (options=), else its device= keyword."""
    options = kwargs.get("options")
    return options.device if options is not None else kwargs.get("device", "cpu")
