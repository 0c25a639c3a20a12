"""Gradient accumulation and learning-rate schedules: the same math in both backends.

K micro-batches of B/K streams are one batch of B (float64, to rounding); clipping each
micro-batch instead is measurably wrong (it bends the gradient); JAX's in-step accumulation
matches `optax.MultiSteps`; every schedule gives both backends the same float at every step,
and resuming continues it bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from charclip import backends, checkpoint, run, schedules
from charclip.config import ClipConfig, ModelConfig, TrainConfig
from charclip.errors import CharclipError
from charclip.parity import TOLERANCES, errors
from charclip.weights import init_params
from parity_tests.helpers import small_corpus

MODEL = ModelConfig(vocab_size=11, cell="lstm", hidden_size=6, num_layers=2, embedding_dim=4)
B, T, K = 8, 5, 4


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, MODEL.vocab_size, (B, T)), rng.integers(0, MODEL.vocab_size, (B, T))


def _hidden(seed=1):
    rng = np.random.default_rng(seed)
    shape = (MODEL.num_layers, B, MODEL.hidden_size)
    return {"h": np.tanh(rng.standard_normal(shape)), "c": rng.standard_normal(shape)}


def _gradient(backend, accumulate, clip=ClipConfig(mode="none")):
    """The gradient a step hands to Adam (beta1 = 0: Adam's first moment is exactly it), the loss and final state."""
    cfg = TrainConfig(
        batch_size=B, seq_len=T, dtype="float64", beta1=0.0, accumulate=accumulate, clip=clip
    )
    trainer = backends.trainer_factory(backend)(
        MODEL, cfg, init_params(MODEL, 0, "float64"), hidden=_hidden()
    )
    r = trainer.step(*_batch())
    grads = {
        k[len("exp_avg.") :]: v for k, v in trainer.adam_state().items() if k.startswith("exp_avg.")
    }
    return grads, r, trainer.hidden_state()


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_k_micro_batches_equal_one_batch(backend):
    tol = TOLERANCES["float64"]
    one, r1, h1 = _gradient(backend, 1)
    acc, rk, hk = _gradient(backend, K)
    worst = {n: errors(one[n], acc[n])[1] for n in one}
    assert max(worst.values()) <= tol["grad"].rel, (
        f"{backend}: accumulated vs whole-batch gradient {worst} ({tol['grad'].reason})"
    )
    assert (
        errors(r1.loss, rk.loss)[1] <= tol["loss"].rel
        and errors(r1.grad_norm, rk.grad_norm)[1] <= tol["norm"].rel
    )
    for part in h1:  # every stream carries its own state on, whichever micro-batch it was in
        assert errors(h1[part], hk[part])[1] <= tol["forward"].rel, part


def test_accumulation_agrees_across_backends():
    tol = TOLERANCES["float64"]
    clip = ClipConfig(
        mode="norm", max_norm=1e-3, impl="reference"
    )  # far below the norm: clipping acts
    (gt, rt, _), (gj, rj, _) = _gradient("torch", K, clip), _gradient("jax", K, clip)
    assert rt.clipped and rj.clipped
    worst = max(errors(gt[n], gj[n])[1] for n in gt)
    assert worst <= tol["clipped"].rel, f"torch vs jax, accumulated and clipped: {worst:.2e}"


def test_clipping_each_micro_batch_instead_bends_the_gradient():
    """The common mistake: clip_grad_norm_ after every micro-batch's backward, not once after the last.

    Clipping the accumulated gradient keeps the whole batch's direction (cosine 1 to rounding);
    clipping each micro-batch adds K differently scaled pieces, whose sum points elsewhere.
    """
    tau = 1e-3
    whole, _, _ = _gradient("torch", 1)
    right, _, _ = _gradient("torch", K, ClipConfig(mode="norm", max_norm=tau, impl="reference"))

    cfg = TrainConfig(batch_size=B, seq_len=T, dtype="float64", accumulate=K)
    trainer = backends.trainer_factory("torch")(
        MODEL, cfg, init_params(MODEL, 0, "float64"), hidden=_hidden()
    )
    from charclip.torch import model as M
    from charclip.torch.train import _micro_batches

    x, y = _batch()
    acc = {n: torch.zeros_like(p) for n, p in trainer.module.named_parameters()}
    for xk, yk, hk, _ in _micro_batches(
        x, y, tuple(torch.from_numpy(_hidden()[k]) for k in ("h", "c")), K
    ):
        trainer.optimizer.zero_grad()
        loss, _ = M.loss(trainer.model, xk, yk, hk)
        (loss / K).backward()
        torch.nn.utils.clip_grad_norm_(
            trainer.module.parameters(), tau
        )  # the mistake: inside the loop
        for n, p in trainer.module.named_parameters():
            acc[n] += p.grad
    wrong = {n: t.numpy() for n, t in acc.items()}

    def flat(g):
        return np.concatenate([g[n].ravel() for n in sorted(g)])

    def cosine(a, b):
        return float(flat(a) @ flat(b) / (np.linalg.norm(flat(a)) * np.linalg.norm(flat(b))))

    # beta1 = 0 makes Adam's moment (1 - beta1) * g = g, so `right` is the clipped gradient itself.
    assert 1 - cosine(right, whole) <= 1e-12, (
        "clipping the accumulated gradient keeps its direction"
    )
    assert 1 - cosine(wrong, whole) > 1e-4, (
        f"per-micro-batch clipping should bend it: cosine {cosine(wrong, whole)}"
    )
    assert np.linalg.norm(flat(right)) == pytest.approx(tau, rel=1e-12)


def _multisteps_params(params, accumulator_dtype):
    """K micro-batch gradients fed to optax.MultiSteps(chain(clip, adam), K), one call each."""
    import jax
    import jax.numpy as jnp
    import optax

    from charclip.jax import train as JT

    tx = optax.MultiSteps(
        optax.chain(optax.clip_by_global_norm(1e-3), optax.adam(TrainConfig().lr)),
        every_k_schedule=K,
        accumulator_dtype=accumulator_dtype,
    )

    # One optax call per micro-batch, jitted: the K calls share one compiled program (op by op,
    # every primitive is its own compile, which made this test take 20 s).
    @jax.jit
    def call(p, state, x, y, s):
        (_, _), g = jax.value_and_grad(JT.M.loss, has_aux=True)(p, x, y, s, cfg=MODEL)
        updates, state = JT.optax_update(tx, g, state, p)
        return optax.apply_updates(p, updates), state

    p = {k: jnp.asarray(v) for k, v in params.items()}
    state, hidden, (x, y), b = tx.init(p), _hidden(), _batch(), B // K
    for i in range(K):
        rows = slice(i * b, (i + 1) * b)
        s = tuple(jnp.asarray(hidden[k][:, rows]) for k in ("h", "c"))
        p, state = call(p, state, x[rows], y[rows], s)
    return {k: np.asarray(v) for k, v in p.items()}


def test_in_step_accumulation_matches_optax_multisteps():
    """JAX accumulates inside the jitted step; optax.MultiSteps over K calls gives the same update,
    once its accumulator is float64: by default it keeps the running mean in float32 (a finding,
    docs/divergences.md), which moves float64 parameters by far more than float64 rounding."""
    import jax.numpy as jnp

    cfg = TrainConfig(
        batch_size=B, seq_len=T, dtype="float64", accumulate=K, clip=ClipConfig(max_norm=1e-3)
    )
    params = init_params(MODEL, 0, "float64")
    ours = backends.trainer_factory("jax")(MODEL, cfg, params, hidden=_hidden())
    ours.step(*_batch())
    got = ours.params_numpy()
    wide = _multisteps_params(params, jnp.float64)
    worst = max(errors(got[k], wide[k])[1] for k in got)
    # Welford's running mean against a sum of g_k / K: the same to float64 rounding.
    assert worst <= TOLERANCES["float64"]["adam"].rel, (
        f"in-step accumulation vs MultiSteps(float64): {worst:.2e}"
    )
    narrow = _multisteps_params(params, jnp.float32)
    off = max(errors(got[k], narrow[k])[1] for k in got)
    # float32's unit roundoff (6e-8) in the mean gradient, times lr over |p|: above float64 rounding, below float32's.
    assert TOLERANCES["float64"]["adam"].rel < off < 6e-8, (
        f"MultiSteps' default float32 accumulator: {off:.2e}"
    )


def test_accumulate_must_divide_the_batch():
    with pytest.raises(CharclipError, match="does not split into --accumulate 3"):
        TrainConfig(batch_size=8, accumulate=3)


# ---- schedules ---------------------------------------------------------------------------------


def test_cosine_schedule_has_nanogpts_shape():
    cfg = TrainConfig(
        steps=100, lr=1.0, schedule="cosine", warmup_steps=10, min_lr=0.1, decay_steps=90
    )
    lrs = [schedules.learning_rate(cfg, s) for s in range(100)]
    assert lrs[0] == 1.0 / 11 and lrs[9] == 10 / 11, "linear warmup, never zero"
    assert lrs[10] == 1.0 and lrs[50] == pytest.approx(0.55, abs=1e-15), (
        "the half cosine's top and middle"
    )
    assert lrs[90:] == [0.1] * 10, "flat at min_lr after decay_steps"
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])), "non-increasing after the warmup"


def test_step_schedule_has_char_rnns_shape():
    cfg = TrainConfig(lr=2e-3, schedule="step", decay_every=10, decay_factor=0.97)
    assert [schedules.learning_rate(cfg, s) for s in (0, 9, 10, 25)] == [
        2e-3,
        2e-3,
        2e-3 * 0.97,
        2e-3 * 0.97**2,
    ]


def test_constant_schedule_is_the_configured_rate():
    assert schedules.learning_rate(TrainConfig(lr=0.25), 12345) == 0.25


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(schedule="linear"), "unknown --schedule"),
        (dict(min_lr=1.0), "--min-lr"),
        (dict(decay_factor=0.0), "--decay-factor"),
        (dict(warmup_steps=-1), "--warmup-steps"),
    ],
)
def test_bad_schedules_are_refused(kwargs, message):
    with pytest.raises(CharclipError, match=message):
        TrainConfig(**kwargs)


def _applied_lr(backend, trainer) -> float:
    if backend == "torch":
        return trainer.optimizer.param_groups[0]["lr"]
    state = (
        next(s for s in trainer.opt_state if hasattr(s, "hyperparams"))
        if isinstance(trainer.opt_state, tuple)
        else trainer.opt_state
    )
    return float(state.hyperparams["learning_rate"])


def test_both_backends_apply_the_same_rate_at_every_step(tmp_path):
    """Through the real loop: the metrics' lr column, and the rate each optimizer last used, per step."""
    path = small_corpus(tmp_path, 8000)
    cfg = TrainConfig(
        steps=6,
        batch_size=4,
        seq_len=8,
        dtype="float64",
        eval_every=6,
        eval_batches=1,
        checkpoint_every=6,
        schedule="cosine",
        warmup_steps=2,
        min_lr=1e-4,
        lr=1e-2,
    )
    model = ModelConfig(vocab_size=1, cell="gru", hidden_size=5, num_layers=1, embedding_dim=3)
    seen = {}
    for backend in ("torch", "jax"):
        factory = backends.trainer_factory(backend)
        rates = []

        def make(*a, factory=factory, rates=rates, backend=backend, **kw):
            t = factory(*a, **kw)
            step = t.step

            def recorded(x, y, lr=None, **kw):
                r = step(x, y, lr=lr, **kw)
                rates.append(_applied_lr(backend, t))
                return r

            t.step = recorded
            return t

        run.train(
            model,
            cfg,
            backend=backend,
            out_dir=tmp_path / backend,
            data_path=str(path),
            progress=False,
            sample_chars=0,
            log=lambda *_: None,
            make_trainer=make,
        )
        logged = [
            r["lr"] for r in run.read_metrics(tmp_path / backend / "metrics.jsonl") if "lr" in r
        ]
        expected = [schedules.learning_rate(replace(cfg, decay_steps=6), s) for s in range(6)]
        assert logged == expected, f"{backend}: metrics {logged} vs schedule {expected}"
        # torch keeps the Python float; JAX holds it as a float64 array: the same number either way.
        assert rates == expected, f"{backend}: applied {rates}"
        seen[backend] = checkpoint.load(tmp_path / backend).params
    worst = max(errors(seen["torch"][k], seen["jax"][k])[1] for k in seen["torch"])
    assert worst <= TOLERANCES["float64"]["trajectory"].rel, (
        f"torch vs jax under a schedule: {worst:.2e}"
    )


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_resume_continues_the_schedule_bit_for_bit(tmp_path, backend):
    path = small_corpus(tmp_path, 8000)
    model = ModelConfig(vocab_size=1, cell="lstm", hidden_size=5, num_layers=1, embedding_dim=3)
    cfg = TrainConfig(
        steps=8,
        batch_size=4,
        seq_len=8,
        dtype="float64",
        eval_every=4,
        eval_batches=1,
        checkpoint_every=4,
        schedule="cosine",
        warmup_steps=3,
        lr=1e-2,
        accumulate=2,
    )
    kw = dict(
        backend=backend, data_path=str(path), progress=False, sample_chars=0, log=lambda *_: None
    )
    run.train(model, cfg, out_dir=tmp_path / "straight", **kw)
    straight = checkpoint.load(tmp_path / "straight")
    assert straight.train.decay_steps == 8, "the cosine's horizon is fixed when the run starts"
    # Stopped at step 4 of a run planned for 8 (its horizon), then resumed to 8.
    half = replace(cfg, steps=4, decay_steps=8)
    run.train(model, half, out_dir=tmp_path / "resumed", **kw)
    run.train(
        None,
        replace(half, steps=8),
        out_dir=tmp_path / "resumed",
        resume=str(tmp_path / "resumed"),
        **kw,
    )
    resumed = checkpoint.load(tmp_path / "resumed")
    for k in straight.params:
        np.testing.assert_array_equal(
            resumed.params[k], straight.params[k], err_msg=f"{backend} {k}"
        )
    assert math.isclose(
        schedules.learning_rate(resumed.train, 7), schedules.learning_rate(straight.train, 7)
    )


def test_accumulation_over_processes_must_split_evenly():
    """Each of N ranks takes batch/N streams, cut into K micro-batches: batch must be a multiple of N*K."""
    from charclip.torch.distributed import launch_training

    with pytest.raises(CharclipError, match="use a multiple of 4"):
        launch_training(
            run.train,
            MODEL,
            TrainConfig(batch_size=6, accumulate=2),
            world=2,
            layout="ddp",
            out_dir="unused",
        )
