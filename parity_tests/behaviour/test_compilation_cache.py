"""CLI runs of the JAX backend keep their compiled programs in charclip's cache folder (JAX's
persistent compilation cache), unless switched off (docs/fast-layer.md)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from charclip import backends, cli, corpus
from parity_tests.helpers import small_corpus


@pytest.fixture
def folders(monkeypatch):
    """Where `cli._compilation_cache` would put the cache; None when it leaves JAX alone."""
    calls = []

    class Device:
        @staticmethod
        def use_compilation_cache(folder):
            calls.append(str(folder))

    monkeypatch.setattr(backends, "module", lambda backend, name: Device)
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.delenv("CHARCLIP_COMPILATION_CACHE", raising=False)

    def chosen(backend="jax"):
        calls.clear()
        cli._compilation_cache(backend)
        assert len(calls) <= 1, calls
        return calls[0] if calls else None

    return chosen


def test_the_cache_folder_and_its_switches(folders, monkeypatch, tmp_path):
    assert folders() == str(corpus.cache_dir() / "xla")
    assert folders("torch") is None  # torch compiles nothing
    monkeypatch.setenv("CHARCLIP_COMPILATION_CACHE", str(tmp_path))
    assert folders() == str(tmp_path)
    for off in ("off", "OFF"):
        monkeypatch.setenv("CHARCLIP_COMPILATION_CACHE", off)
        assert folders() is None
    monkeypatch.delenv("CHARCLIP_COMPILATION_CACHE")
    monkeypatch.setenv(
        "JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax's")
    )  # JAX's own setting wins
    assert folders() is None


def test_a_jax_run_fills_the_cache_under_charclips_cache_folder(tmp_path):
    data = small_corpus(tmp_path, 2_000)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))
    }
    env.pop("CHARCLIP_COMPILATION_CACHE", None)
    env["CHARCLIP_CACHE"] = str(tmp_path / "cache")
    argv = [
        "train",
        "--backend",
        "jax",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "run"),
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--seq-len",
        "4",
        "--hidden",
        "4",
        "--embed",
        "2",
        "--layers",
        "1",
        "--eval-batches",
        "1",
        "--sample-chars",
        "0",
        "--no-progress",
    ]
    p = subprocess.run(
        [sys.executable, "-m", "charclip", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr
    entries = list((tmp_path / "cache" / "xla").iterdir())
    assert entries, "the run compiled its step but left nothing in the cache folder"
