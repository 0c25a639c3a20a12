"""--clip-impl (whose code clips) and --clip-convention (which formula) are two options; the
spelling before them (--clip-impl reference) still reads, on the command line and in checkpoints."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from charclip import checkpoint as ckpt_io
from charclip import cli
from charclip.batching import Position
from charclip.config import ClipConfig, ModelConfig, TrainConfig
from charclip.errors import CharclipError
from charclip.vocab import Vocab
from charclip.weights import init_params


def _clip_from(*flags: str) -> ClipConfig:
    return cli._clip_config(cli.parser().parse_args(["train", *flags]))


@pytest.mark.parametrize(
    "flags, impl, convention",
    [
        ((), "library", None),
        (("--clip-impl", "charclip"), "charclip", None),
        (("--clip-impl", "charclip", "--clip-convention", "torch"), "charclip", "torch"),
        (
            ("--clip-impl", "reference"),
            "charclip",
            "optax",
        ),  # what "reference" trained with, in both backends
        (("--clip-impl", "reference", "--clip-convention", "torch"), "charclip", "torch"),
        (("--clip-convention", "optax"), "library", "optax"),
    ],
)
def test_impl_and_convention_from_the_command_line(flags, impl, convention):
    clip = _clip_from(*flags)
    assert (clip.impl, clip.convention) == (impl, convention), f"{flags} -> {clip}"


def test_each_backend_defaults_to_its_librarys_formula():
    clip = ClipConfig(impl="charclip")
    assert (clip.convention_in("torch"), clip.convention_in("jax")) == ("torch", "optax")
    assert ClipConfig(impl="reference") == ClipConfig(impl="charclip", convention="optax")


@pytest.mark.parametrize("backend, convention", [("torch", "optax"), ("jax", "torch")])
def test_a_library_is_not_asked_for_the_other_formula(backend, convention):
    clip = ClipConfig(impl="library", convention=convention)
    with pytest.raises(
        CharclipError, match=f"--clip-convention {convention} with --clip-impl library"
    ):
        clip.check_for(backend)
    ClipConfig(impl="charclip", convention=convention).check_for(
        backend
    )  # charclip's code has both
    replace(clip, mode="value").check_for(backend)  # value clipping has no convention


def test_unknown_spellings_are_refused():
    with pytest.raises(CharclipError, match="unknown --clip-impl 'mine'"):
        ClipConfig(impl="mine")
    with pytest.raises(CharclipError, match="unknown --clip-convention 'keras'"):
        ClipConfig(convention="keras")
    # The CLI's parser turns argparse's choice error into charclip's one-line error.
    with pytest.raises(CharclipError, match="--clip-convention: invalid choice: 'keras'"):
        _clip_from("--clip-convention", "keras")


def _save(tmp_path, clip: ClipConfig):
    vocab = Vocab("abc")
    model = ModelConfig(
        vocab_size=len(vocab), hidden_size=2, num_layers=1, embedding_dim=2, cell="rnn"
    )
    train = TrainConfig(batch_size=1, seq_len=2, steps=1, clip=clip)
    params = init_params(model, 0, "float32")
    adam = {"step": np.array(0, np.int64)}
    adam.update(
        {f"{m}.{k}": np.zeros_like(v) for m in ("exp_avg", "exp_avg_sq") for k, v in params.items()}
    )
    ckpt = ckpt_io.Checkpoint(
        model=model,
        train=train,
        vocab=vocab,
        params=params,
        step=0,
        position=Position(0, 0),
        backend="torch",
        corpus={"path": None},
        adam=adam,
        hidden={"h": np.zeros((1, 1, 2), np.float32)},
    )
    return ckpt_io.save(tmp_path / "run", ckpt)


@pytest.mark.parametrize(
    "old, impl, convention", [("reference", "charclip", "optax"), ("library", "library", None)]
)
def test_checkpoints_of_either_era_load(tmp_path, old, impl, convention):
    folder = _save(tmp_path, ClipConfig(impl=impl, convention=convention))
    assert ckpt_io.load(folder).train.clip == ClipConfig(
        impl=impl, convention=convention
    )  # this era's
    meta_path = folder / ckpt_io.META_FILE
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    assert meta["train"]["clip"]["convention"] == convention
    del meta["train"]["clip"]["convention"]  # the era before --clip-convention wrote no such key
    meta["train"]["clip"]["impl"] = old
    meta_path.write_text(json.dumps(meta), encoding="utf-8")
    loaded = ckpt_io.load(folder).train.clip
    assert (loaded.impl, loaded.convention) == (impl, convention), f"{old!r} read as {loaded}"
    assert np.isfinite(loaded.max_norm)


@pytest.mark.parametrize("convention", [None, "torch", "optax"])
def test_the_trainers_clip_by_the_chosen_formula(convention, monkeypatch):
    """torch: g = (6, 8), tau = 1 clipped by the step's own clip; torch's formula gives 1 / (10 + 1e-6)
    of g, optax's 1 / 10: other bits. JAX: the chain is built with the chosen convention."""
    import torch

    from charclip.jax import clipping as jclip
    from charclip.jax.train import optimizer
    from charclip.torch import clipping as tclip
    from charclip.torch.train import Trainer

    clip = ClipConfig(max_norm=1.0, impl="charclip", convention=convention)
    cfg = TrainConfig(dtype="float64", clip=clip)
    g = np.array([6.0, 8.0])
    module = torch.nn.Linear(2, 1, bias=False, dtype=torch.float64)
    module.weight.grad = torch.from_numpy(g[None].copy())
    Trainer._clip(
        type("T", (), {"cfg": cfg, "module": module})()
    )  # the step's clip, on a gradient we chose
    expected = torch.nn.Parameter(torch.zeros(1, 2, dtype=torch.float64))
    expected.grad = torch.from_numpy(g[None].copy())
    tclip.clip_grad_norm_([expected], 1.0, convention=clip.convention_in("torch"))
    assert torch.equal(module.weight.grad, expected.grad), (
        f"torch: {module.weight.grad} vs {expected.grad}"
    )
    other = torch.from_numpy(g[None].copy()) * (
        1.0 / 10.0 if clip.convention_in("torch") == "torch" else 1.0 / (10.0 + 1e-6)
    )
    assert not torch.equal(module.weight.grad, other), (
        "the two formulas gave the same bits: the test shows nothing"
    )

    chosen = []
    real = jclip.clip_by_global_norm
    monkeypatch.setattr(
        jclip,
        "clip_by_global_norm",
        lambda *a, **k: chosen.append(k.get("convention")) or real(*a, **k),
    )
    optimizer(cfg)
    assert chosen == [clip.convention_in("jax")], f"jax built its clip with {chosen}"


@pytest.mark.parametrize("impl", ["library", "charclip"])
def test_the_torch_trainer_reports_the_chosen_implementations_norm_under_value_clipping(impl):
    """Value clipping still logs the pre-clip norm. With charclip's implementation it is the
    overflow-safe one, as JAX's trainer reports it (charclip.jax.train.gradient_norm): float64
    entries of 1e200 square to inf in torch's norm, not in ours."""
    import math

    import torch

    from charclip.torch.train import Trainer

    clip = ClipConfig(mode="value", max_value=1.0, impl=impl)
    cfg = TrainConfig(dtype="float64", clip=clip)
    module = torch.nn.Linear(2, 1, bias=False, dtype=torch.float64)
    module.weight.grad = torch.tensor([[3e200, 4e200]], dtype=torch.float64)
    norm = float(Trainer._clip(type("T", (), {"cfg": cfg, "module": module})()))
    if impl == "library":
        assert norm == math.inf, norm  # torch's own get_total_norm, as torch users see it
    else:
        assert norm == pytest.approx(5e200, rel=1e-15), norm  # a few float64 roundings
