"""Dropout (char-rnn's placement): the masks, their placement, and the same steps in both backends.

`charclip.dropout` draws one mask per layer in NumPy; both trainers multiply each layer's output
by it. In float64 a few steps with p = 0.3 agree across backends to the parity ladder's float64
trajectory bound (dropout multiplies by the same arrays on both sides, so it adds no rounding of
its own); masks of ones give the no-dropout step; evaluation and sampling never drop.
"""

from __future__ import annotations

import functools
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from charclip import backends, dropout
from charclip.config import ClipConfig, ModelConfig, TrainConfig
from charclip.errors import CharclipError
from charclip.parity import TOLERANCES, errors
from charclip.weights import init_params

B, T, P = 4, 5, 0.3


def _model(cell="lstm", layers=2):
    return ModelConfig(vocab_size=11, cell=cell, hidden_size=6, num_layers=layers, embedding_dim=4)


def _cfg(**kw):
    # clipping far below the norm, reference convention on both sides: every step clips, no library gap
    return TrainConfig(
        batch_size=B,
        seq_len=T,
        dtype="float64",
        dropout=P,
        lr=1e-2,
        clip=ClipConfig(max_norm=0.05, impl="reference"),
        **kw,
    )


def _batches(n, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 11, (B, T)), rng.integers(0, 11, (B, T))) for _ in range(n)]


def _train(backend, model, cfg, steps=3, masks_of=None):
    """`steps` updates as charclip.run takes them (masks of update i from dropout.masks), or with `masks_of(i)`."""
    trainer = backends.trainer_factory(backend)(model, cfg, init_params(model, 0, cfg.dtype))
    results = []
    for i, (x, y) in enumerate(_batches(steps)):
        masks = dropout.masks(model, cfg, i, B, T) if masks_of is None else masks_of(i)
        results.append(trainer.step(x, y, masks=masks))
    return trainer, results


# ---- the masks ----------------------------------------------------------------------------


def test_masks_are_inverted_bernoulli_with_the_right_rate():
    model = _model(layers=3)
    cfg = TrainConfig(batch_size=64, seq_len=64, dropout=P)
    masks = dropout.masks(model, cfg, 0, 64, 64)
    assert len(masks) == 3 and all(m.shape == (64, 64, 6) and m.dtype == np.float32 for m in masks)
    scale = np.float32(1 / (1 - P))
    for m in masks:
        assert set(np.unique(m)) <= {np.float32(0), scale}, np.unique(m)
    every = np.stack(masks)
    n = every.size
    # Zeros ~ Binomial(n, p): their share has standard deviation sqrt(p (1 - p) / n) (0.0034 here);
    # 6 of them bound a correct draw (a false alarm has odds ~1e-9), and a wrong rate (p = 0.25, or
    # keep-probability p) is off by 15 or more.
    sigma = math.sqrt(P * (1 - P) / n)
    share = float(np.mean(every == 0))
    assert abs(share - P) <= 6 * sigma, (
        f"share of zeros {share:.4f}, expected {P} +- {6 * sigma:.4f}"
    )
    # The mean is (1 - share) / (1 - p): about 1 (inverted dropout keeps the expected activation),
    # within the same 6 sigma scaled by 1 / (1 - p).
    mean = float(np.mean(every, dtype=np.float64))
    assert abs(mean - 1) <= 6 * sigma / (1 - P), f"mean of the masks {mean:.4f}, expected 1"
    # The layers and the positions are drawn independently: no two layers share a mask.
    assert not np.array_equal(masks[0], masks[1])


def test_masks_are_a_function_of_seed_and_step():
    model, cfg = _model(), _cfg()
    first = dropout.masks(model, cfg, 7, B, T)
    again = dropout.masks(model, cfg, 7, B, T)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(
            a, b, err_msg="the same (seed, step) must give the same masks (resume)"
        )
    for other in (
        dropout.masks(model, cfg, 8, B, T),
        dropout.masks(model, replace(cfg, seed=1), 7, B, T),
    ):
        assert not any(np.array_equal(a, b) for a, b in zip(first, other)), (
            "another step or seed: other masks"
        )
    # float32 and float64 runs drop the same units (the uniforms are float32 in both)
    single = dropout.masks(model, replace(cfg, dtype="float32"), 7, B, T)
    for a, b in zip(first, single):
        np.testing.assert_array_equal(a == 0, b == 0)
        assert b.dtype == np.float32 and a.dtype == np.float64


def test_no_dropout_draws_no_masks():
    assert dropout.masks(_model(), replace(_cfg(), dropout=0.0), 0, B, T) is None


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5, math.nan, True, "0.2"])
def test_dropout_outside_zero_to_one_is_refused(p):
    with pytest.raises(CharclipError, match=r"--dropout must lie in \[0, 1\)"):
        TrainConfig(dropout=p)


# ---- placement and the layer-by-layer path ------------------------------------------------


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_torch_layer_by_layer_with_ones_equals_the_one_multi_layer_call(cell):
    """With masks, torch runs layer k alone (same weights); masks of ones must give nn.LSTM's own
    result. Measured bit-identical on the CPU (ATen loops over the layers with the same kernel), so
    exactly equal is asserted: any difference means the layers are wired differently."""
    from charclip.torch import model as M

    cfg = _model(cell, layers=3)
    module = M.build(cfg, init_params(cfg, 0, "float64"))
    x = torch.from_numpy(_batches(1)[0][0])
    ones = tuple(
        torch.ones(B, T, cfg.hidden_size, dtype=torch.float64) for _ in range(cfg.num_layers)
    )
    outs = []
    for masks in (None, ones):
        module.zero_grad()
        logits, final = module(x, None, masks)
        (
            logits.square().mean()
            + sum(f.sum() for f in (final if isinstance(final, tuple) else (final,)))
        ).backward()
        outs.append(
            (logits.detach(), final, {n: p.grad.clone() for n, p in module.named_parameters()})
        )
    (l0, f0, g0), (l1, f1, g1) = outs
    torch.testing.assert_close(l1, l0, rtol=0, atol=0)
    torch.testing.assert_close(f1, f0, rtol=0, atol=0)
    for name in g0:
        torch.testing.assert_close(
            g1[name], g0[name], rtol=0, atol=0, msg=lambda m, n=name: f"grad {n}: {m}"
        )


def _gradients_and_carried(backend, model, params, x, y, masks):
    """d(loss)/d(params) and the final state of one forward pass from zeros, through the model itself."""
    if backend == "torch":
        from charclip.torch import model as M

        module = M.build(model, params)
        loss, final = M.loss(module, x, y, None, masks)
        loss.backward()
        return {n: p.grad.numpy() for n, p in module.named_parameters()}, M.hidden_to_numpy(final)
    from charclip.jax import model as M

    (_, final), grads = _jax_grad(model)(
        M.init(model, 0, "float64"), x, y, M.zero_state(model, B, np.float64), masks
    )
    return {k: np.asarray(v) for k, v in grads.items()}, M.hidden_to_numpy(final)


@functools.lru_cache
def _jax_grad(model):
    """The gradient of the fast layer's loss (the JAX Trainer's default), jitted once: the masks are traced."""
    import jax

    from charclip.jax import model as M

    return jax.jit(
        jax.value_and_grad(
            lambda p, x, y, s, m: M.loss(p, x, y, s, cfg=model, layer="fast", masks=m), has_aux=True
        )
    )


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_each_mask_sits_on_its_layers_output_and_the_carried_state_is_not_dropped(backend):
    """Zeros in mask 0 cut layer 0 from layer 1 (no gradient reaches W_ih1, nor anything below it);
    zeros in the last mask cut the last layer from the head (only the head's bias learns). A layer's
    carried state is never dropped: layer 0 carries what it carries without dropout (layer 1 does not,
    its input was dropped), and a mask on the last layer changes no carried state at all."""
    model = _model()
    x, y = _batches(1)[0]
    params = init_params(model, 0, "float64")
    ones, zeros = np.ones((B, T, model.hidden_size)), np.zeros((B, T, model.hidden_size))
    _, carried = _gradients_and_carried(backend, model, params, x, y, (ones, ones))
    first, first_h = _gradients_and_carried(backend, model, params, x, y, (zeros, ones))
    for name in ("embedding.weight", "rnn.weight_ih_l0", "rnn.weight_ih_l1"):
        np.testing.assert_array_equal(
            first[name], 0, err_msg=f"{backend}: {name} behind a mask of zeros"
        )
    assert np.abs(first["rnn.bias_ih_l1"]).max() > 0 and np.abs(first["head.weight"]).max() > 0, (
        backend
    )
    last, last_h = _gradients_and_carried(backend, model, params, x, y, (ones, zeros))
    np.testing.assert_array_equal(
        last["head.weight"], 0, err_msg=f"{backend}: the head saw the dropped layer"
    )
    np.testing.assert_array_equal(
        last["rnn.weight_ih_l1"], 0, err_msg=f"{backend}: gradient through a dropped head"
    )
    assert np.abs(last["head.bias"]).max() > 0, backend
    for part in carried:
        np.testing.assert_array_equal(
            first_h[part][0], carried[part][0], err_msg=f"{backend}: layer 0's {part}"
        )
        assert np.abs(first_h[part][1] - carried[part][1]).max() > 1e-3, (
            f"{backend}: layer 1 saw its input dropped"
        )
        np.testing.assert_array_equal(
            last_h[part], carried[part], err_msg=f"{backend}: carried {part} was dropped"
        )


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_masks_of_ones_give_the_step_without_dropout_and_evaluation_never_drops(backend):
    """Multiplying by 1.0 is exact, and both paths run the same arithmetic otherwise: measured
    bit-identical in both backends, so equality is asserted, for parameters, Adam and the carried
    state. The trainer configured with p = 0.3 then evaluates exactly as the p = 0 one holding the
    same parameters: evaluation takes no masks and ignores the configured rate."""
    model = _model()
    ones = tuple(np.ones((B, T, model.hidden_size)) for _ in range(model.num_layers))
    plain, r_plain = _train(backend, model, replace(_cfg(), dropout=0.0))
    masked, r_masked = _train(backend, model, _cfg(), masks_of=lambda i: ones)
    assert [r.loss for r in r_masked] == [r.loss for r in r_plain]
    for got, want, what in (
        (masked.params_numpy(), plain.params_numpy(), "params"),
        (masked.adam_state(), plain.adam_state(), "adam"),
        (masked.hidden_state(), plain.hidden_state(), "hidden"),
    ):
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{backend} {what} {k}")
    val = _batches(2, seed=5)
    assert masked.evaluate(val) == plain.evaluate(val)


# ---- across backends ----------------------------------------------------------------------


@pytest.mark.parametrize("cell,accumulate", [("rnn", 1), ("gru", 1), ("lstm", 2)])
def test_steps_with_dropout_agree_across_backends_in_float64(cell, accumulate):
    """Three clipped Adam steps with p = 0.3. The bound is the ladder's float64 trajectory bound
    (rounding fed back through Adam steps): dropout multiplies both sides by the same NumPy masks,
    exact zeros and one identically rounded 1/(1-p), so it adds no rounding of its own. With
    accumulate 2 (the LSTM) the masks' rows are cut with the batch's."""
    tol = TOLERANCES["float64"]["trajectory"]
    model, cfg = _model(cell), _cfg(accumulate=accumulate)
    (t, rt), (j, rj) = _train("torch", model, cfg), _train("jax", model, cfg)
    assert all(r.clipped for r in rt + rj)
    for a, b in zip(rt, rj):
        assert errors(a.loss, b.loss)[1] <= tol.rel, f"loss {a.loss} vs {b.loss} ({tol.reason})"
    pt, pj = t.params_numpy(), j.params_numpy()
    worst = {k: errors(pt[k], pj[k])[1] for k in pt}
    assert max(worst.values()) <= tol.rel, f"torch vs jax with dropout: {worst} ({tol.reason})"
    # ... and dropout acted: the same run without it ends far from there (not a vacuous agreement)
    plain, _ = _train("torch", model, replace(cfg, dropout=0.0))
    moved = max(errors(plain.params_numpy()[k], pt[k])[1] for k in pt)
    assert moved > 1e3 * tol.rel, f"dropout changed the parameters by only {moved:.1e}"


def test_the_parity_ladders_trajectory_runs_with_dropout():
    from charclip.parity import ladder

    model, cfg = _model("gru"), _cfg()
    batches = [(x, y, i == 0) for i, (x, y) in enumerate(_batches(3))]
    tr, finals = ladder.trajectory(model, cfg, init_params(model, 0, "float64"), batches)
    rows = ladder.trajectory_rows(tr, cfg)
    assert rows[0].quantity.startswith("params over 3 steps, dropout 0.3") and all(
        r.ok for r in rows[:2]
    ), rows
    # the ladder hands both sides the masks charclip.run draws: its torch side is _train's run, bit for bit
    trained, _ = _train("torch", model, cfg)
    for k, v in trained.params_numpy().items():
        np.testing.assert_array_equal(finals["torch"][k], v, err_msg=k)
