"""Timing and bookkeeping shared by every benchmark: warm up, synchronise, then time.

The machine these numbers come from may be shared and loaded, so a measurement is
never one number: it is the median of several repeats with their min and max, and
where two things are compared they are timed in alternation (A, B, A, B, ...) so a
burst of load from elsewhere hits both alike and their ratio stays meaningful.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable


def stats(samples: list[float]) -> dict:
    """Median, min, max and count of a list of timings (seconds), and the timings themselves."""
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "n": len(samples),
        "samples": list(samples),
    }


def paired_ratio(a: dict, b: dict) -> dict:
    """a's time over b's, round by round of one `interleaved` run (a burst of load hits both
    of a round alike): the median ratio, and the lower and upper quartile of the ratios."""
    r = sorted(x / y for x, y in zip(a["samples"], b["samples"]))
    q = statistics.quantiles(r, n=4, method="inclusive") if len(r) > 1 else [r[0]] * 3
    return {"median": statistics.median(r), "q1": q[0], "q3": q[2], "n": len(r)}


def too_loaded(load: float, cores: int) -> bool:
    """More runnable work than the benchmark itself can account for (it keeps up to all cores
    busy, plus one): times are then set by the scheduler as much as by the code."""
    return load > cores + 1


def verdict(ok: bool, load: float, cores: int) -> str:
    """A goal's status from an interleaved measurement, or a refusal to judge when the machine was too busy."""
    if too_loaded(load, cores):
        return f"too loaded to judge (load {load:.1f} on {cores} cores)"
    return ("met" if ok else "not met") + f" (load {load:.1f} on {cores} cores)"


def interleaved(
    fns: dict[str, Callable[[], object]], *, repeats: int, warmup: int = 1
) -> dict[str, dict]:
    """Time each callable `repeats` times, alternating between them, after `warmup` untimed calls each.

    Each callable must return only when its work is done (it synchronises itself). The
    order within a round rotates so no callable always runs right after the same other one.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - t0)
    return {name: stats(s) for name, s in samples.items()}


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    """(result, seconds) of one call."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine_name(device: str) -> str:
    """A folder name for the results: `cpu-2core`, or `gpu-<model>` on a GPU."""
    if device == "gpu":
        import torch

        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "unknown"
        return "gpu-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"cpu-{cores()}core"


def environment(device: str) -> dict:
    """What the numbers depend on: load, threads, flags, versions. Recorded with every run."""
    import jax
    import numpy as np
    import optax
    import torch

    env_vars = (
        "XLA_FLAGS",
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "TF_CPP_MIN_LOG_LEVEL",
        "CI",
    )
    return {
        "time": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "device": device,
        "cpu": cpu_model(),
        "cores": cores(),
        "loadavg": list(os.getloadavg()),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "versions": {
            "torch": torch.__version__,
            "jax": jax.__version__,
            "optax": optax.__version__,
            "numpy": np.__version__,
        },
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "torch_mkldnn": torch.backends.mkldnn.is_available(),
        "jax_devices": [str(d) for d in jax.devices()],
        "jax_x64": bool(jax.config.jax_enable_x64),
        "env": {k: os.environ.get(k) for k in env_vars},
    }
