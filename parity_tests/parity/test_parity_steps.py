"""Issue 4: charclip.torch and charclip.jax compute the same thing, quantity by quantity.

For every cell, 1 and 2 layers, float64 and float32: forward pass, loss, every
gradient by name, global norm, norm- and value-clipped gradients, one Adam
update, a 50-step trajectory with clipping on some steps only, and sampling.
The tolerances and their reasons live in `charclip.parity.TOLERANCES`: one
place, printed by `charclip parity` and asserted here.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from charclip import cli, parity
from charclip.config import ClipConfig, ModelConfig
from charclip.weights import param_shapes

CONFIGS = [
    (cell, layers, dtype)
    for dtype in ("float64", "float32")
    for cell in ("rnn", "lstm", "gru")
    for layers in (1, 2)
]
TINY_CLI = ["--hidden", "12", "--batch-size", "4", "--seq-len", "12"]
SMALL = dict(
    hidden_size=12,
    embedding_dim=6,
    batch_size=4,
    seq_len=12,
    sample_chars=80,
    corpus_chars=20_000,
    progress=False,
)


def _failures(report: parity.Report) -> str:
    return "\n" + parity.format_table(report.rows)


@pytest.mark.parametrize("cell,layers,dtype", CONFIGS)
def test_every_quantity_agrees(cell, layers, dtype):
    report = parity.run_parity(cell, layers, dtype, steps=50, **SMALL)
    assert report.ok, _failures(report)
    names = [r.quantity for r in report.rows]
    # The ladder is complete: every parameter's gradient has its own row.
    cfg = ModelConfig(
        vocab_size=report.config["vocab"],
        cell=cell,
        hidden_size=12,
        num_layers=layers,
        embedding_dim=6,
    )
    assert [n[len("grad ") :] for n in names if n.startswith("grad ")] == list(param_shapes(cfg)), (
        names
    )
    tr = report.trajectory
    # Drift is measured at every step, not only bounded at the end.
    assert tr.steps == 50 and len(tr.param_drift_rel) == len(tr.loss_drift_rel) == 50
    # Clipping acted on some steps and not on others, on the same steps in both backends.
    assert tr.clipped["torch"] == tr.clipped["jax"]
    assert 0 < sum(tr.clipped["torch"]) < 50, tr.clipped["torch"]
    np.testing.assert_array_equal(
        np.array(tr.grad_norm["torch"]) > tr.max_norm, tr.clipped["torch"]
    )


def test_library_clipping_agrees_up_to_torchs_epsilon():
    report = parity.run_parity("lstm", 1, "float64", steps=50, clip_impl="library", **SMALL)
    assert report.ok, _failures(report)
    clipped = next(r for r in report.rows if r.quantity.startswith("norm-clipped"))
    assert clipped.max_rel > 1e-9, "torch's 1e-6 epsilon should show in float64"


def test_a_wrong_norm_is_caught_although_adam_would_hide_it(monkeypatch):
    """Scale JAX's clipping threshold by 2: Adam's output barely moves, the ladder must still fail."""
    import optax

    real = optax.clip_by_global_norm
    monkeypatch.setattr(optax, "clip_by_global_norm", lambda max_norm: real(2 * max_norm))
    report = parity.run_parity(
        "rnn", 1, "float64", steps=3, clip_impl="library", **{**SMALL, "sample_chars": 0}
    )
    failed = {r.quantity.split(" (")[0] for r in report.rows if not r.ok}
    assert "norm-clipped grads" in failed, _failures(report)
    assert "value-clipped grads" not in failed and "global grad norm" not in failed, _failures(
        report
    )


def test_a_wrong_gate_order_is_caught_in_the_forward_pass(monkeypatch):
    """Swap the GRU's reset and update gates in JAX, in the scan reference (the logits rung) and in
    the fast layer (the Trainer's: final state and loss): the first rungs of the ladder fail."""
    import jax.numpy as jnp

    from charclip.jax import fastrnn
    from charclip.jax import model as jax_model

    def swap(xw_t):
        r, z, n = jnp.split(xw_t, 3, axis=-1)
        return jnp.concatenate([z, r, n], axis=-1)

    real_cell, real_fast = jax_model._cell, fastrnn._FORWARD["gru"]
    monkeypatch.setattr(
        jax_model, "_cell", lambda cell, xw_t, *rest: real_cell(cell, swap(xw_t), *rest)
    )
    monkeypatch.setitem(
        fastrnn._FORWARD,
        "gru",
        lambda w_hh_t, b_hh, carry, xw_t: real_fast(w_hh_t, b_hh, carry, swap(xw_t)),
    )
    report = parity.run_parity("gru", 1, "float64", steps=2, **{**SMALL, "sample_chars": 0})
    failed = {r.quantity for r in report.rows if not r.ok}
    assert {"logits", "final h", "loss"} <= failed, _failures(report)


def test_cli_prints_the_table_writes_json_and_plot(tmp_path, capsys):
    out_json, out_png = tmp_path / "parity.json", tmp_path / "drift.png"
    code = cli.main(
        [
            "parity",
            "--cell",
            "rnn",
            "--layers",
            "1",
            "--dtype",
            "float32",
            "--steps",
            "50",
            *TINY_CLI,
            "--json",
            str(out_json),
            "--plot",
            str(out_png),
            "--no-progress",
        ]
    )
    text = capsys.readouterr().out
    assert code == 0, text
    assert "max abs err" in text and "all quantities agree" in text
    (report,) = json.loads(out_json.read_text())
    assert report["ok"] and report["config"]["dtype"] == "float32"
    assert len(report["trajectory"]["param_drift_rel"]) == 50
    assert all(
        {"quantity", "max_abs", "max_rel", "tol", "reason", "ok"} <= row.keys()
        for row in report["rows"]
    )
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_exits_non_zero_when_something_differs(monkeypatch, capsys):
    monkeypatch.setitem(
        parity.TOLERANCES["float64"], "loss", parity.Tolerance(-1.0, "a bound nothing meets")
    )
    code = cli.main(["parity", "--cell", "rnn", "--steps", "2", *TINY_CLI, "--no-progress"])
    out = capsys.readouterr().out
    assert code == 1 and "DIFFERS" in out and "rnn: loss" in out, out


def test_bad_options_are_one_line_errors(capsys):
    assert cli.main(["parity", "--layers", "0"]) == 2
    assert "--layers must be a positive integer" in capsys.readouterr().err
    assert cli.main(["parity", "--steps", "1"]) == 2


def test_library_gap_is_torchs_epsilon_and_reference_has_none():
    assert parity.library_gap("library", 0.5) == pytest.approx(2e-6)
    assert parity.library_gap("reference", 0.5) == 0.0
    assert ClipConfig().impl == "library"
