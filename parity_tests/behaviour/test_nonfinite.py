"""Non-finite steps: `--nonfinite skip` drops exactly the bad batch, `error` stops with a checkpoint
from before it, both backends alike; an exploding loss is reported as divergence.

The bad batch is made honestly: one character's embedding row is set to NaN (or inf) and that
character occurs in one batch only. Every other batch never reads the row, so its loss and gradient
are finite; the one batch that does gets a non-finite loss and gradient through the real forward and
backward pass of each backend.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import charclip.run as run_mod
from charclip import checkpoint as ckpt_io
from charclip import corpus
from charclip.backends import module as backend_module
from charclip.batching import Position, Streams, split
from charclip.cli import main
from charclip.config import ClipConfig, ModelConfig, TrainConfig
from charclip.metrics import read_metrics
from charclip.vocab import Vocab
from charclip.weights import init_params

BACKENDS = ["torch", "jax"]
V, B, T, N, BAD = (
    12,
    4,
    8,
    6,
    3,
)  # vocabulary, batch, sequence length, batches, index of the bad batch
POISON = V - 1  # the token whose embedding row is poisoned


def _batches(rng_seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(rng_seed)
    out = []
    for i in range(N):
        x = rng.integers(0, V - 1, size=(B, T), dtype=np.int64)  # never the poisoned token...
        y = rng.integers(0, V - 1, size=(B, T), dtype=np.int64)
        if i == BAD:
            x[1, 5] = POISON  # ...except once, here
        out.append((x, y))
    return out


def _setup(poison: float, nonfinite: str):
    model = ModelConfig(vocab_size=V, cell="lstm", hidden_size=16, num_layers=1, embedding_dim=6)
    cfg = TrainConfig(
        batch_size=B,
        seq_len=T,
        lr=1e-2,
        dtype="float64",
        nonfinite=nonfinite,
        clip=ClipConfig(max_norm=1.0),
    )
    params = init_params(model, 0, "float64")
    params["embedding.weight"][POISON] = poison
    return model, cfg, params


def _train(backend: str, batches, poison: float, nonfinite: str = "skip"):
    model, cfg, params = _setup(poison, nonfinite)
    trainer = backend_module(backend, "train").Trainer(model, cfg, params)
    results = [trainer.step(x, y) for x, y in batches]
    return trainer, results


def _state(trainer) -> dict[str, np.ndarray]:
    out = {f"param {k}": v for k, v in trainer.params_numpy().items()}
    out.update({f"adam {k}": v for k, v in trainer.adam_state().items()})
    out.update({f"hidden {k}": v for k, v in trainer.hidden_state().items()})
    return out


@pytest.mark.parametrize("poison", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_equals_a_run_without_the_bad_batch(backend, poison):
    batches = _batches()
    trainer, results = _train(backend, batches, poison)
    flags = [r.skipped for r in results]
    assert flags == [i == BAD for i in range(N)], (
        f"skipped flags {flags}, expected only batch {BAD}"
    )
    assert not math.isfinite(results[BAD].grad_norm), (
        f"the bad batch's gradient norm is {results[BAD].grad_norm}"
    )
    assert all(math.isfinite(r.loss) for i, r in enumerate(results) if i != BAD), [
        r.loss for r in results
    ]
    without, _ = _train(backend, batches[:BAD] + batches[BAD + 1 :], poison)
    got, want = _state(trainer), _state(without)
    assert got.keys() == want.keys()
    for k in (
        want
    ):  # same backend, same operations in the same order: bit for bit (NaN where the poison sits)
        np.testing.assert_array_equal(
            got[k], want[k], err_msg=f"{backend}: {k} differs from the run without batch {BAD}"
        )


@pytest.mark.parametrize("poison", [math.nan, math.inf], ids=["nan", "inf"])
def test_skip_is_the_same_in_both_backends(poison):
    (t_torch, r_torch), (t_jax, r_jax) = (_train(b, _batches(), poison) for b in BACKENDS)
    assert [r.skipped for r in r_torch] == [r.skipped for r in r_jax]
    # float64, six steps of a 16-unit LSTM and Adam: measured differences are ~1e-15; 1e-10 leaves room
    # for summation order without hiding a real divergence (one skipped update changes values by ~1e-2).
    np.testing.assert_allclose(
        [r.loss for i, r in enumerate(r_jax) if i != BAD],
        [r.loss for i, r in enumerate(r_torch) if i != BAD],
        rtol=1e-10,
        err_msg="losses, jax vs torch",
    )
    got, want = _state(t_jax), _state(t_torch)
    for k in want:
        np.testing.assert_allclose(
            got[k], want[k], rtol=1e-10, atol=1e-12, err_msg=f"{k}, jax vs torch"
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_error_policy_raises_before_touching_anything(backend):
    from charclip.contract import NonFiniteStep

    model, cfg, params = _setup(math.nan, "error")
    trainer = backend_module(backend, "train").Trainer(model, cfg, params)
    batches = _batches()
    for x, y in batches[:BAD]:
        trainer.step(x, y)
    before = _state(trainer)
    with pytest.raises(NonFiniteStep):
        trainer.step(*batches[BAD])
    after = _state(trainer)
    for k in before:
        np.testing.assert_array_equal(
            after[k], before[k], err_msg=f"{backend}: {k} changed by the refused step"
        )


# The same through the shared run loop and the CLI: a corpus in which one character occurs once.

SENTINEL = "~"
SEQ, BATCH, BAD_STEP = (
    16,
    8,
    4,
)  # BAD_STEP: the 1-based training step whose batch holds the sentinel


def _poisoned_corpus(tmp_path, seed: int = 0):
    text = corpus.shakespeare()[:6000]
    assert SENTINEL not in text
    n_train = len(split(np.zeros(len(text)), 0.1)[0])
    streams = Streams(np.zeros(n_train, np.int64), BATCH, SEQ)
    # Stream 0 of batch BAD_STEP - 1 (0-based) of epoch 0 reads positions start + (BAD_STEP - 1) * SEQ + [0, SEQ).
    i = streams.offset(seed, 0) + (BAD_STEP - 1) * SEQ + 5
    text = text[:i] + SENTINEL + text[i + 1 :]
    path = tmp_path / "poisoned.txt"
    path.write_text(text, encoding="utf-8")
    return path, Vocab.from_text(text).chars.index(SENTINEL)


def _poison_init(monkeypatch, index: int, value: float = math.nan):
    real = run_mod.init_params

    def poisoned(cfg, seed, dtype):
        params = real(cfg, seed, dtype)
        params["embedding.weight"][index] = value
        return params

    monkeypatch.setattr(run_mod, "init_params", poisoned)


def _argv(path, out, backend, policy, steps=10):
    return [
        "train",
        "--backend",
        backend,
        "--data",
        str(path),
        "--out",
        str(out),
        "--steps",
        str(steps),
        "--batch-size",
        str(BATCH),
        "--seq-len",
        str(SEQ),
        "--hidden",
        "16",
        "--embed",
        "8",
        "--layers",
        "1",
        "--dtype",
        "float64",
        "--checkpoint-every",
        "3",
        "--eval-every",
        "5",
        "--eval-batches",
        "1",
        "--sample-chars",
        "0",
        "--no-progress",
        "--nonfinite",
        policy,
    ]


def test_skip_through_the_cli_is_counted_logged_and_the_same_in_both_backends(
    tmp_path, monkeypatch, capsys
):
    path, index = _poisoned_corpus(tmp_path)
    _poison_init(monkeypatch, index)
    logs = {}
    for backend in BACKENDS:
        assert main(_argv(path, tmp_path / backend, backend, "skip")) == 0
        out = capsys.readouterr().out
        assert "; 1 skipped" in out, out
        logs[backend] = [
            r for r in read_metrics(tmp_path / backend / "metrics.jsonl") if "loss" in r
        ]
        skipped = [r["step"] for r in logs[backend] if r["skipped"]]
        assert skipped == [BAD_STEP], f"{backend}: skipped steps {skipped}, expected [{BAD_STEP}]"
        bad = logs[backend][
            BAD_STEP - 1
        ]  # strict JSON: a non-finite value is null, its key flagged (issue 24)
        assert bad["grad_norm"] is None and "grad_norm" in bad["nonfinite"], bad
        assert [r["step"] for r in logs[backend]] == list(range(1, 11)), (
            "training did not go on after the skip"
        )
    finite = [i for i in range(10) if i != BAD_STEP - 1]
    # float64 through ten steps of both backends: ~1e-15 measured; see test_skip_is_the_same_in_both_backends.
    np.testing.assert_allclose(
        [logs["jax"][i]["loss"] for i in finite],
        [logs["torch"][i]["loss"] for i in finite],
        rtol=1e-10,
        err_msg="per-step losses, jax vs torch",
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_error_through_the_cli_stops_with_a_checkpoint_from_before(
    tmp_path, monkeypatch, capsys, backend
):
    path, index = _poisoned_corpus(tmp_path)
    _poison_init(monkeypatch, index)
    assert main(_argv(path, tmp_path / "bad", backend, "error")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"charclip: error: step {BAD_STEP}: the loss or gradient is not finite"
    ), err
    ck = ckpt_io.load(err[0].split("Checkpoint from before this step: ")[1].split(". ")[0])
    assert ck.step == BAD_STEP - 1 and ck.position == Position(0, BAD_STEP - 1), (
        ck.step,
        ck.position,
    )
    # The same run told to stop one step earlier ends in the same place, bit for bit.
    assert main(_argv(path, tmp_path / "short", backend, "error", steps=BAD_STEP - 1)) == 0
    want = ckpt_io.load(tmp_path / "short")
    for k in want.params:
        np.testing.assert_array_equal(ck.params[k], want.params[k], err_msg=f"{backend}: {k}")
    for k in want.adam:
        np.testing.assert_array_equal(ck.adam[k], want.adam[k], err_msg=f"{backend}: adam {k}")
    for k in want.hidden:
        np.testing.assert_array_equal(
            ck.hidden[k], want.hidden[k], err_msg=f"{backend}: hidden {k}"
        )


@pytest.mark.parametrize("lr,diverges", [(30.0, True), (3e-3, False)])
def test_exploding_loss_is_reported_as_divergence(tmp_path, capsys, lr, diverges):
    data = tmp_path / "corpus.txt"
    data.write_text(corpus.shakespeare()[:6000], encoding="utf-8")
    argv = [
        "train",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "run"),
        "--steps",
        "10",
        "--batch-size",
        "8",
        "--seq-len",
        "16",
        "--hidden",
        "16",
        "--embed",
        "8",
        "--layers",
        "1",
        "--no-clip",
        "--lr",
        str(lr),
        "--eval-every",
        "10",
        "--eval-batches",
        "1",
        "--sample-chars",
        "0",
        "--no-progress",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    warnings = [l for l in out.splitlines() if l.startswith("charclip: warning:")]
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    if diverges:
        assert (
            len(warnings) == 1 and "training is diverging; lower --lr or --clip-norm" in warnings[0]
        ), out
        step = int(warnings[0].split("step ")[1].split(":")[0])
        assert losses[step - 1] > 3 * losses[0] and all(
            l <= 3 * losses[0] for l in losses[: step - 1]
        ), (step, losses)
    else:
        assert warnings == [] and max(losses) <= 3 * losses[0], (warnings, losses)
