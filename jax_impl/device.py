"""Where the JAX backend runs: "cpu" or "gpu", as a `jax.Device`."""

from __future__ import annotations

import jax

from charclip.errors import CharclipError


def resolve(device: str) -> jax.Device:
    if device == "cpu":
        return jax.devices("cpu")[0]
    if device != "gpu":
        raise CharclipError(f"unknown device {device!r}; use cpu or gpu")
    try:
        return jax.devices("gpu")[0]
    except RuntimeError:
        raise CharclipError(
            "--device gpu: JAX sees no GPU on this machine (is jax[cuda] installed?); use --device cpu"
        ) from None


def enable_x64() -> None:
    """Switch on JAX's 64-bit mode (`jax_enable_x64`) in this process; the entry points call it.

    Without it JAX turns float64 arrays into float32 ones silently, and the clipping's float64
    measurements would be float32 ones (see the package's docstring).
    """
    if not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)


def use_compilation_cache(folder) -> None:
    """Keep compiled programs in `folder` (JAX's persistent compilation cache) for later processes.

    The cache is keyed on the program, the compile options and the devices, so a process that
    compiles a program compiled before loads the executable instead of building it again: the
    same binary, the same numbers. Every program is kept, however quick its compile: a run's
    first steps compile several small ones besides the training step.
    """
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
