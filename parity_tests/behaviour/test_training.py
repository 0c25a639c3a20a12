"""Training as a user runs it: initial distributions, batches, learning, one compile, clear errors."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from charclip import backends, checkpoint, cli, run
from charclip.batching import Position, Streams
from charclip.config import ModelConfig, RunOptions
from charclip.jax import train as jax_train
from charclip.metrics import read_metrics
from charclip.torch import model as torch_model
from charclip.weights import init_params
from parity_tests.helpers import small_corpus, tiny_model, tiny_train, train_cli


def test_initial_distributions_match_pytorch_defaults():
    """Ours and PyTorch's own initialisation draw from the same distributions."""
    cfg = ModelConfig(vocab_size=64, cell="lstm", hidden_size=100, num_layers=1, embedding_dim=32)
    ours = init_params(cfg, seed=0)
    torch.manual_seed(0)
    theirs = {k: v.numpy() for k, v in torch_model.CharRNN(cfg).state_dict().items()}
    bound = 1 / np.sqrt(cfg.hidden_size)
    for name in ours:
        for who, a in (("ours", ours[name]), ("torch", theirs[name])):
            # Expected std: 1 for N(0, 1); bound / sqrt(3) for U(-bound, bound).
            std = 1.0 if name == "embedding.weight" else bound / np.sqrt(3)
            # The sample std's standard error is about std / sqrt(2n); allow 5 of them.
            np.testing.assert_allclose(
                a.std(), std, rtol=5 / np.sqrt(2 * a.size), err_msg=f"{who} {name}"
            )
            if name != "embedding.weight":
                assert np.abs(a).max() <= bound, f"{who} {name} leaves U(-1/sqrt(H), 1/sqrt(H))"


def test_same_seed_same_batches_and_the_run_records_its_position(tmp_path):
    path = small_corpus(tmp_path)
    cfg = tiny_train(steps=12)
    a, b = run.prepare_data(str(path), cfg), run.prepare_data(str(path), cfg)
    pos = Position()
    for _ in range(cfg.steps):
        np.testing.assert_array_equal(
            a.train.batch(cfg.seed, pos)[0], b.train.batch(cfg.seed, pos)[0]
        )
        pos = a.train.next(pos)
    assert not np.array_equal(a.train.batch(cfg.seed, pos)[0], a.train.batch(cfg.seed + 1, pos)[0])
    opts = RunOptions(
        backend="jax", out=str(tmp_path / "r"), data=str(path), no_progress=True, sample_chars=0
    )
    run.train(tiny_model(1), cfg, opts, log=lambda *_: None)
    assert checkpoint.load(tmp_path / "r").position == pos


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_training_reduces_the_loss(tmp_path, backend):
    path = small_corpus(tmp_path)
    cfg = tiny_train(steps=60, lr=2e-2, dtype="float32", eval_every=60)
    opts = RunOptions(
        backend=backend,
        out=str(tmp_path / backend),
        data=str(path),
        no_progress=True,
        sample_chars=0,
    )
    summary = run.train(tiny_model(1), cfg, opts, log=lambda *_: None)
    rows = [r for r in read_metrics(summary["metrics"]) if "loss" in r]
    first, last = np.mean([r["loss"] for r in rows[:5]]), np.mean([r["loss"] for r in rows[-5:]])
    assert last < first - 0.5, f"{backend}: loss went from {first:.3f} to {last:.3f}"
    assert summary["val_loss"] < first


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_cli_trains_with_dropout_and_evaluates_and_samples_without_it(tmp_path, backend):
    """`--dropout` reaches the run (and its checkpoint); the validation loss and the closing sample are
    exactly those of a p = 0 trainer and of plain sampling from the same parameters."""
    path = small_corpus(tmp_path, 5_000)
    out = tmp_path / backend
    assert (
        cli.main(
            [
                "train",
                "--backend",
                backend,
                "--data",
                str(path),
                "--out",
                str(out),
                "--dropout",
                "0.2",
                "--steps",
                "3",
                "--batch-size",
                "4",
                "--seq-len",
                "8",
                "--hidden",
                "8",
                "--embed",
                "4",
                "--layers",
                "2",
                "--eval-every",
                "3",
                "--eval-batches",
                "2",
                "--sample-chars",
                "20",
                "--no-progress",
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    ck = checkpoint.load(out)
    assert ck.train.dropout == 0.2
    plain = replace(ck.train, dropout=0.0)
    val = run.prepare_data(str(path), plain, ck.vocab).val.eval_batches(plain.eval_batches)
    assert (
        backends.trainer_factory(backend)(ck.model, plain, ck.params).evaluate(val)
        == summary["val_loss"]
    )
    text = backends.module(backend, "sample").sample(
        ck.model, ck.params, ck.vocab, "\n", 20, temperature=0.8, seed=plain.seed
    )
    assert summary["sample"] == text


def test_jitted_training_step_compiles_once(caplog):
    import jax

    cfg = tiny_train(dtype="float32")
    model = tiny_model(30)
    trainer = jax_train.Trainer(model, cfg, init_params(model, 0, "float32"))
    streams = Streams(np.arange(3000) % 30, cfg.batch_size, cfg.seq_len)
    pos = Position()
    with jax.log_compiles(), caplog.at_level("WARNING"):
        for _ in range(5):
            trainer.step(*streams.batch(0, pos))
            pos = streams.next(pos)
    compiles = [
        r for r in caplog.records if "Finished XLA compilation of jit(train_step)" in r.getMessage()
    ]
    assert len(compiles) == 1, f"train_step compiled {len(compiles)} times in 5 steps"


def _train_cli(tmp_path, backend, data, *extra, name=None):
    out = tmp_path / (name or backend)
    argv = [
        "train",
        "--backend",
        backend,
        "--data",
        str(data),
        "--out",
        str(out),
        "--steps",
        "20",
        "--batch-size",
        "8",
        "--seq-len",
        "16",
        "--hidden",
        "24",
        "--embed",
        "8",
        "--layers",
        "2",
        "--dtype",
        "float64",
        "--clip-norm",
        "0.5",
        "--eval-every",
        "10",
        "--eval-batches",
        "2",
        "--sample-chars",
        "0",
        "--no-progress",
        *extra,
    ]
    assert cli.main(argv) == 0
    return out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--data", "/no/such/file.txt"], "corpus file not found"),
        (["train", "--clip-norm", "nan"], "--clip-norm must be a positive finite number"),
        (["train", "--steps", "0"], "steps must be a positive integer"),
    ],
)
def test_bad_command_lines_give_one_clear_line(capsys, argv, message):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_bad_corpus_and_prime_give_one_clear_line(tmp_path, capsys):
    runs = {"torch": train_cli(tmp_path, "torch", small_corpus(tmp_path), "--steps", "2")}
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    short = tmp_path / "short.txt"
    short.write_text("to be or not to be", encoding="utf-8")
    cases = [
        (["train", "--data", str(bad)], "not UTF-8"),
        (["train", "--data", str(short)], "fewer than one batch needs"),
        (["sample", str(runs["torch"]), "--prime", "Ωmega"], "outside the model's vocabulary"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_a_run_trained_on_a_relative_path_resumes_and_evaluates_from_elsewhere(
    tmp_path, monkeypatch, capsys
):
    data_dir, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    data_dir.mkdir()
    elsewhere.mkdir()
    small_corpus(data_dir)
    monkeypatch.chdir(data_dir)
    argv = [
        "train",
        "--data",
        "small.txt",
        "--out",
        str(tmp_path / "run"),
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--seq-len",
        "8",
        "--hidden",
        "8",
        "--embed",
        "4",
        "--layers",
        "1",
        "--sample-chars",
        "0",
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert (
        cli.main(
            [
                "train",
                "--resume",
                str(tmp_path / "run"),
                "--steps",
                "6",
                "--lr",
                "0.1",
                "--sample-chars",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "ignored: --lr" in capsys.readouterr().err, (
        "an option --resume does not use is named, not dropped silently"
    )
    assert cli.main(["eval", str(tmp_path / "run")]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 6
