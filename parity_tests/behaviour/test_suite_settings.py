"""The suite's own settings do what the README says: `dev` and `thorough` draw fresh
random examples on every run, `ci` repeats the same ones."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_profiles_are_random_or_derandomized_as_documented_even_under_ci():
    # In a fresh interpreter with CI set, where Hypothesis's own default is derandomized:
    # a profile that did not say derandomize=False would inherit it, and .ci/run's random
    # pass would repeat the derandomized one.
    code = (
        "import hypothesis, runpy; runpy.run_path('parity_tests/conftest.py'); "
        "print(*(hypothesis.settings.get_profile(p).derandomize for p in ('dev', 'thorough', 'ci')))"
    )
    env = {**os.environ, "CI": "true", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[-3:] == ["False", "False", "True"], f"derandomize for dev, thorough, ci: {out[-3:]}"
