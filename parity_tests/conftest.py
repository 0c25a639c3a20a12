"""Test settings: Hypothesis profiles, JAX's 64-bit mode, strict dtype and rank promotion.

Profiles: `dev` (fast, the default), `ci` (200 examples per property,
derandomized; chosen automatically when the CI variable is set), `thorough`
(thousands, opt-in with HYPOTHESIS_PROFILE=thorough).
"""

import atexit
import os
import shutil
import tempfile

import hypothesis
import torch
from hypothesis import HealthCheck

# Most of the suite's time is XLA compiling programs it has compiled before: every Trainer
# jits fresh closures (new cache entries in memory, the same HLO), and every `charclip`
# subprocess starts cold. JAX's persistent compilation cache, keyed on the HLO, the compile
# options and the devices, hands back the executable an identical compile would have
# produced, so nothing a test computes changes. One fresh folder per session (the environment
# variables reach the subprocesses), removed at exit: a run never reuses an older run's binaries.
_CACHE = tempfile.mkdtemp(prefix="charclip-xla-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax

from charclip.jax.device import enable_x64

enable_x64()  # float64 tests build float64 arrays before any entry point would switch it on

# Again through jax.config, in case a plugin imported JAX before this file set the variables.
# JAX_COMPILATION_CACHE_DIR= (empty) in the environment switches the cache off, to compare.
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"] or None)
jax.config.update(
    "jax_persistent_cache_min_compile_time_secs",
    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
)
jax.config.update(
    "jax_persistent_cache_min_entry_size_bytes",
    int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]),
)

# As equinox's tests do: a silent upcast (float32 + float64 arrays -> float64, int + float
# arrays) or an implicit broadcast between ranks is an error in the tests, not a slowdown
# or a hidden dtype change in a run. Python scalars stay weakly typed, as in normal JAX.
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

# The tests run JAX and PyTorch in one process: XLA's thread pool keeps both cores busy,
# and a torch op on 2 intra-op threads then waits on its second thread (a tiny step took
# 0.5 s instead of 2 ms). One thread keeps the suite fast.
torch.set_num_threads(1)

_common = dict(
    deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
# `dev` and `thorough` draw fresh random examples on every run, as a new user's run does.
# derandomize=False is spelled out: when a CI variable is set, Hypothesis's own default
# profile is derandomized, and a profile registered without it would inherit that, so the
# random run that .ci/run adds would silently repeat the `ci` profile's examples.
_random = dict(derandomize=False, print_blob=True)
hypothesis.settings.register_profile("dev", max_examples=30, **_random, **_common)
hypothesis.settings.register_profile(
    "ci", max_examples=200, derandomize=True, database=None, print_blob=True, **_common
)
hypothesis.settings.register_profile("thorough", max_examples=3000, **_random, **_common)

_default = "ci" if os.environ.get("CI") else "dev"
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", _default))


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject.toml): one worker per core, at most 4. Each worker imports torch
    and JAX and compiles its own programs (about 1-2 GiB), so more would cost memory on a
    big machine without shortening the longest test file much."""
    return max(
        1,
        min(
            4,
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count() or 1,
        ),
    )
