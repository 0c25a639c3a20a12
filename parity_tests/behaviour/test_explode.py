"""`charclip explode`: what it measures is the gradient it claims to, in both backends alike, and the
facts its report states hold in a real quick run (unclipped training diverges, clipped converges).

The measured quantity, dL/dh_{T-k} for a last-step loss, is checked against a NumPy backward pass
written from the equations (dL/dh_{t-1} = W_hh^T (diag(1 - h_t^2) dL/dh_t)), so both backends
could not agree on something wrong. The quick run is real: the embedded corpus, both Trainers,
float64, the seeds of the command; the test reads its results.json, not the markdown.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from charclip.cli import main
from charclip.config import ModelConfig
from charclip.jax import explode as jax_explode
from charclip.torch import explode as torch_explode
from charclip.weights import init_params, scale_spectral_radius

BACKENDS = {"torch": torch_explode, "jax": jax_explode}


def _numpy_hidden_grads(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Norms of dL/dh_{T-k}, k = 0..T, for a one-layer tanh RNN, by the backward recurrence by hand."""
    emb, w_ih, w_hh = (
        params["embedding.weight"],
        params["rnn.weight_ih_l0"],
        params["rnn.weight_hh_l0"],
    )
    b = params["rnn.bias_ih_l0"] + params["rnn.bias_hh_l0"]
    B, T = x.shape
    hs = [np.zeros((B, w_hh.shape[0]))]
    for t in range(T):
        hs.append(np.tanh(emb[x[:, t]] @ w_ih.T + hs[-1] @ w_hh.T + b))
    logits = hs[-1] @ params["head.weight"].T + params["head.bias"]
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(B), y[:, -1]] -= 1.0
    g = p / B @ params["head.weight"]  # dL/dh_T of the mean last-step cross-entropy
    norms = [np.linalg.norm(g)]
    for t in range(T, 0, -1):
        g = (g * (1.0 - hs[t] ** 2)) @ w_hh  # dL/dh_{t-1}
        norms.append(np.linalg.norm(g))
    return np.array(norms)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rho", [0.5, 1.5])
def test_grad_through_time_is_the_backward_recurrence(backend, rho):
    cfg = ModelConfig(vocab_size=11, cell="rnn", hidden_size=12, num_layers=1, embedding_dim=5)
    params = init_params(cfg, 3, "float64")
    params["rnn.weight_hh_l0"] = scale_spectral_radius(params["rnn.weight_hh_l0"], rho)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 11, size=(2, 3, 20), dtype=np.int64)
    norms, states = BACKENDS[backend].grad_through_time(cfg, params, x, y)
    want = _numpy_hidden_grads(params, x, y)
    # float64, 20 steps of BPTT, each a matmul of width 12: rounding ~1e-14 relative; the norms span 1e-6..1.
    np.testing.assert_allclose(
        norms, want, rtol=1e-10, err_msg=f"{backend}: ||dL/dh_(T-k)|| differs from NumPy"
    )
    assert states.shape == (21, 1, 3, 12)
    np.testing.assert_array_equal(states[0], 0.0, err_msg="h_0 is the zero initial state")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("explode")
    assert main(["explode", "--quick", "--no-progress", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text(encoding="utf-8"))


def test_quick_run_writes_its_report(quick):
    out, res = quick
    report = (out / "report.md").read_text(encoding="utf-8")
    for png in (
        "gradient-through-time.png",
        "jacobian-bounds.png",
        "training.png",
        "threshold-sweep.png",
    ):
        assert (out / png).stat().st_size > 10_000, png
        assert f"]({png})" in report, f"report.md does not show {png}"
    assert res["backends"] == ["torch", "jax"] and res["quick"] is True


def test_backends_gradient_through_time_curves_agree(quick):
    _, res = quick
    for regime, curves in res["gradient_through_time"]["regimes"].items():
        for rho, c in curves.items():
            # float64 BPTT over 50 steps; 1 - h^2 at saturated units (h^2 within 1e-5 of 1) loses ~5 of the
            # 16 digits, so 1e-9 relative leaves room above the ~1e-12 measured.
            np.testing.assert_allclose(
                c["norms"]["jax"],
                c["norms"]["torch"],
                rtol=1e-9,
                err_msg=f"{regime}, rho {rho}: torch and JAX differ",
            )


def test_gradient_through_time_follows_rho_and_its_bounds(quick):
    _, res = quick
    for regime, curves in res["gradient_through_time"]["regimes"].items():
        for rho, c in curves.items():
            n = np.array(c["norms"]["torch"])
            # The bounds hold by the submultiplicativity of the 2-norm; 1e-9 covers float64 rounding.
            assert np.all(n <= np.array(c["jacobian_product"]) * (1 + 1e-9)), (regime, rho)
            assert np.all(
                np.array(c["jacobian_product"]) <= np.array(c["norm_bound"]) * (1 + 1e-9)
            ), (regime, rho)
            if regime == "linear":
                # tanh' = 1 there, so the backward product is W_hh^k: its growth per step tends to rho.
                assert abs(c["growth_per_step"] - c["rho"]) < 0.02 * c["rho"], (
                    rho,
                    c["growth_per_step"],
                )
    lin, ini = (res["gradient_through_time"]["regimes"][k]["2"] for k in ("linear", "initialised"))
    assert (
        lin["norms"]["torch"][-1] / lin["norms"]["torch"][0] > 1e12
    )  # 2^50 ~ 1e15: it explodes...
    assert (
        ini["norms"]["torch"][-1] / ini["norms"]["torch"][0] < 1e6
    )  # ...far less once tanh saturates


def test_unclipped_diverges_and_clipped_converges_in_both_backends(quick):
    _, res = quick
    first = {}
    for r in res["training"]:
        first.setdefault(r["backend"], r["first_loss"])
        assert r["first_loss"] == pytest.approx(first[r["backend"]], rel=1e-12), (
            "runs do not start alike"
        )
        limit = res["divergence_factor"] * r["first_loss"]
        if r["mode"] == "none":
            assert r["diverged"], (
                f"{r['backend']}: unclipped training did not diverge (max loss {r['max_loss']})"
            )
            assert r["max_loss"] is None or r["max_loss"] > limit or r["first_nonfinite_step"], r
        if r["mode"] == "norm":
            assert r["converged"], (
                f"{r['backend']}: norm-clipped training did not converge: {r['val_loss']}"
            )
            assert max(r["loss"]) <= limit and r["val_loss"] < res["unigram_entropy"]
            assert 0 < r["clipped_fraction"] < 1 and r["clipped_fraction"] == pytest.approx(
                np.mean(r["clipped"])
            )
            # Clipping bounds the update, so W_hh's spectral radius stays near its start instead of growing tenfold.
            assert max(r["spectral_radius"]) < 5 * res["settings"]["rho"], r["backend"]
    assert {r["backend"] for r in res["training"]} == {"torch", "jax"}
    # The runs use Adam set up as SGD, which holds while every gradient component is far below eps;
    # 1e-3 leaves room above the 1.3e-4 of the worst run measured (a never-clipping tau = 100 run).
    assert res["sgd_deviation_bound"] < 1e-3, res["sgd_deviation_bound"]


def test_sweep_too_large_a_threshold_does_not_protect(quick):
    _, res = quick
    by_tau = {r["tau"]: r for r in res["sweep"]}
    assert by_tau[max(by_tau)]["diverged"], (
        "tau = 100 never clips, so it should diverge like no clipping"
    )
    best = by_tau[res["settings"]["max_norm"]]
    assert best["converged"]
    small = by_tau[min(by_tau)]
    assert small["clipped_fraction"] == 1.0 and math.isfinite(small["val_loss"])
    assert small["val_loss"] > best["val_loss"] + 0.1, "a tiny tau should slow learning down"


def test_explode_rejects_an_unusable_out_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert (
        main(
            [
                "explode",
                "--quick",
                "--backend",
                "torch",
                "--no-progress",
                "--out",
                str(blocker / "sub"),
            ]
        )
        == 2
    )
    assert "cannot create the output folder" in capsys.readouterr().err
