"""The clippers people use, as kit targets, and the runner `charclip conform` calls.

Each target names a function, its framework and adapter, and the non-finite policy it
documents. A target runs in a process of its own (`python -m charclip.testing.targets
NAME`), which prints its report as JSON: Keras picks its backend once per process
(KERAS_BACKEND), and TensorFlow is heavy to import. A target whose library is not
installed reports so instead of rows.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    name: str
    title: str  # what the table calls it
    make: Callable[[], dict]  # -> check_clipper's keyword arguments (fn, framework, adapter, ...)
    env: tuple[tuple[str, str], ...] = ()
    needs: str = ""  # the module that must import, or the target is skipped


def _torch(foreach: bool) -> dict:
    import torch

    torch.set_num_threads(1)
    return dict(
        fn=lambda params, tau: torch.nn.utils.clip_grad_norm_(params, tau, foreach=foreach),
        framework="torch",
    )


def _optax() -> dict:
    import optax

    from charclip.testing import adapters

    return dict(
        fn=optax.clip_by_global_norm, framework="jax", adapter=adapters.optax_transformation
    )


def _keras() -> dict:
    import keras

    from charclip.testing import adapters

    if keras.backend.backend() == "torch":
        import torch

        torch.set_num_threads(1)
    return dict(
        fn=keras.optimizers.SGD, framework="numpy", adapter=adapters.keras_option("global_clipnorm")
    )


def _tensorflow() -> dict:
    import numpy as np
    import tensorflow as tf

    from charclip.testing.strategies import dtype_name, np_dtype

    def clip(leaves, tau):
        tensors = [
            tf.constant(np.asarray(a, np.float32) if dtype_name(a.dtype) == "bfloat16" else a)
            for a in leaves
        ]
        tensors = [
            tf.cast(t, tf.bfloat16) if dtype_name(a.dtype) == "bfloat16" else t
            for t, a in zip(tensors, leaves)
        ]
        clipped, norm = tf.clip_by_global_norm(tensors, tau)
        back = [
            np.asarray(tf.cast(c, tf.float32)).astype(a.dtype)
            if dtype_name(a.dtype) == "bfloat16"
            else np.asarray(c)
            for c, a in zip(clipped, leaves)
        ]
        dtype = np.dtype(
            np_dtype(dtype_name(norm.dtype))
        )  # NumPy cannot read a bfloat16 tensor directly
        return back, np.asarray(tf.cast(norm, tf.float64)).astype(dtype)

    return dict(fn=clip, framework="numpy")


def _charclip_torch(**options) -> dict:
    import torch

    from charclip.torch import clipping

    torch.set_num_threads(1)
    return dict(fn=functools.partial(clipping.clip_grad_norm_, **options), framework="torch")


def _charclip_jax(**options) -> dict:
    from charclip.jax import clipping

    return dict(
        fn=lambda leaves, tau: clipping.clip_tree_by_global_norm(leaves, tau, **options),
        framework="jax",
    )


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            "torch-foreach",
            "`torch.nn.utils.clip_grad_norm_(..., foreach=True)`",
            lambda: _torch(True),
            needs="torch",
        ),
        Target(
            "torch-loop",
            "`torch.nn.utils.clip_grad_norm_(..., foreach=False)`",
            lambda: _torch(False),
            needs="torch",
        ),
        Target("optax", "`optax.clip_by_global_norm`", _optax, needs="optax"),
        Target(
            "keras-jax",
            "Keras 3 `SGD(global_clipnorm=tau)`, JAX backend",
            _keras,
            (("KERAS_BACKEND", "jax"),),
            needs="keras",
        ),
        Target(
            "keras-torch",
            "Keras 3 `SGD(global_clipnorm=tau)`, torch backend",
            _keras,
            (("KERAS_BACKEND", "torch"),),
            needs="keras",
        ),
        Target("tensorflow", "`tf.clip_by_global_norm`", _tensorflow, needs="tensorflow"),
        Target(
            "charclip-torch",
            "`charclip.torch.clipping.clip_grad_norm_`",
            _charclip_torch,
            needs="torch",
        ),
        Target(
            "charclip-torch-strict",
            "`charclip.torch.clipping.clip_grad_norm_(..., strict=True)`",
            lambda: _charclip_torch(strict=True),
            needs="torch",
        ),
        Target(
            "charclip-jax",
            "`charclip.jax.clipping.clip_tree_by_global_norm`",
            _charclip_jax,
            needs="jax",
        ),
        Target(
            "charclip-jax-strict",
            "`charclip.jax.clipping.clip_tree_by_global_norm(..., strict=True)`",
            lambda: _charclip_jax(strict=True),
            needs="jax",
        ),
    )
}

# Upstream reports of what a failing row shows (from their trackers; REFERENCE.md).
UPSTREAM = {
    (
        "torch",
        "overflow_safe",
    ): "[pytorch#193006](https://github.com/pytorch/pytorch/issues/193006)",
    (
        "torch",
        "returns_true_norm",
    ): "[pytorch#193006](https://github.com/pytorch/pytorch/issues/193006)",
    (
        "torch",
        "bad_tau_refused",
    ): "[pytorch#31367](https://github.com/pytorch/pytorch/issues/31367)",
    ("optax", "tau_zero"): "[optax#1752](https://github.com/google-deepmind/optax/pull/1752)",
}


def upstream(target: str, promise: str) -> str:
    family = "torch" if target.startswith("torch") else target
    return UPSTREAM.get((family, promise), "")


def run_target(name: str, max_examples: int, seed: int | None, shrink_budget: int) -> dict:
    """The report of one target, in this process, as a dict (or why it could not run)."""
    t = TARGETS[name]
    try:
        __import__(t.needs)
    except ImportError as e:
        return {
            "target": name,
            "title": t.title,
            "skipped": f"{t.needs} is not installed ({e})",
            "rows": [],
        }
    from charclip.testing.check import check_clipper

    kwargs = t.make()
    report = check_clipper(
        max_examples=max_examples, seed=seed, shrink_budget=shrink_budget, name=name, **kwargs
    )
    return {**report.to_dict(), "title": t.title}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m charclip.testing.targets")
    p.add_argument("target", choices=sorted(TARGETS))
    p.add_argument("--max-examples", type=int, default=20)
    p.add_argument("--seed", type=int)
    p.add_argument("--shrink-budget", type=int, default=30)
    a = p.parse_args(argv)
    for k, v in TARGETS[a.target].env:
        os.environ.setdefault(k, v)
    if TARGETS[a.target].needs in ("jax", "optax") or a.target == "keras-jax":
        import jax

        jax.config.update("jax_enable_x64", True)  # float64 gradients stay float64
    print(json.dumps(run_target(a.target, a.max_examples, a.seed, a.shrink_budget)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
