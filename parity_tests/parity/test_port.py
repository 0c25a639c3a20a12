"""`charclip.parity.prove_port`: the ladder for a user's own model, and a wrong port it must catch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from charclip.errors import CharclipError
from charclip.parity import TOLERANCES, prove_port


class MLP(nn.Module):
    def __init__(self, d_in=5, d_hidden=7, d_out=3):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, d_hidden), nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def mlp_apply(p, x):
    h = jax.nn.relu(x @ p["fc1.weight"].T + p["fc1.bias"][None, :])  # (B, H); torch's (out, in) layout
    return h @ p["fc2.weight"].T + p["fc2.bias"][None, :]


def mlp_wrong(p, x):
    """A classic porting slip: the second layer's weight used untransposed as (in, out)."""
    h = jax.nn.relu(x @ p["fc1.weight"].T + p["fc1.bias"][None, :])
    w = p["fc2.weight"].reshape(p["fc2.weight"].shape[1], p["fc2.weight"].shape[0])
    return h @ w + p["fc2.bias"][None, :]


def mlp_leaky(p, x):
    """A subtler one: leaky ReLU where torch has ReLU; right wherever the pre-activations are positive."""
    h = jax.nn.leaky_relu(x @ p["fc1.weight"].T + p["fc1.bias"][None, :], 0.01)
    return h @ p["fc2.weight"].T + p["fc2.bias"][None, :]


def _batches(n=6, b=8, seed=0, classes=None):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.standard_normal((b, 5))
        y = rng.integers(0, classes, b) if classes else rng.standard_normal((b, 3))
        out.append((x, y))
    return out


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_a_correct_port_passes_every_rung(dtype, loss):
    torch.manual_seed(0)
    report = prove_port(MLP(), mlp_apply, _batches(classes=3 if loss == "cross_entropy" else None), loss=loss,
                        lr=0.5, max_norm=0.3, dtype=dtype)
    assert report.ok, "\n" + report.table()
    quantities = [r.quantity for r in report.rows]
    assert [q for q in quantities if q.startswith("grad ")] == [f"grad {n}" for n in
                                                                ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")]
    if dtype == "float64":  # the ladder's float64 bound, not a looser one
        assert all(r.tol <= TOLERANCES["float64"]["trajectory"].rel + 6 * 1e-6 / 0.3 for r in report.rows)


def test_clipping_really_acts_in_the_compared_step():
    """max_norm below the gradient's norm: the clipped rung compares clipped gradients, not copies."""
    torch.manual_seed(0)
    report = prove_port(MLP(), mlp_apply, _batches(n=1), max_norm=1e-3)
    assert report.ok, report.table()
    norm = next(r for r in report.rows if r.quantity == "global grad norm")
    assert norm.ok


@pytest.mark.parametrize("wrong, first_rung", [(mlp_wrong, "forward output"), (mlp_leaky, "forward output")])
def test_a_wrong_port_is_caught_at_the_first_rung_that_differs(wrong, first_rung):
    torch.manual_seed(0)
    report = prove_port(MLP(), wrong, _batches(), lr=0.5, max_norm=0.3)
    assert not report.ok
    assert report.first_failure.quantity == first_rung, report.table()


def test_a_wrong_gradient_only_port_is_caught_in_the_gradients():
    """Forward right, backward wrong (a custom_vjp that drops the bias gradient): only the gradient rungs fail."""

    @jax.custom_vjp
    def bias_add(h, b):
        return h + b[None, :]

    bias_add.defvjp(lambda h, b: (h + b[None, :], None), lambda _, g: (g, jnp.zeros(g.shape[1], g.dtype)))

    def apply(p, x):
        h = jax.nn.relu(bias_add(x @ p["fc1.weight"].T, p["fc1.bias"]))
        return h @ p["fc2.weight"].T + p["fc2.bias"][None, :]

    torch.manual_seed(0)
    report = prove_port(MLP(), apply, _batches(), lr=0.5, max_norm=0.3)
    rows = {r.quantity: r for r in report.rows}
    assert rows["forward output"].ok and rows["loss"].ok
    assert not rows["grad fc1.bias"].ok and rows["grad fc1.weight"].ok, report.table()
    assert report.first_failure.quantity == "grad fc1.bias"


@pytest.mark.parametrize("kwargs, message", [
    (dict(loss="hinge"), "unknown loss"), (dict(dtype="float16"), "unknown dtype"), (dict(max_norm=0.0), "positive"),
])
def test_bad_arguments_say_what_is_wrong(kwargs, message):
    with pytest.raises(CharclipError, match=message):
        prove_port(MLP(), mlp_apply, _batches(n=1), **kwargs)
