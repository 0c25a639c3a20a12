"""Smoke test of the benchmark harness: one tiny clipping micro-benchmark, its JSON schema, its report."""

import json

from charclip.benchmarks import clip_cost, report
from charclip.benchmarks.training import Case
from charclip.config import ModelConfig, TrainConfig


def test_clip_micro_benchmark_schema():
    r = clip_cost.clip_times(clip_cost.split_sizes(1000, 3), device="cpu", repeats=2)
    r = json.loads(json.dumps(r))  # must survive the trip through results.json
    assert (r["params"], r["tensors"], r["bytes_min"]) == (1000, 3, 3 * 4 * 1000)
    assert {
        "torch clip_grad_norm_ (foreach)",
        "optax.clip_by_global_norm (jit)",
        "torch flat buffer",
    } <= set(r["impls"])
    for name, s in r["impls"].items():
        assert s["n"] == 2, name
        assert 0 < s["min"] <= s["median"] <= s["max"], (name, s)
        assert s["bytes_per_s"] == r["bytes_min"] / s["median"], name


def test_split_sizes_and_default_case():
    assert clip_cost.split_sizes(10, 3) == [4, 3, 3]
    m, t = ModelConfig(vocab_size=1), TrainConfig()
    assert Case.default() == Case(
        m.cell, m.hidden_size, m.num_layers, m.embedding_dim, t.batch_size, t.seq_len, True
    )


def test_exponent_fit_recovers_a_power_law():
    assert (
        abs(report.fit_exponent([32, 64, 128], [3.0, 12.0, 48.0]) - 2.0) < 1e-9
    )  # exact powers of two: only rounding


def test_step_flops_of_the_default_configuration():
    """The issue's count: 7.1 GFLOP forward, 21.4 per step (LSTM 2x256, E 64, B 64, T 64, V 65)."""
    from charclip.benchmarks.training import step_flops

    f = step_flops(Case.default(), 65)
    assert round(f["forward"] / 1e9, 1) == 7.1 and round(f["step"] / 1e9, 1) == 21.3, f
    double_t = step_flops(Case.default(seq=128), 65)
    assert double_t["step"] == 2 * f["step"]  # linear in T (truncated BPTT)


def test_paired_ratio_and_the_verdict_under_load():
    from charclip.benchmarks.harness import paired_ratio, verdict

    a, b = {"samples": [2.0, 4.0, 6.0]}, {"samples": [1.0, 1.0, 3.0]}
    assert paired_ratio(a, b) == {
        "median": 2.0,
        "q1": 2.0,
        "q3": 3.0,
        "n": 3,
    }  # round by round: 2, 4, 2
    assert verdict(True, 1.5, 2).startswith("met")
    assert verdict(False, 2.9, 2).startswith("not met")
    assert verdict(True, 3.5, 2) == "too loaded to judge (load 3.5 on 2 cores)"


def test_quick_and_partial_runs_never_write_the_committed_folder(tmp_path, monkeypatch, capsys):
    from charclip.benchmarks import harness, suite

    monkeypatch.setattr(suite, "RESULTS", tmp_path)
    assert suite.main(["--quick", "--only", "sgemm peak"]) == 0
    machine = harness.machine_name("cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{machine}-partial"]
    r = json.loads((tmp_path / f"{machine}-partial" / "results.json").read_text())
    assert r["mode"] == "quick (partial)" and r["peak"]["peak_flop_per_s"] > 0
    assert suite.main(["--only", "no such task"]) == 2
    assert "no task matches" in capsys.readouterr().err


def test_precision_benchmark_writes_six_comparable_runs(tmp_path):
    """charclip.benchmarks.precision on a tiny model: six trainers, each with a validation loss, a
    positive median step time and a paired time ratio (exactly 1 for float32 against itself)."""
    from charclip.benchmarks import precision

    out = tmp_path / "p.json"
    assert precision.main(["--steps", "12", "--tiny", "--out", str(out), "--no-progress"]) == 0
    r = json.loads(out.read_text())
    assert [(x["backend"], x["precision"]) for x in r["runs"]] == [
        (b, p) for b in ("torch", "jax") for p in ("full", "bf16", "fp16")
    ]
    for x in r["runs"]:
        assert (
            0 < x["val_loss"] < 10
            and x["step_seconds"]["n"] == 11
            and x["step_seconds"]["median"] > 0
        ), x
    assert all(x["time_vs_full"]["median"] == 1.0 for x in r["runs"] if x["precision"] == "full")
    assert (
        precision.main(["--steps", "12", "--tiny", "--no-progress"]) == 2
    )  # never onto the README's source
