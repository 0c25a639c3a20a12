"""The clipping family (AGC, block RMS, per-example) in both backends, and against optax.

torch == JAX in float64 on the same gradients (torch's (out, in, *kernel) weights mapped
to optax's (*kernel, in, out) kernels); the JAX drop-ins == optax's own, bit for bit,
where optax works; and where it does not (a rank-6 kernel, optax#906's family of
failures; a zero leaf at threshold 0; negative thresholds), what optax does and ours does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from charclip.jax import clip_family as cj
from charclip.torch import clip_family as ct

F64_EPS = 2.0**-52


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def to_optax_layout(a: np.ndarray) -> np.ndarray:
    """torch's (out, in, *kernel) as optax/Flax's (*kernel, in, out); vectors unchanged."""
    if a.ndim < 2:
        return a
    return np.transpose(a, tuple(range(2, a.ndim)) + (1, 0))


def _agree(got: np.ndarray, want: np.ndarray, terms: int, what: str) -> None:
    # Each entry is g * (m / n) with n a sum of `terms` squares in another order on each side
    # (<= terms u relative, halved by the sqrt), then a max, a divide and a multiply (u each):
    # (terms + 4) eps bounds the relative difference with room to spare.
    rtol = (terms + 4) * F64_EPS
    diff = np.abs(got - want)
    bad = diff > rtol * np.abs(want)
    assert not bad.any(), (
        f"{what}: max relative difference {np.max(diff / np.maximum(np.abs(want), 1e-300)):.3g} "
        f"> {rtol:.3g} at {np.argwhere(bad)[:3].tolist()}"
    )


# torch shapes (out, in, *kernel): bias, scalar, Linear, (1, n) and (n, 1), Conv1d/2d/3d, rank 6
TORCH_SHAPES = [
    (),
    (5,),
    (6, 4),
    (1, 7),
    (7, 1),
    (4, 3, 5),
    (4, 3, 3, 3),
    (3, 2, 2, 3, 2),
    (2, 3, 2, 2, 2, 2),
]


def _draw(shape, seed):
    rng = np.random.default_rng(seed)
    p = rng.normal(size=shape)
    # Units from far below to far above clipping * ||w_u||, so both branches run.
    if sum(d != 1 for d in shape) <= 1:  # one unit: make it clip
        return p, rng.normal(size=shape) * 10.0
    unit_scale = 10.0 ** rng.integers(-3, 2, size=shape[:1] + (1,) * (len(shape) - 1))
    return p, rng.normal(size=shape) * unit_scale


def test_agc_torch_equals_jax_across_layouts():
    """Every TORCH_SHAPES weight at once: torch in place on (out, in, *kernel), JAX on the
    optax-layout kernels (one jitted update for the whole tree)."""
    drawn = [_draw(shape, i) for i, shape in enumerate(TORCH_SHAPES)]
    params = []
    for p, g in drawn:
        params.append(torch.nn.Parameter(torch.tensor(p)))
        params[-1].grad = torch.tensor(g)
    ct.adaptive_grad_clip_(params, 0.05, eps=1e-3)
    # optax reads a rank-3 kernel as multi-head (in, heads, dim); a Conv1D's unit needs (0, 1),
    # so the rank-3 weight goes through its own transformation.
    tree = lambda i: {
        str(s): jnp.asarray(to_optax_layout(d[i])) for s, d in zip(TORCH_SHAPES, drawn)
    }
    g_tree, p_tree = tree(1), tree(0)
    conv1d = str((4, 3, 5))
    out, _ = jax.jit(cj.adaptive_grad_clip(0.05, eps=1e-3).update)(g_tree, None, p_tree)
    (out[conv1d],), _ = cj.adaptive_grad_clip(0.05, eps=1e-3, axis=(0, 1)).update(
        [g_tree[conv1d]], None, [p_tree[conv1d]]
    )
    for shape, param, (_, g) in zip(TORCH_SHAPES, params, drawn):
        got = to_optax_layout(param.grad.numpy())
        assert np.ndim(g) == 0 or np.count_nonzero(got != to_optax_layout(g)) > 0, (
            f"{shape}: no unit was clipped, the draw checks nothing"
        )
        _agree(got, np.asarray(out[str(shape)]), max(1, int(np.prod(shape[1:]))), f"AGC {shape}")


def test_agc_rank3_default_units_are_optax_multihead_not_conv1d():
    """The layout mapping made visible: on a Conv1D kernel (width, in, out), optax's default
    sums axis 0 only, so its units are (in, out) pairs, not torch's output channels."""
    p, g = _draw((4, 3, 5), 3)
    param = torch.nn.Parameter(torch.tensor(p))
    param.grad = torch.tensor(g)
    ct.adaptive_grad_clip_(param, 0.05)
    torch_result = to_optax_layout(param.grad.numpy())
    k = [[jnp.asarray(to_optax_layout(a))] for a in (g, p)]
    (theirs,), _ = optax.adaptive_grad_clip(0.05).update(k[0], None, k[1])
    (ours,), _ = cj.adaptive_grad_clip(0.05).update(k[0], None, k[1])
    (told,), _ = cj.adaptive_grad_clip(0.05, axis=(0, 1)).update(k[0], None, k[1])
    np.testing.assert_array_equal(ours, theirs, "the default keeps optax's rank-3 rule")
    off = np.max(np.abs(np.asarray(theirs) - torch_result) / np.abs(torch_result))
    assert off > 1e-3, f"optax's rank-3 default matched torch's output channels ({off:.3g})"
    _agree(torch_result, np.asarray(told), 15, "axis=(0, 1) gives torch's units")


# optax/Flax kernels: vector, Dense (in, out), (1, n), multi-head rank 3, Conv2D HWIO, Conv3D
OPTAX_SHAPES = [(), (5,), (4, 6), (1, 7), (4, 2, 3), (3, 3, 4, 5), (2, 2, 2, 3, 4)]


@pytest.mark.parametrize("dtype, mode", [("float32", "jit"), ("float64", "eager")])
def test_jax_dropins_are_optax_bit_for_bit(dtype, mode):
    rng = np.random.default_rng(7)
    g = {str(s): jnp.asarray((rng.normal(size=s) * 5).astype(dtype)) for s in OPTAX_SHAPES}
    p = {k: jnp.asarray(rng.normal(size=v.shape).astype(dtype)) for k, v in g.items()}
    few = [str((4, 6)), str((3, 3, 4, 5))]  # eager ops compile per shape: two shapes suffice
    pairs = [
        (optax.adaptive_grad_clip(0.1), cj.adaptive_grad_clip(0.1), (p,)),
        (optax.clip_by_block_rms(0.5), cj.clip_by_block_rms(0.5), ()),
    ]
    # Eager against eager, jitted against jitted: XLA may fuse a jitted program's divide
    # and multiply differently from the eager ops, in optax's code as in ours.
    wrap, keys = (jax.jit, list(g)) if mode == "jit" else ((lambda f: f), few)
    sub = lambda tree: {k: tree[k] for k in keys}
    for theirs, ours, params in pairs:
        want, _ = wrap(theirs.update)(sub(g), None, *map(sub, params))
        got, _ = wrap(ours.update)(sub(g), None, *map(sub, params))
        assert any(not np.array_equal(got[k], g[k]) for k in keys), "nothing was clipped"
        for k in keys:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{ours} {k} {dtype}")


def test_per_example_dropin_is_optax_bit_for_bit():
    dtype = "float32"  # float64 runs the same expressions; the torch parity test uses it
    rng = np.random.default_rng(3)
    grads = [
        jnp.asarray(rng.normal(size=(6, 3, 2)).astype(dtype)),
        jnp.asarray((rng.normal(size=(6, 4)) * 2).astype(dtype)),
    ]
    grads[0] = grads[0].at[2].set(0.0)  # a zero example: 0 / 0 gives multiplier 1
    for clip in (0.0, 1.5, jnp.inf):
        want_sum, want_n = optax.per_example_global_norm_clip(grads, clip)
        got_sum, got_n = cj.per_example_global_norm_clip(grads, clip)
        assert int(got_n) == int(want_n), (clip, got_n, want_n)
        for a, b in zip(got_sum, want_sum):
            np.testing.assert_array_equal(a, b, err_msg=f"l2_norm_clip={clip}")


def test_block_rms_and_per_example_torch_equal_jax():
    rng = np.random.default_rng(11)
    shapes = [(5,), (6, 4), (4, 3, 3, 3), ()]
    grads = [rng.normal(size=s) * 10.0 ** rng.integers(-2, 2) for s in shapes]
    params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in shapes]
    for prm, g in zip(params, grads):
        prm.grad = torch.tensor(g)
    ct.clip_grad_block_rms_(params, 0.3)
    want, _ = cj.clip_by_block_rms(0.3).update([jnp.asarray(g) for g in grads], None)
    assert any(not np.array_equal(p.grad.numpy(), g) for p, g in zip(params, grads))
    for prm, w, s in zip(params, want, shapes):
        _agree(prm.grad.numpy(), np.asarray(w), int(np.prod(s)), f"block RMS {s}")

    batch = [rng.normal(size=(8, 3)), rng.normal(size=(8, 2, 2)) * 3]
    t_sum, t_n = ct.per_example_global_norm_clip([torch.tensor(b) for b in batch], 2.0)
    j_sum, j_n = cj.per_example_global_norm_clip([jnp.asarray(b) for b in batch], 2.0)
    assert int(t_n) == int(j_n) > 0, (int(t_n), int(j_n))
    for a, b in zip(t_sum, j_sum):
        # 7 squares per example, then 8 products summed: (7 + 8 + 4) eps covers both orders.
        _agree(a.numpy(), np.asarray(b), 7 + 8, "per-example sum")


def test_rank6_kernel_optax_raises_ours_clips_like_torch():
    """optax#906's kind of failure, as it stands in optax 0.2.8: rank 5 now works, rank 6 raises."""
    shape = (2, 3, 2, 2, 2, 2)  # torch (out, in, 4 kernel dims)
    p, g = _draw(shape, 6)
    k = [jnp.asarray(to_optax_layout(a)) for a in (g, p)]
    with pytest.raises(ValueError, match="Expected parameter with shape"):
        optax.adaptive_grad_clip(0.05).update([k[0]], None, [k[1]])
    (ours,), _ = cj.adaptive_grad_clip(0.05).update([k[0]], None, [k[1]])
    (explicit,), _ = optax.adaptive_grad_clip(0.05, axis=(0, 1, 2, 3, 4)).update(
        [k[0]], None, [k[1]]
    )
    np.testing.assert_array_equal(ours, explicit)  # optax itself, told the axes
    param = torch.nn.Parameter(torch.tensor(p))
    param.grad = torch.tensor(g)
    ct.adaptive_grad_clip_(param, 0.05)
    _agree(to_optax_layout(param.grad.numpy()), np.asarray(ours), 48, "rank 6")


def test_block_rms_threshold_zero_keeps_zero_leaves():
    zero = jnp.zeros(3)
    theirs, _ = optax.clip_by_block_rms(0.0).update([zero, jnp.ones(2)], None)
    ours, _ = cj.clip_by_block_rms(0.0).update([zero, jnp.ones(2)], None)
    assert np.isnan(theirs[0]).all(), f"optax changed: {theirs[0]}"  # 0 / 0 in its denominator
    np.testing.assert_array_equal(np.concatenate(ours), np.zeros(5))
    param = torch.nn.Parameter(torch.zeros(3))
    param.grad = torch.zeros(3)
    ct.clip_grad_block_rms_(param, 0.0)
    assert torch.equal(param.grad, torch.zeros(3)), param.grad


@pytest.mark.parametrize("bad", [-1.0, float("nan")])
def test_bad_thresholds_raise_a_one_line_error(bad):
    param = torch.nn.Parameter(torch.ones(2))
    param.grad = torch.ones(2)
    calls = {
        "clipping": [
            lambda: ct.adaptive_grad_clip_(param, bad),
            lambda: cj.adaptive_grad_clip(bad),
        ],
        "threshold": [
            lambda: ct.clip_grad_block_rms_(param, bad),
            lambda: cj.clip_by_block_rms(bad),
        ],
        "l2_norm_clip": [
            lambda: ct.per_example_global_norm_clip([torch.ones(2, 2)], bad),
            lambda: cj.per_example_global_norm_clip([jnp.ones((2, 2))], bad),
        ],
    }
    for name, fns in calls.items():
        for fn in fns:
            with pytest.raises(ValueError, match=f"^{name} must be >= 0") as e:
                fn()
            assert "\n" not in str(e.value)
    assert torch.equal(param.grad, torch.ones(2)), "a refused call touched the gradient"
    # A traced threshold cannot be checked; it passes (optax.inject_hyperparams' case).
    tx = optax.inject_hyperparams(cj.clip_by_block_rms)(threshold=0.5)
    out, _ = tx.update([jnp.full(4, 2.0)], tx.init([jnp.ones(4)]))
    np.testing.assert_allclose(out[0], 0.5, rtol=F64_EPS * 4)  # rms 2 -> 0.5: one divide, one sqrt
