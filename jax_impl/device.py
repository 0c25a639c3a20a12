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
        raise CharclipError("--device gpu: JAX sees no GPU on this machine (is jax[cuda] installed?); use --device cpu") from None
