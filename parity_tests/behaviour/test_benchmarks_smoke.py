"""Smoke test of the benchmark harness: one tiny clipping micro-benchmark, its JSON schema, its report."""

import json

from benchmarks import clip_cost, report
from benchmarks.training import Case
from charclip.config import ModelConfig, TrainConfig


def test_clip_micro_benchmark_schema():
    r = clip_cost.clip_times(clip_cost.split_sizes(1000, 3), device="cpu", repeats=2)
    r = json.loads(json.dumps(r))  # must survive the trip through results.json
    assert (r["params"], r["tensors"], r["bytes_min"]) == (1000, 3, 3 * 4 * 1000)
    assert {"torch clip_grad_norm_ (foreach)", "optax.clip_by_global_norm (jit)", "torch flat buffer"} <= set(r["impls"])
    for name, s in r["impls"].items():
        assert s["n"] == 2, name
        assert 0 < s["min"] <= s["median"] <= s["max"], (name, s)
        assert s["bytes_per_s"] == r["bytes_min"] / s["median"], name


def test_split_sizes_and_default_case():
    assert clip_cost.split_sizes(10, 3) == [4, 3, 3]
    m, t = ModelConfig(vocab_size=1), TrainConfig()
    assert Case.default() == Case(m.cell, m.hidden_size, m.num_layers, m.embedding_dim, t.batch_size, t.seq_len, True)


def test_exponent_fit_recovers_a_power_law():
    assert abs(report.fit_exponent([32, 64, 128], [3.0, 12.0, 48.0]) - 2.0) < 1e-9  # exact powers of two: only rounding
