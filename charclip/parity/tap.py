"""`tap(name, value)`: mark a value in a JAX port so that `prove_port` can compare it.

Framework-free. Outside a proof `tap` returns its value and does nothing else, so a port
keeps its taps in production code at no cost. While `prove_port` traces the JAX side's
training step, each tap appends `(name, value)` to the active recording and the values leave
through the compiled step's outputs; `name` is the qualified name of the torch submodule whose
output the value is (`"encoder.layers.0"`, `"head"`), as `named_modules()` spells it. Tap the
forward pass's own values, not values inside `jax.vmap` or `lax.scan` (a one-line error).
"""

from __future__ import annotations

import contextlib
import contextvars

_RECORDING: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "charclip_tap", default=None
)


def tap(name: str, value):
    """Return `value`; while a proof records, also note it under `name` (a torch submodule's name)."""
    recording = _RECORDING.get()
    if recording is not None:
        recording.append((name, value))
    return value


@contextlib.contextmanager
def recording():
    """Collect the taps hit inside this block: yields the list of (name, value) in call order."""
    taps: list = []
    token = _RECORDING.set(taps)
    try:
        yield taps
    finally:
        _RECORDING.reset(token)
