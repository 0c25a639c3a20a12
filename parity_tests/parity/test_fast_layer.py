"""charclip.jax.fastrnn's hand-written backward pass equals autodiff of the `lax.scan` reference.

The fast layer and the reference compute the same function; only the order of the
sums differs (the weight gradients as one sum over T*B rows instead of T per-step
sums; layer 0 through a lookup table). So in float64 they agree to rounding, and
any mistake in a derivative (a wrong gate, a missing term, the final state's
cotangent dropped) is an O(1) relative difference.

Tolerance, float64: 1e-12 times each gradient's largest entry (at least 1). Rounding is
~1e-16 per operation; the shapes here keep dot lengths <= 18 and T <= 6, but the
recurrence multiplies errors by up to ||W_hh||^T (spectral radius drawn up to 3,
3^6 ~ 700). float32 is checked against torch by the parity ladder (the fast layer
is the JAX Trainer's default).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from charclip.config import ModelConfig, TrainConfig
from charclip.jax import fastrnn
from charclip.jax import model as M
from charclip.jax import train as T
from charclip.weights import init_params, scale_spectral_radius

F64_REL = 1e-12  # see the module docstring


def _setup(cell, layers, hidden, embed, vocab, batch, seq, seed, dtype="float64", rho=None):
    cfg = ModelConfig(
        vocab_size=vocab, cell=cell, hidden_size=hidden, num_layers=layers, embedding_dim=embed
    )
    params = init_params(cfg, seed, dtype)
    if rho is not None and cell == "rnn":  # only the vanilla RNN's W_hh is square
        for k in range(layers):
            params[f"rnn.weight_hh_l{k}"] = scale_spectral_radius(
                params[f"rnn.weight_hh_l{k}"], rho
            )
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.integers(0, vocab, (batch, seq)))
    y = jnp.asarray(rng.integers(0, vocab, (batch, seq)))
    state = tuple(
        jnp.asarray(rng.normal(size=(layers, batch, hidden)).astype(dtype))
        for _ in M.zero_state(cfg, batch, dtype)
    )
    return cfg, {k: jnp.asarray(v) for k, v in params.items()}, x, y, state


def _value_and_grads(cfg, params, x, y, state, layer, masks=None):
    """Loss plus a term of the final state (so its cotangent is non-zero), and d/d(params, state)."""

    def objective(p, s):
        loss, final = M.loss(p, x, y, s, cfg=cfg, layer=layer, masks=masks)
        return loss + sum(jnp.sum(jnp.sin(part)) for part in final)

    return jax.value_and_grad(objective, argnums=(0, 1))(params, state)


def _assert_same(ref, got, rel, what):
    (v_ref, (gp_ref, gs_ref)), (v_got, (gp_got, gs_got)) = ref, got
    np.testing.assert_allclose(v_got, v_ref, rtol=rel, err_msg=f"{what}: objective")
    named = [(f"grad {k}", gp_ref[k], gp_got[k]) for k in gp_ref]
    named += [
        (f"grad initial state part {i}", a, b) for i, (a, b) in enumerate(zip(gs_ref, gs_got))
    ]
    for name, a, b in named:
        a, b = np.asarray(a), np.asarray(b)
        # A gradient can cancel to near zero (a bias gradient is a sum of p - onehot terms):
        # its rounding is that of its O(1) terms, so the scale is never below 1.
        scale = max(np.max(np.abs(a)), 1.0)
        np.testing.assert_allclose(
            b, a, rtol=0, atol=rel * scale, err_msg=f"{what}: {name} (scale {scale:.3g})"
        )


# Shape buckets (layers, hidden, embed, vocab, batch, seq): the degenerate sizes, and one
# with every path (layer 0's table, a projected layer 1, several steps). Few distinct
# shapes, so the jitted check compiles 3 cells x 2 buckets times, and draws are cheap.
BUCKETS = [(1, 1, 1, 2, 1, 1), (2, 4, 3, 5, 3, 6)]


@functools.partial(jax.jit, static_argnums=0)
def _every_layer(cfg, params, x, y, state, masks=None):
    return {layer: _value_and_grads(cfg, params, x, y, state, layer, masks) for layer in M.LAYERS}


@given(
    cell=st.sampled_from(["rnn", "lstm", "gru"]),
    bucket=st.sampled_from(BUCKETS),
    seed=st.integers(0, 2**32 - 1),
    rho=st.sampled_from([None, 0.5, 3.0]),
)
def test_fast_gradients_equal_autodiff_of_the_scan_in_float64(cell, bucket, seed, rho):
    cfg, params, x, y, state = _setup(cell, *bucket, seed, rho=rho)
    out = _every_layer(cfg, params, x, y, state)
    for layer in ("fast", "fast-no-table"):
        _assert_same(out["scan"], out[layer], F64_REL, layer)


def test_trainers_with_either_layer_take_the_same_steps_and_evaluate_alike():
    """Three steps with the hidden state carried between batches (truncated BPTT), then evaluate."""
    cfg, params, _, _, _ = _setup("lstm", 2, 8, 4, 7, 3, 5, seed=1)  # the LSTM carries both h and c
    params = {k: np.asarray(v) for k, v in params.items()}
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 7, (3, 5)), rng.integers(0, 7, (3, 5))) for _ in range(4)]
    train = TrainConfig(batch_size=3, seq_len=5, lr=1e-2, dtype="float64")
    fast, scan = T.Trainer(cfg, train, params), T.Trainer(cfg, train, params, layer="scan")
    assert fast.layer == "fast"  # the training default
    for x, y in batches[:3]:
        r_fast, r_scan = fast.step(x, y), scan.step(x, y)
        np.testing.assert_allclose(r_fast.loss, r_scan.loss, rtol=F64_REL)
        np.testing.assert_allclose(r_fast.grad_norm, r_scan.grad_norm, rtol=F64_REL)
    # Adam divides by sqrt(v): parameters agree to the gradients' rounding times lr-sized steps.
    for k, v in scan.params_numpy().items():
        np.testing.assert_allclose(fast.params_numpy()[k], v, rtol=0, atol=1e-13, err_msg=k)
    for part, v in scan.hidden_state().items():
        np.testing.assert_allclose(
            fast.hidden_state()[part], v, rtol=0, atol=1e-13, err_msg=f"carried {part}"
        )
    np.testing.assert_allclose(fast.evaluate(batches), scan.evaluate(batches), rtol=F64_REL)


def test_an_unknown_layer_is_a_clear_error():
    cfg, params, x, _, state = _setup("rnn", 1, 2, 2, 3, 1, 2, seed=0)
    with pytest.raises(
        ValueError, match="unknown layer 'cudnn'; choose one of scan, fast, fast-no-table"
    ):
        M.apply(params, x, state, cfg=cfg, layer="cudnn")
    with pytest.raises(ValueError, match="unknown layer"):
        T.make_train_step(cfg, TrainConfig(), T.optimizer(TrainConfig()), layer="cudnn")


# Entry-wise bounds on the float32 gradients where gates saturate, relative to float64 (an entry
# is a sum of products of up to 3 steps' derivatives). rnn: every tanh' is taken from the
# pre-activation (fastrnn.tanh_grad, a few ulp, 1.2e-7 each), the rounding of a itself (ulp(6)/2)
# moves tanh' by ~5e-7, and mixed-sign sums of 8 terms can lose a digit more: 2e-5 (4.3e-6
# measured; float32 autodiff of the reference: 1.2e-2). lstm, gru: sigmoid' = s (1 - s) is
# torch's form and cancels as torch's does where s nears 1 (3.4e-5 over |a| in [3, 6],
# `python -m benchmarks.derivatives`), times the same loss in the sums: 1e-3 (2.3e-4 measured).
SATURATED_REL = {"rnn": 2e-5, "lstm": 1e-3, "gru": 1e-3}


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_saturated_gates_are_accurate_element_by_element_in_float32(cell):
    """Where the gates saturate (|tanh| from 0.995 to 0.99999) derivatives written from the rounded
    activation, 1 - h^2, lose most of their digits; the Hypothesis check above scales errors by each
    gradient's largest entry and cannot see those small entries. Here every entry of the fast
    layer's float32 gradients must agree with float64 autodiff of the reference cell (the exact
    values, to float64 rounding) within SATURATED_REL; for the vanilla RNN, where only tanh acts,
    float32 autodiff of the same reference must miss that bound, or the check would prove
    nothing."""
    gates, hidden = {"rnn": 1, "lstm": 4, "gru": 3}[cell] * 4, 4
    rng = np.random.default_rng(0)
    # |tanh| from 0.995 to 0.99999
    xw = rng.choice([-1, 1], (3, 8, gates)) * rng.uniform(3, 6, (3, 8, gates))
    state = tuple(rng.uniform(-1, 1, (8, hidden)) for _ in range(2 if cell == "lstm" else 1))
    w_hh, b_hh = rng.uniform(-0.1, 0.1, (gates, hidden)), np.zeros((gates,))
    args32 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), (xw, state, w_hh, b_hh))
    args64 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), args32)  # the same, widened

    def reference(xw, state, w_hh, b_hh):  # autodiff of the scan reference's cell
        def step(s, xw_t):
            s = M._cell(cell, xw_t, s, w_hh, b_hh)
            return s, s[0]

        final, hs = jax.lax.scan(step, state, xw)
        return jnp.sum(hs) + jnp.sum(final[-1])

    def fast(xw, state, w_hh, b_hh):
        hs, final = fastrnn.layer(cell, xw, state, w_hh, b_hh, 1)
        return jnp.sum(hs) + jnp.sum(final[-1])

    def grads(fn, args):
        return jax.tree_util.tree_leaves(jax.jit(jax.grad(fn, argnums=(0, 1, 2, 3)))(*args))

    def worst(fn, args):
        return max(
            np.max(np.abs(np.asarray(g, np.float64) - e) / np.abs(e))
            for g, e in zip(grads(fn, args), exact)
        )

    exact = [np.asarray(g) for g in grads(reference, args64)]
    err = worst(fast, args32)
    assert err <= SATURATED_REL[cell], f"{cell}: fast layer's worst entry-wise error {err:.2e}"
    if cell == "rnn":
        ref_err = worst(reference, args32)
        assert ref_err > SATURATED_REL[cell], f"float32 autodiff is as good ({ref_err:.2e})"


def test_fast_gradients_with_dropout_masks_equal_autodiff_of_the_scan():
    """Dropout masks multiply each layer's output outside the custom-VJP layer, so the cotangent the
    layer's backward receives is the masked one. Checked like the test above, float64, with masks of
    zeros and 1/(1-p) (p = 0.5) on both layers of the bucket that has every path. One cell: what the
    masks add is cell-independent (the cells' backward of any cotangent is the test above; every cell
    with masks is compared with torch in test_dropout.py)."""
    cfg, params, x, y, state = _setup("lstm", *BUCKETS[1], seed=3)
    rng = np.random.default_rng(4)
    masks = tuple(
        jnp.asarray((rng.random((x.shape[0], x.shape[1], cfg.hidden_size)) >= 0.5) * 2.0)
        for _ in range(cfg.num_layers)
    )

    out = _every_layer(cfg, params, x, y, state, masks)
    for layer in ("fast", "fast-no-table"):
        _assert_same(out["scan"], out[layer], F64_REL, f"{layer} with masks")
    unmasked = _every_layer(cfg, params, x, y, state)["scan"]
    assert abs(float(unmasked[0]) - float(out["scan"][0])) > 1e-3, "the masks changed nothing"
