"""The one-command GPU check (`python -m benchmarks.gpu`) runs end to end on the CPU, on a tiny grid,
so the GPU run cannot fail on a typo; its parity rows and gradient check must hold here too."""

import json

from charclip.benchmarks import gpu


def test_the_gpu_check_runs_on_the_cpu_and_writes_its_results(tmp_path):
    assert gpu.main(["--device", "cpu", "--tiny", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "results.json").read_text())
    assert [(p["cell"], p["dtype"], p["ok"]) for p in r["parity"]] == [("lstm", "float64", True)], (
        r["parity"]
    )
    assert [f["ok"] for f in r["fast_vs_scan"]] == [True], r["fast_vs_scan"]
    (row,) = r["throughput"]["rows"]
    for b in ("torch", "jax", "jax_scan"):
        assert row[b]["n"] == 2 and row[b]["median"] > 0, (b, row[b])
    assert row["ratios"]["jax"]["median"] > 0
    assert "GPU only" in r["throughput"]["jax_cudnn_lstm"]["skipped"]
    (clip,) = r["clipping"]
    assert clip["params"] == 10**4 and clip["copy"]["bytes_per_s"] > 0
    assert all(s["share_of_copy_bandwidth"] > 0 for s in clip["impls"].values()), clip["impls"]
    md = (tmp_path / "results.md").read_text()
    assert "| lstm | 2 | float64 | yes |" in md and "jax.experimental.rnn" in md, md


def test_without_a_gpu_the_gpu_check_is_a_one_line_error(capsys):
    import torch

    if torch.cuda.is_available():
        return  # the message is for machines without one
    assert gpu.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("charclip.benchmarks.gpu: error: ") and err.count("\n") == 1, err
