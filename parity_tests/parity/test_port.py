"""`charclip.parity.prove_port`: localisation, derived bounds, optimizers, front ends and the
three real ports (charclip/parity/examples.py) with their broken variants."""

from __future__ import annotations

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from charclip.cli import main
from charclip.errors import CharclipError
from charclip.parity import Optimizer, assert_port_equal, prove_port, tap

pytest.importorskip("flax")  # the `port` extra: the NNX and Equinox front ends and the examples
pytest.importorskip("equinox")
from charclip.parity import examples


class MLP(nn.Module):
    def __init__(self, d_in=5, d_hidden=7, d_out=3):
        super().__init__()
        self.fc1, self.act, self.fc2 = (
            nn.Linear(d_in, d_hidden),
            nn.Tanh(),
            nn.Linear(d_hidden, d_out),
        )

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def mlp_apply(p, x, act=jnp.tanh):
    h = tap(
        "fc1", x @ p["fc1.weight"].T + p["fc1.bias"][None, :]
    )  # (B, H); torch's (out, in) layout
    return tap("fc2", tap("act", act(h)) @ p["fc2.weight"].T + p["fc2.bias"][None, :])


def _batches(n=5, b=8, seed=0, classes=None, scale=1.0):
    rng = np.random.default_rng(seed)
    return [
        (
            scale * rng.standard_normal((b, 5)),
            rng.integers(0, classes, b) if classes else rng.standard_normal((b, 3)),
        )
        for _ in range(n)
    ]


def _model():
    torch.manual_seed(0)
    return MLP()


@pytest.mark.parametrize(
    "dtype, loss, optimizer",
    [
        ("float64", "mse", "sgd"),
        ("float64", "cross_entropy", "adamw"),
        ("float64", "mse", Optimizer("sgd", momentum=0.9, nesterov=True, weight_decay=0.01)),
        ("float64", "mse", Optimizer("adam", weight_decay=0.01)),
        ("float32", "cross_entropy", "adam"),
    ],
)
def test_a_correct_port_passes_every_phase(dtype, loss, optimizer):
    report = prove_port(
        _model(),
        mlp_apply,
        _batches(classes=3 if loss == "cross_entropy" else None),
        loss=loss,
        optimizer=optimizer,
        lr=0.05,
        max_norm=None,
        clip_value=0.5,
        dtype=dtype,
    )
    assert report.ok and report.divergence is None, report.table()
    assert [r.where for r in report.rows if r.phase == "forward"] == [
        "fc1",
        "act",
        "fc2",
        "output",
        "loss",
    ]
    grads = [r.where for r in report.rows if r.where.startswith("grad ")]
    assert grads == [
        "grad fc2.bias",
        "grad fc2.weight",
        "grad fc1.bias",
        "grad fc1.weight",
    ]  # reverse use order
    assert {r.phase for r in report.rows} == {"forward", "backward", "step", "trajectory"}
    u = {"float64": 2.0**-53, "float32": 2.0**-24}[dtype]
    assert all(
        r.tol == pytest.approx(16 * u * int(r.formula.split("n=")[1].split()[0]))
        for r in report.rows
        if r.phase == "forward" and r.where not in ("loss",)
    ), report.table()
    assert "precision pinned" in report.table() and "'highest'" in report.table()


def test_norm_clipping_widens_only_by_torchs_epsilon():
    """max_norm below the gradient's norm: the clipped rows carry 1e-6/tau and pass; the raw gradients do not need it."""
    report = prove_port(_model(), mlp_apply, _batches(n=3), max_norm=1e-2)
    assert report.ok, report.table()
    clipped = [r for r in report.rows if r.where.startswith("clipped")]
    raw = [r for r in report.rows if r.where.startswith("grad ")]
    assert all("1e-6/tau=1.0e-04" in r.formula for r in clipped), report.table()
    assert (
        max(r.max_rel for r in clipped) > 1e-8
    )  # the gap is really there (torch divides by norm + 1e-6)
    assert max(r.tol for r in raw) < 1e-11  # float64: 16 u (2n + m) with n, m in the tens


def test_the_first_differing_layer_is_named_with_the_layers_before_it_agreeing():
    report = prove_port(
        _model(),
        lambda p, x: mlp_apply(p, x, lambda h: jax.nn.leaky_relu(jnp.tanh(h), 0.5)),
        _batches(),
        trajectory=False,
    )
    d = report.divergence
    assert (d.phase, d.where, d.step) == ("forward", "act", None), report.table()
    fc1 = next(r for r in report.rows if r.where == "fc1")
    assert fc1.ok and d.error > 1e-3 > d.bound
    assert report.table().splitlines()[0].startswith("diverges in the forward phase at act")


def test_a_wrong_custom_backward_is_caught_in_the_backward_phase_at_its_parameter():
    @jax.custom_vjp
    def bias_add(h, b):
        return h + b[None, :]

    bias_add.defvjp(
        lambda h, b: (h + b[None, :], None), lambda _, g: (g, jnp.zeros(g.shape[1], g.dtype))
    )  # the bug

    def apply(p, x):
        h = tap("fc1", bias_add(x @ p["fc1.weight"].T, p["fc1.bias"]))
        return jnp.tanh(h) @ p["fc2.weight"].T + p["fc2.bias"][None, :]

    report = prove_port(_model(), apply, _batches(), trajectory=False)
    assert (report.divergence.phase, report.divergence.where) == ("backward", "fc1.bias"), (
        report.table()
    )
    assert all(r.ok for r in report.rows if r.phase == "forward")


def test_a_trajectory_bug_that_starts_at_one_step_is_a_jump_at_that_step():
    """The port clamps inputs at 3 where torch does not; only batch 3 holds such an input."""
    batches = _batches(n=5, scale=0.3)
    batches[2] = (batches[2][0] + np.eye(8, 5) * 10, batches[2][1])
    report = prove_port(
        _model(), lambda p, x: mlp_apply(p, jnp.clip(x, -3, 3)), batches, lr=0.05, max_norm=None
    )
    d = report.divergence
    assert (d.phase, d.step) == ("trajectory", 3), report.table()
    assert "a jump at one step" in d.note
    tr = report.trajectory
    assert all(g <= b for g, b in zip(tr.gap[:2], tr.bound[:2]))
    assert tr.initial_perturbation > 0 and len(tr.perturbed) == 5


def test_float32_adam_trajectory_bound_grows_with_the_measured_perturbation():
    report = prove_port(
        _model(),
        mlp_apply,
        _batches(n=6, classes=3),
        loss="cross_entropy",
        optimizer="adam",
        lr=0.05,
        max_norm=None,
        dtype="float32",
    )
    assert report.ok, report.table()
    tr = report.trajectory
    assert tr.bound == pytest.approx([tr.per_step * k * tr.amplification(k) for k in range(1, 7)])


def test_tap_returns_its_value_and_records_only_inside_a_proof():
    from charclip.parity.tap import recording

    v = np.arange(3.0)
    assert tap("x", v) is v
    with recording() as taps:
        tap("a", v)
    tap("b", v)
    assert [n for n, _ in taps] == ["a"]


def test_a_tap_inside_vmap_is_a_one_line_error():
    def port(p, x):
        return (
            jax.vmap(lambda v: tap("fc1", v @ p["fc1.weight"].T) + p["fc1.bias"])(x)
            @ p["fc2.weight"].T
        )

    with pytest.raises(CharclipError, match=r"tap\('fc1', ...\) was called inside jax.vmap"):
        prove_port(_model(), port, _batches(n=1), trajectory=False)


def test_a_dropout_model_in_training_mode_is_refused_in_one_line():
    model = nn.Sequential(nn.Linear(5, 3), nn.Dropout(0.1))
    with pytest.raises(
        CharclipError, match=r"training mode with dropout active \(1, p=0.1\); call model.eval"
    ):
        prove_port(model, lambda p, x: x @ p["0.weight"].T + p["0.bias"][None, :], _batches(n=1))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(loss="hinge"), "unknown loss"),
        (dict(dtype="float16"), "unknown dtype"),
        (dict(max_norm=0.0), "max_norm must be positive"),
        (dict(optimizer="rmsprop"), "unknown optimizer"),
        (dict(mapping={"x": "y"}), "mapping is for Flax NNX"),
    ],
)
def test_bad_arguments_say_what_is_wrong(kwargs, message):
    with pytest.raises(CharclipError, match=message):
        prove_port(_model(), mlp_apply, _batches(n=1), **kwargs)


def test_assert_port_equal_puts_the_divergence_on_top_of_the_table():
    assert_port_equal(_model(), mlp_apply, _batches(n=2), trajectory=False)
    with pytest.raises(AssertionError) as e:
        assert_port_equal(
            _model(), lambda p, x: mlp_apply(p, x, jnp.sin), _batches(n=2), trajectory=False
        )
    first, *rest = str(e.value).splitlines()
    assert first.startswith("port differs: diverges in the forward phase at act"), str(e.value)
    assert any(line.startswith("forward") and "DIFFERS" in line for line in rest)


# --- front ends: NNX and Equinox parameter matching ------------------------------------------


def test_unmatched_and_misshaped_parameters_are_one_line_errors():
    import equinox as eqx

    class Net(eqx.Module):
        fc1: eqx.nn.Linear
        fc2: eqx.nn.Linear

        def __call__(self, x):
            return jax.vmap(lambda v: self.fc2(jnp.tanh(self.fc1(v))))(x)

    k = jax.random.split(jax.random.key(0))
    no_bias = Net(eqx.nn.Linear(5, 7, key=k[0]), eqx.nn.Linear(7, 3, use_bias=False, key=k[1]))
    with pytest.raises(
        CharclipError, match=r"torch parameter 'fc2.bias' \(3,\) has no counterpart"
    ):
        prove_port(_model(), no_bias, _batches(n=1))
    wrong = Net(eqx.nn.Linear(5, 7, key=k[0]), eqx.nn.Linear(7, 4, key=k[1]))
    with pytest.raises(
        CharclipError, match=r"torch fc2.weight \(3, 7\) does not fit JAX fc2.weight \(4, 7\)"
    ):
        prove_port(_model(), wrong, _batches(n=1))
    right = Net(eqx.nn.Linear(5, 7, key=k[0]), eqx.nn.Linear(7, 3, key=k[1]))
    with pytest.raises(CharclipError, match="mapping names 'fc3.weight', which is no array"):
        prove_port(_model(), right, _batches(n=1), mapping={"fc3.weight": "fc2.weight"})


def test_flax_kernels_are_transposed_and_the_layout_is_stated():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self):
            self.fc1, self.fc2 = (
                nnx.Linear(5, 7, rngs=nnx.Rngs(0)),
                nnx.Linear(7, 3, rngs=nnx.Rngs(1)),
            )

        def __call__(self, x):
            return self.fc2(jnp.tanh(self.fc1(x)))

    report = prove_port(_model(), Net(), _batches(n=2), trajectory=False)
    assert report.ok, report.table()
    assert "layout: fc1.weight (7, 5) -> fc1.kernel (5, 7): transpose" in report.notes
    assert [r.where for r in report.rows if r.phase == "forward"] == [
        "fc1",
        "fc2",
        "output",
        "loss",
    ]


def test_a_flax_conv_kernel_is_matched_from_oihw_to_hwio():
    from flax import nnx

    class TorchConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, (3, 2))

        def forward(self, x):  # (B, 2, H, W) -> (B, 3 * H' * W')
            return self.conv(x).flatten(1)

    class NnxConv(nnx.Module):
        def __init__(self):
            self.conv = nnx.Conv(2, 3, (3, 2), padding="VALID", rngs=nnx.Rngs(0))

        def __call__(self, x):  # NCHW in, as torch; Flax convolves NHWC
            y = self.conv(jnp.transpose(x, (0, 2, 3, 1)))
            return jnp.transpose(y, (0, 3, 1, 2)).reshape(x.shape[0], -1)

    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((2, 2, 5, 4))
    y = np.random.default_rng(1).standard_normal((2, 3 * 3 * 3))
    report = prove_port(TorchConv(), NnxConv(), [(x, y)], trajectory=False)
    assert report.ok, report.table()
    assert (
        "layout: conv.weight (3, 2, 3, 2) -> conv.kernel (3, 2, 2, 3): oihw->hwio" in report.notes
    )


# --- the three real ports and their broken variants -----------------------------------------


@pytest.mark.parametrize("name", ["transformer", "gru", "convnet"])
def test_a_real_port_is_exact_in_float64(name):
    model, port, batches, options = examples.MAKERS[name](
        steps=3, **(dict(layers=1) if name == "transformer" else {})
    )
    report = prove_port(model, port, batches, **options)
    assert report.ok, report.table()
    # float64 rounding (1.1e-16) over these few hundred operations; a bug is many orders above. The
    # step and trajectory rows keep their own bounds: Adam's first step turns the rounding noise of a
    # gradient that is exactly 0 in exact arithmetic (the attention's key bias) into a visible update.
    worst = max(r.max_rel for r in report.rows if r.phase in ("forward", "backward"))
    assert worst < 1e-12, report.table()
    layers = [
        r.where for r in report.rows if r.phase == "forward" and r.where not in ("output", "loss")
    ]
    assert len(layers) >= 2, (
        layers
    )  # localised: the modules inside are compared, not only the output


@pytest.mark.parametrize("name, broken", [(n, b) for n, v in examples.BROKEN.items() for b in v])
def test_a_broken_port_is_localised_to_its_layer_and_phase(name, broken):
    kwargs = dict(layers=1) if name == "transformer" else {}
    model, port, batches, options = examples.MAKERS[name](broken, steps=1, **kwargs)
    report = prove_port(model, port, batches, trajectory=False, **options)
    d = report.divergence
    assert d is not None and (d.phase, d.where) == examples.BROKEN[name][broken], report.table()


# --- the command line ----------------------------------------------------------------------


def test_charclip_prove_prints_the_table_and_exits_1_on_a_divergence(tmp_path, capsys):
    """In-process (`charclip.cli.main`, what the console script calls): a subprocess would pay the
    imports and JAX's compilation again for the same code path."""
    spec = tmp_path / "spec.py"
    spec.write_text(
        textwrap.dedent("""
        from charclip.parity import examples
        torch_model, jax_forward, batches, options = examples.make_gru("gate_order", steps=1)
    """)
    )
    assert (
        main(["prove", str(spec), "--no-trajectory"]) == 1
    )  # a right port's exit 0: test_a_real_port_...
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("diverges in the forward phase at gru"), out
    assert "bound = formula" in out and "trajectory" not in out
    assert main(["prove", str(tmp_path / "missing.py")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("charclip: error: SPEC.py"), lines
    spec.write_text("torch_model = None\n")
    assert main(["prove", str(spec)]) == 2
    assert "defines no 'jax_forward'" in capsys.readouterr().err
