"""Mixed precision (--precision bf16 / fp16) in both backends: the same arithmetic, the same
loss-scale decisions, and clipping's promise kept after unscaling (docs/precision.md).

Tolerances come from `charclip.parity.tolerances.low_precision_bound`: six standard
deviations of two backends' independent roundings, from the unit roundoff and the
roundings counted in one cell step; nothing here is tuned to a measured value.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from charclip import backends
from charclip import run as run_mod
from charclip.checkpoint import load
from charclip.config import ClipConfig, ModelConfig, TrainConfig
from charclip.contract import BACKENDS
from charclip.errors import CharclipError
from charclip.parity.ladder import compare_step, make_step_setup
from charclip.parity.tolerances import UNIT_ROUNDOFF, low_precision_bound
from charclip.weights import init_params

PRECISIONS = ("bf16", "fp16")


def _model(cell="lstm", layers=2, hidden=16):
    return ModelConfig(
        vocab_size=12, cell=cell, hidden_size=hidden, num_layers=layers, embedding_dim=8
    )


def _batch(b=4, t=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 12, (b, t)), rng.integers(0, 12, (b, t))


def _trainer(backend, model_cfg, cfg, params, **kw):
    return backends.trainer_factory(backend)(model_cfg, cfg, params, **kw)


def _received(trainer) -> dict[str, np.ndarray]:
    """The gradient Adam received on the last step (its first moment, with beta1 = 0)."""
    return {
        k[len("exp_avg.") :]: v for k, v in trainer.adam_state().items() if k.startswith("exp_avg.")
    }


def _norm(grads: dict) -> float:
    return math.sqrt(sum(float(np.sum(np.asarray(g, np.float64) ** 2)) for g in grads.values()))


# Each cell once and each precision at least once (one case compiles eight JAX steps, ~3 s).
@pytest.mark.parametrize(
    ("cell", "precision"), [("lstm", "bf16"), ("gru", "fp16"), ("rnn", "bf16"), ("lstm", "fp16")]
)
def test_one_step_agrees_across_backends_within_the_rounding_bound(cell, precision):
    """The parity ladder's step rungs (forward, loss, every gradient, norm, clipped gradients,
    Adam) in mixed precision, each within the bound derived from the unit roundoff."""
    model_cfg = _model(cell)
    cfg = TrainConfig(batch_size=4, seq_len=8, precision=precision)
    params = init_params(model_cfg, 0, "float32")
    setup = make_step_setup(model_cfg, cfg, params, *_batch())
    rows = compare_step(setup)
    bad = [f"{r.quantity}: {r.max_rel:.2e} > {r.tol:.1e}" for r in rows if not r.ok]
    assert not bad, bad
    b = low_precision_bound(precision, cell)
    assert all(
        r.tol
        == pytest.approx(b / (math.sqrt(setup.x.size) if r.quantity == "loss" else 1), rel=0.5)
        for r in rows
    ), [(r.quantity, r.tol) for r in rows]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_step_really_runs_in_low_precision(backend, precision):
    """A bf16/fp16 step differs from the float32 one by rounding of the low precision's size:
    more than u/16 (float32 rounding alone gives ~1e-7, far below), and less than the bound;
    in the gradient, and in the recurrent layer's own output, the final hidden state (a run
    with only the head in low precision, as torch.autocast on a CPU, would leave it float32)."""
    model_cfg = _model("lstm", layers=1)
    x, y = _batch()
    params = init_params(model_cfg, 0, "float32")
    base = TrainConfig(batch_size=4, seq_len=8, beta1=0.0, clip=ClipConfig(mode="none"))
    grads, finals = {}, {}
    for p in ("full", precision):
        t = _trainer(backend, model_cfg, replace(base, precision=p), params)
        assert not t.step(x, y).skipped
        grads[p], finals[p] = _received(t), t.hidden_state()
    u, bound = UNIT_ROUNDOFF[precision], low_precision_bound(precision, "lstm")
    diff = _norm({k: grads[precision][k] - grads["full"][k] for k in grads["full"]}) / _norm(
        grads["full"]
    )
    assert u / 16 < diff < bound, ("gradient", diff, u)
    h = _norm({k: finals[precision][k] - finals["full"][k] for k in finals["full"]}) / _norm(
        finals["full"]
    )
    assert u / 16 < h < bound, ("final hidden state", h, u)


def _gradscaler_rule(init: float, interval: int, overflows: list[bool]) -> list[float]:
    """The scale each step used, by torch.amp.GradScaler's documented rule, from the overflow flags."""
    scales, scale, good = [], init, 0
    for overflowed in overflows:
        scales.append(scale)
        if overflowed:
            scale, good = scale * 0.5, 0
        else:
            good += 1
            if good == interval:
                scale, good = scale * 2.0, 0
    return scales


def test_fp16_backends_skip_the_same_steps_and_move_the_scale_alike():
    """Start the scale far too high (2^28: the scaled gradient overflows float16's 65504) and let
    it grow every 3 clean steps: both backends overflow, skip, back off and grow on the same
    steps, and the scales follow GradScaler's rule exactly (powers of two: no rounding)."""
    model_cfg = _model("gru", layers=1)
    cfg = TrainConfig(
        batch_size=4, seq_len=8, precision="fp16", loss_scale_init=2.0**28, loss_scale_interval=3
    )
    params = init_params(model_cfg, 0, "float32")
    x, y = _batch()
    runs = {}
    for b in BACKENDS:
        t = _trainer(b, model_cfg, cfg, params)
        results = [t.step(x, y) for _ in range(16)]
        runs[b] = (
            [r.loss_scale for r in results],
            [r.overflow for r in results],
            [r.skipped for r in results],
            t.adam_state(),
        )
    (scales_t, over_t, skip_t, adam_t), (scales_j, over_j, skip_j, adam_j) = (
        runs["torch"],
        runs["jax"],
    )
    assert over_t == over_j and skip_t == skip_j and scales_t == scales_j, (
        over_t,
        over_j,
        scales_t,
        scales_j,
    )
    assert over_t == skip_t, (
        "an overflow skips its step, and only overflows skip under the default policy"
    )
    assert scales_t == _gradscaler_rule(2.0**28, 3, over_t)
    assert any(over_t) and not all(over_t), over_t
    assert any(b > a for a, b in zip(scales_t, scales_t[1:])), (
        "the scale grew after 3 clean steps at least once"
    )
    assert (
        int(adam_t["step"]) == int(adam_j["step"]) == over_t.count(False)
    )  # Adam counts applied steps only
    assert float(adam_t["loss_scale"]) == float(adam_j["loss_scale"])
    assert int(adam_t["loss_scale_good_steps"]) == int(adam_j["loss_scale_good_steps"])


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_clipped_gradient_is_unscaled_and_has_norm_tau(backend, precision):
    """Clipping runs on the unscaled gradient: the gradient Adam receives has norm exactly
    min(norm, tau) (float32: one multiply by tau / norm; 1e-5 is ~100 float32 ulps). Clipping
    the scaled fp16 gradient instead would hand Adam norm tau / 65536 (the common mistake,
    parity_tests/properties/test_clipping_pitfalls.py)."""
    model_cfg = _model("lstm", layers=1)
    x, y = _batch()
    params = init_params(model_cfg, 0, "float32")
    base = TrainConfig(batch_size=4, seq_len=8, beta1=0.0, precision=precision)
    free = _trainer(backend, model_cfg, replace(base, clip=ClipConfig(mode="none")), params)
    norm = free.step(x, y).grad_norm
    assert norm == pytest.approx(
        _norm(_received(free)), rel=1e-5
    )  # the reported norm is the unscaled one
    tau = norm / 2
    clipped = _trainer(backend, model_cfg, replace(base, clip=ClipConfig(max_norm=tau)), params)
    r = clipped.step(x, y)
    assert r.clipped and not r.skipped
    assert _norm(_received(clipped)) == pytest.approx(tau, rel=1e-5)


# Each example builds two trainers (a JAX one compiles its step, ~1 s): 12 examples per run.
@settings(max_examples=12)
@given(
    precision=st.sampled_from(("full", *PRECISIONS)),
    backend=st.sampled_from(BACKENDS),
    cell=st.sampled_from(("rnn", "lstm", "gru")),
    factor=st.floats(0.01, 4.0),
    seed=st.integers(0, 3),
)
def test_property_clipped_norm_is_at_most_tau_in_every_precision(
    precision, backend, cell, factor, seed
):
    """Whatever the precision, the gradient handed to Adam, measured in float64, is at most tau
    (plus float32 rounding of the clip's one multiply: a few ulps, bounded by 2^-20)."""
    model_cfg = _model(cell, layers=1)
    x, y = _batch(seed=seed)
    params = init_params(model_cfg, seed, "float32")
    base = TrainConfig(
        batch_size=4, seq_len=8, beta1=0.0, precision=precision, clip=ClipConfig(mode="none")
    )
    norm = _trainer(backend, model_cfg, base, params).step(x, y).grad_norm
    tau = factor * norm
    t = _trainer(backend, model_cfg, replace(base, clip=ClipConfig(max_norm=tau)), params)
    r = t.step(x, y)
    assert not r.skipped
    assert _norm(_received(t)) <= tau * (1 + 2.0**-20)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_resume_continues_the_loss_scale_bit_identically(tmp_path, backend):
    """12 steps in one go equal 6 steps, a checkpoint, and 6 more from it: weights, Adam and the
    loss scale, with scale growths (every 4 clean steps) on both sides of the checkpoint."""
    model_cfg = ModelConfig(
        vocab_size=1, cell="lstm", hidden_size=16, num_layers=1, embedding_dim=8
    )
    cfg = TrainConfig(
        steps=12,
        batch_size=4,
        seq_len=8,
        eval_every=6,
        eval_batches=1,
        checkpoint_every=6,
        precision="fp16",
        loss_scale_interval=4,
    )
    quiet = dict(backend=backend, progress=False, sample_chars=0, log=lambda *a: None)
    whole = run_mod.train(model_cfg, cfg, out_dir=tmp_path / "whole", **quiet)
    run_mod.train(model_cfg, replace(cfg, steps=6), out_dir=tmp_path / "half", **quiet)
    resumed = run_mod.train(
        None, replace(cfg, steps=12), out_dir=tmp_path / "half", resume=tmp_path / "half", **quiet
    )
    a, b = load(whole["checkpoint"]), load(resumed["checkpoint"])
    assert a.step == b.step == 12
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k], err_msg=k)
    for k in a.adam:
        np.testing.assert_array_equal(a.adam[k], b.adam[k], err_msg=k)
    assert float(a.adam["loss_scale"]) == 2.0**16 * 2**3  # three growths in 12 clean steps
    records = [r for r in run_mod.read_metrics(tmp_path / "half" / "metrics.jsonl") if "loss" in r]
    assert [r["loss_scale"] for r in records] == [2.0**16 * 2 ** (i // 4) for i in range(12)]


def test_mixed_precision_needs_float32_master_weights():
    with pytest.raises(CharclipError, match="--precision bf16 keeps float32 master weights"):
        TrainConfig(precision="bf16", dtype="float64")
    with pytest.raises(CharclipError, match="unknown --precision"):
        TrainConfig(precision="int8")


def test_dropout_under_mixed_precision_agrees_across_backends():
    """Dropout's masks enter in the compute dtype in both backends (1/(1-p) rounded to bfloat16
    alike), so a bf16 step with dropout agrees within the same rounding bound."""
    from charclip.dropout import masks as draw

    model_cfg = _model("lstm")
    cfg = TrainConfig(
        batch_size=4,
        seq_len=8,
        beta1=0.0,
        precision="bf16",
        dropout=0.3,
        clip=ClipConfig(mode="none"),
    )
    params = init_params(model_cfg, 0, "float32")
    x, y = _batch()
    masks = draw(model_cfg, cfg, 0, 4, 8)
    grads = {}
    for b in BACKENDS:
        t = _trainer(b, model_cfg, cfg, params)
        assert not t.step(x, y, masks=masks).skipped
        grads[b] = _received(t)
    bound = low_precision_bound("bf16", "lstm")
    for k in grads["torch"]:
        a, c = grads["torch"][k], grads["jax"][k]
        assert np.max(np.abs(a - c)) <= bound * np.max(np.abs(a)), k


@pytest.mark.parametrize(
    "field,value",
    [
        ("loss_scale_init", 1e39),
        ("loss_scale_init", 1000.0),
        ("loss_scale_growth", 1.7),
        ("loss_scale_backoff", 0.3),
    ],
)
def test_loss_scale_settings_must_be_powers_of_two(field, value):
    """Powers of two keep every rescale exact, so torch (double multiply) and JAX (float32) agree."""
    with pytest.raises(CharclipError, match=f"{field} must be a power of two"):
        TrainConfig(precision="fp16", **{field: value})


def test_the_verdict_under_a_loss_scale():
    """GradScaler's rule: a non-finite scaled gradient skips the step under every policy; with a
    finite loss it is an overflow, never an error; a non-finite loss still raises under "error"."""
    from charclip.contract import NonFiniteStep, verdict

    clip = ClipConfig(max_norm=1.0)
    for policy in ("error", "skip", "propagate"):
        r = verdict(2.0, math.inf, clip, policy, loss_scale=2.0**16, found_inf=True)
        assert r.skipped and r.overflow, policy
        r = verdict(2.0, 0.5, clip, policy, loss_scale=2.0**16, found_inf=False)
        assert not r.skipped and not r.overflow, policy
    r = verdict(math.nan, math.nan, clip, "propagate", loss_scale=2.0**16, found_inf=True)
    assert (
        r.skipped and not r.overflow
    )  # GradScaler skips it too; it is no overflow (the loss itself is NaN)
    assert not verdict(
        math.nan, math.nan, clip, "propagate"
    ).skipped  # without a scale, propagate applies it
    with pytest.raises(NonFiniteStep):
        verdict(math.nan, math.nan, clip, "error", loss_scale=2.0**16, found_inf=True)
