"""DDP and FSDP2 on 2 and 4 processes equal one process on the same global batch.

One process group per world size runs every case (`charclip.torch.distributed.launch`,
gloo on the CPU); the single-process runs are computed here with
`charclip.torch.train.Trainer`. Compared directly, step by step: the global norm and the
clipped gradient (read by an optimizer pre-step hook, after clipping, before Adam);
after the last step, the parameters, Adam's moments and the carried hidden state.
Adam is nearly scale-invariant, so the parameters alone would hide a wrong norm.

Two negative controls run the same check on deliberately wrong clipping and must
fail it: FSDP ranks that clip by their own slice's norm, and DDP ranks that sum
their (already identical) squared norms, counting every tensor once per rank.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from charclip import checkpoint, dropout
from charclip.config import ClipConfig, ModelConfig, TrainConfig
from charclip.torch import distributed as D
from charclip.torch.train import Trainer
from charclip.weights import init_params

WORLDS = (2, 4)
STEPS = 3
MODEL = ModelConfig(
    vocab_size=13, cell="lstm", hidden_size=6, num_layers=2, embedding_dim=5
)  # 13, 5: uneven slices
BATCH, SEQ = 8, 5
TAU_ACTIVE, TAU_IDLE = 0.05, 1e3  # the gradient norm here is about 0.1 to 0.3
# (parallel, dtype, max_norm, clip impl, variant); variant "" is the plain run.
CASES = [
    (par, dt, tau, "library", "")
    for par in D.PARALLEL
    for dt in ("float64", "float32")
    for tau in (TAU_ACTIVE, TAU_IDLE)
]
CASES += [
    (par, dt, TAU_ACTIVE, "reference", "") for par in D.PARALLEL for dt in ("float64", "float32")
]
CASES += [
    (par, "float64", TAU_ACTIVE, "library", "resume") for par in D.PARALLEL
]  # Adam and hidden state reloaded after 2 steps
CASES += [
    (par, "float64", TAU_ACTIVE, "library", "dropout") for par in D.PARALLEL
]  # global masks, each rank its rows
CONTROLS = [
    ("fsdp", "float64", TAU_ACTIVE, "library", "per_shard"),
    ("ddp", "float64", TAU_ACTIVE, "library", "counted_per_rank"),
]
# Relative to the largest magnitude compared. The ranks sum the batch in another order,
# so results differ by rounding: measured at most 1.1e-15 in float64 and 6e-7 (10 ulp
# of 2**-24) in float32, over STEPS steps of backward, clip and Adam.
TOL = {"float64": 1e-12, "float32": 2e-6}


def _config(dtype: str, tau: float, impl: str, variant: str = "") -> TrainConfig:
    return TrainConfig(
        steps=STEPS,
        batch_size=BATCH,
        seq_len=SEQ,
        lr=1e-2,
        dtype=dtype,
        clip=ClipConfig(max_norm=tau, impl=impl),
        dropout=0.3 if variant == "dropout" else 0.0,
    )


def _batches():
    rng = np.random.default_rng(7)
    return [
        (
            rng.integers(0, MODEL.vocab_size, (BATCH, SEQ)),
            rng.integers(0, MODEL.vocab_size, (BATCH, SEQ)),
        )
        for _ in range(STEPS)
    ]


def _module(trainer):
    return getattr(
        trainer, "module", trainer.model
    )  # DistributedTrainer keeps the CharRNN apart from its wrapper


def _record(trainer, batches, record=None) -> dict:
    """Run the steps; return norms, clipped gradients per step, and the final state, as NumPy."""
    record = record or {"norm": [], "grads": []}

    def grab(optimizer, args, kwargs):  # after clipping, before Adam: what Adam is fed
        record["grads"].append(
            {
                n: D._full(p.grad).detach().numpy().copy()
                for n, p in _module(trainer).named_parameters()
            }
        )

    handle = trainer.optimizer.register_step_pre_hook(grab)
    for (
        x,
        y,
    ) in (
        batches
    ):  # the dropout masks of the global batch (None without dropout), as charclip.run draws them
        masks = dropout.masks(MODEL, trainer.cfg, len(record["norm"]), *x.shape)
        record["norm"].append(trainer.step(x, y, masks=masks).grad_norm)
    handle.remove()
    record.update(
        params=trainer.params_numpy(), adam=trainer.adam_state(), hidden=trainer.hidden_state()
    )
    return record


def _wrong_clip(trainer, variant: str, tau: float):
    """A `_clip` that measures the norm wrongly (and clips by it), for the negative controls."""
    import torch.distributed as dist

    def per_shard():
        grads = [p.grad.to_local() for p in trainer.module.parameters()]  # this rank's slices only
        norm = torch.nn.utils.get_total_norm(grads)
        for g in grads:
            g.mul_(torch.clamp(tau / (norm + 1e-6), max=1.0))
        return norm

    def counted_per_rank():
        grads = [
            p.grad for p in trainer.module.parameters()
        ]  # whole and identical on every rank after DDP
        sq = torch.nn.utils.get_total_norm(grads) ** 2
        dist.all_reduce(sq)  # as if the ranks held different parts: each tensor counted N times
        norm = sq.sqrt()
        torch.nn.utils.clip_grads_with_norm_(trainer.module.parameters(), tau, norm)
        return norm

    return {"per_shard": per_shard, "counted_per_rank": counted_per_rank}[variant]


def _run_case(case) -> dict:
    parallel, dtype, tau, impl, variant = case
    cfg = _config(dtype, tau, impl, variant)
    batches = _batches()
    trainer = D.DistributedTrainer(MODEL, cfg, init_params(MODEL, 0, dtype), parallel=parallel)
    if variant in ("per_shard", "counted_per_rank"):
        trainer._clip = _wrong_clip(trainer, variant, tau)
    if variant != "resume":
        return _record(trainer, batches)
    first = _record(
        trainer, batches[:2]
    )  # then a fresh trainer from the gathered state, as a resumed run builds
    resumed = D.DistributedTrainer(
        MODEL, cfg, first["params"], parallel=parallel, adam=first["adam"], hidden=first["hidden"]
    )
    return _record(resumed, batches[2:], {"norm": first["norm"], "grads": first["grads"]})


def _worker(rank: int, world: int, cases):
    """Every rank runs every case; rank 0 returns the records."""
    return [_run_case(case) for case in cases]


@pytest.fixture(scope="module")
def runs() -> dict:
    """{(world, case): record}: one process group per world size, started once for the module."""
    out = {}
    for world in WORLDS:
        for case, record in zip(CASES + CONTROLS, D.launch(_worker, world, CASES + CONTROLS)):
            out[world, case] = record
    return out


_single_cache: dict = {}


def _single(case) -> dict:
    """One process, the whole batch: what every distributed run must equal."""
    _, dtype, tau, impl, variant = case
    key = (dtype, tau, impl, variant == "dropout")
    if key not in _single_cache:
        cfg = _config(dtype, tau, impl, variant)
        _single_cache[key] = _record(Trainer(MODEL, cfg, init_params(MODEL, 0, dtype)), _batches())
    return _single_cache[key]


def _close(what: str, got, want, tol: float) -> None:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(np.max(np.abs(want)), 1e-300)
    err = np.max(np.abs(got - want)) / scale
    assert err <= tol, f"{what}: max |difference| / max |value| = {err:.3g} > {tol:g}"


def _check(record: dict, want: dict, tol: float) -> None:
    """The distributed record equals the single-process one: norms, clipped gradients, final state."""
    assert len(record["grads"]) == len(want["grads"]) == STEPS, (
        "the pre-step hook did not see every step"
    )
    _close("global norm", record["norm"], want["norm"], tol)
    for step, (g, w) in enumerate(zip(record["grads"], want["grads"], strict=True)):
        for name in w:
            _close(f"clipped gradient {name} at step {step + 1}", g[name], w[name], tol)
    for part in ("params", "adam", "hidden"):
        assert record[part].keys() == want[part].keys(), f"{part}: names differ"
        for name in want[part]:
            _close(f"{part} {name} after {STEPS} steps", record[part][name], want[part][name], tol)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c if v != ""))
def test_equals_one_process(runs, world, case):
    want = _single(case)
    tau = case[2]
    if tau == TAU_ACTIVE:
        assert min(want["norm"]) > tau, (
            f"clipping was meant to act on every step: norms {want['norm']}"
        )
    else:
        assert max(want["norm"]) < tau, f"clipping was meant to stay idle: norms {want['norm']}"
    _check(runs[world, case], want, TOL[case[1]])


@pytest.mark.parametrize("world", WORLDS)
def test_per_shard_norm_is_caught(runs, world):
    """FSDP ranks clipping by their own slice's norm: smaller than the global norm, different per rank."""
    case = CONTROLS[0]
    record, want = runs[world, case], _single(case)
    assert all(n < w for n, w in zip(record["norm"], want["norm"])), (record["norm"], want["norm"])
    with pytest.raises(AssertionError, match="global norm"):
        _check(record, want, TOL["float64"])


@pytest.mark.parametrize("world", WORLDS)
def test_replicated_gradient_counted_per_rank_is_caught(runs, world):
    """Summing the squared norms of DDP's identical gradients over N ranks gives sqrt(N) times the norm."""
    case = CONTROLS[1]
    record, want = runs[world, case], _single(case)
    _close(
        "norm / sqrt(N) on the first step",
        record["norm"][0] / np.sqrt(world),
        want["norm"][0],
        TOL["float64"],
    )
    with pytest.raises(AssertionError, match="global norm"):
        _check(record, want, TOL["float64"])


# ---- the command line: rank 0 writes the usual checkpoint; failures are one line ----


def _cli(tmp_path, corpus, out, *extra, **popen):
    args = [
        sys.executable,
        "-m",
        "charclip",
        "train",
        "--backend",
        "torch",
        "--data",
        str(corpus),
        "--out",
        str(out),
        "--batch-size",
        "8",
        "--seq-len",
        "16",
        "--hidden",
        "12",
        "--embed",
        "6",
        "--layers",
        "1",
        "--lr",
        "0.01",
        "--clip-norm",
        "0.5",
        "--eval-every",
        "4",
        "--eval-batches",
        "2",
        "--sample-chars",
        "0",
        "--no-progress",
        *extra,
    ]
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from parity_tests.helpers import small_corpus

    return small_corpus(tmp_path_factory.mktemp("corpus"))


def test_cli_fsdp_checkpoint_equals_one_process(tmp_path, corpus):
    from charclip import run

    p = _cli(
        tmp_path,
        corpus,
        tmp_path / "fsdp",
        "--nproc",
        "2",
        "--parallel",
        "fsdp",
        "--steps",
        "6",
        "--checkpoint-every",
        "3",
        "--dtype",
        "float64",
    )
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    cfg = TrainConfig(
        steps=6,
        batch_size=8,
        seq_len=16,
        lr=0.01,
        dtype="float64",
        eval_every=4,
        eval_batches=2,
        checkpoint_every=3,
        clip=ClipConfig(max_norm=0.5),
    )
    one = run.train(
        ModelConfig(vocab_size=1, hidden_size=12, num_layers=1, embedding_dim=6),
        cfg,
        backend="torch",
        out_dir=tmp_path / "one",
        data_path=str(corpus),
        progress=False,
        sample_chars=0,
        log=lambda *a: None,
    )
    got, want = checkpoint.load(tmp_path / "fsdp"), checkpoint.load(one["checkpoint"])
    assert got.step == want.step == 6 and got.backend == "torch"
    for part in ("params", "adam", "hidden"):
        for name in getattr(want, part):
            _close(
                f"checkpoint {part} {name}",
                getattr(got, part)[name],
                getattr(want, part)[name],
                TOL["float64"],
            )
    norms = [
        r["grad_norm"]
        for r in run.read_metrics(tmp_path / "fsdp" / "metrics.jsonl")
        if "grad_norm" in r
    ]
    want_norms = [r["grad_norm"] for r in run.read_metrics(one["metrics"]) if "grad_norm" in r]
    _close("logged global norms", norms, want_norms, TOL["float64"])
    assert (tmp_path / "fsdp" / "training.png").is_file()


def _rank_pids(launcher: int) -> list[int]:
    kids = [int(c) for c in open(f"/proc/{launcher}/task/{launcher}/children").read().split()]
    return sorted(k for k in kids if b"spawn_main" in open(f"/proc/{k}/cmdline", "rb").read())


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="finds the rank processes in /proc"
)
def test_dead_rank_is_one_line_and_leaves_whole_checkpoints(tmp_path, corpus):
    out = tmp_path / "run"
    p = _cli(tmp_path, corpus, out, "--nproc", "2", "--steps", "100000", "--checkpoint-every", "5")
    deadline = time.monotonic() + 240
    while not (out / "checkpoints" / "LATEST").exists():
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.05)
    os.kill(_rank_pids(p.pid)[-1], signal.SIGKILL)  # the rank started last: a follower
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2, err
    assert err.count("\n") == 1 and err.startswith("charclip: error: rank 1 of 2 died (SIGKILL)"), (
        err
    )
    ck = checkpoint.load(out)  # LATEST names a whole checkpoint; its hashes are verified on load
    assert ck.step > 0 and (
        ck.step % 5 == 0 or ck.step % 4 == 0
    )  # periodic, or a new best validation (every 4)
    assert f"the last whole checkpoint is step {ck.step}: continue with --resume {out}" in err, err
    assert [d.name for d in (out / "checkpoints").iterdir() if d.name.startswith(".")] == [], (
        "a half-written folder remains"
    )


def test_ctrl_c_stops_every_rank_with_a_checkpoint(tmp_path, corpus):
    """SIGINT to the whole process group, as a terminal sends it: rank 0 finishes the step, gathers, saves."""
    out = tmp_path / "run"
    p = _cli(
        tmp_path,
        corpus,
        out,
        "--nproc",
        "2",
        "--parallel",
        "fsdp",
        "--steps",
        "100000",
        "--checkpoint-every",
        "1000",
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not (out / "metrics.jsonl").exists() or (out / "metrics.jsonl").stat().st_size < 500:
            if p.poll() is not None or time.monotonic() >= deadline:  # ended, or stuck: no wait
                with contextlib.suppress(ProcessLookupError):  # the group may be gone already
                    os.killpg(p.pid, signal.SIGKILL)
                pytest.fail(f"no 500 bytes of metrics in 240 s: {p.communicate()}")
            time.sleep(0.05)
        os.killpg(p.pid, signal.SIGINT)
        stdout, err = p.communicate(timeout=120)
    finally:  # a failure here must not leave the ranks training 100000 steps in the background
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
    assert p.returncode == 130, err
    ck = checkpoint.load(out)
    assert f"interrupted at step {ck.step}; checkpoint written" in stdout, stdout
    assert (
        ck.hidden["h"].shape == (1, 8, 12) and ck.adam["step"] == ck.step
    )  # gathered whole from both ranks


def test_port_taken_is_one_line(tmp_path, corpus, monkeypatch, capsys):
    import socket

    from charclip import cli

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        monkeypatch.setenv("MASTER_PORT", str(s.getsockname()[1]))
        code = cli.main(
            [
                "train",
                "--backend",
                "torch",
                "--nproc",
                "2",
                "--data",
                str(corpus),
                "--out",
                str(tmp_path / "r"),
                "--steps",
                "2",
                "--batch-size",
                "8",
            ]
        )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "port" in err and "MASTER_PORT" in err, err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_uneven_batch_is_one_line(tmp_path, corpus, capsys):
    from charclip import cli

    code = cli.main(
        [
            "train",
            "--backend",
            "torch",
            "--nproc",
            "3",
            "--data",
            str(corpus),
            "--out",
            str(tmp_path / "r"),
            "--steps",
            "2",
            "--batch-size",
            "8",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--nproc 3" in err, err
