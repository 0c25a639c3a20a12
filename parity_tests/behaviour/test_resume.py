"""Interrupted runs lose nothing: killed, interrupted and resumed runs end bit for bit where an
uninterrupted run ends, and a checkpoint is never caught half-written.

The runs are real `charclip train` processes. Where a kill must land at an exact point (inside a
checkpoint write, just after an update), the child runs the same CLI under a few lines of hook code
(`_HOOK`) that stop it there; the test then delivers a real SIGKILL or SIGINT from outside.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from charclip import checkpoint as ckpt_io
from charclip import corpus
from charclip.batching import Position
from charclip.config import ModelConfig, TrainConfig
from charclip.metrics import read_metrics
from charclip.vocab import Vocab
from charclip.weights import init_params

STEPS, EVERY = 60, 5
# 4,000 characters: 27 batches per epoch, so the runs cross an epoch boundary (hidden state reset).
# With dropout: its masks are keyed by the step, so a resumed run must draw the uninterrupted run's.
TINY = [
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
    "--checkpoint-every",
    str(EVERY),
    "--eval-every",
    "10",
    "--eval-batches",
    "2",
    "--sample-chars",
    "0",
    "--no-progress",
    "--dropout",
    "0.2",
]

# Runs `charclip.cli.main(argv)` after arming one stop point. The child writes `marker` and waits
# in signal.pause() for the test's signal; mode "update" sends itself SIGINT instead.
_HOOK = r"""
import os, signal, sys
from pathlib import Path
mode, at, marker, *argv = sys.argv[1:]
at = int(at)
import charclip.checkpoint as ck
import charclip.backends as backends
import charclip.metrics as metrics
from charclip.cli import main

def stop_here():
    Path(marker).write_text(str(os.getpid()))
    signal.pause()

if mode == "step":  # just after step `at` is logged
    write = metrics.Metrics.write
    def hooked(self, **record):
        write(self, **record)
        if record.get("step") == at and "loss" in record:
            stop_here()
    metrics.Metrics.write = hooked
elif mode == "save":  # inside the write of checkpoint `at`: the model file is written, the rest not
    write_tensors = ck._write_tensors
    def hooked(path, tensors):
        if path.name == ck.STATE_FILE and path.parent.name.startswith(f".step-{at:08d}."):
            stop_here()
        write_tensors(path, tensors)
    ck._write_tensors = hooked
elif mode == "latest":  # checkpoint `at` renamed into place, LATEST not yet pointing at it
    replace = os.replace
    def hooked(src, dst):
        if Path(dst).name == "LATEST" and Path(src).read_text().strip() == f"step-{at:08d}":
            stop_here()
        replace(src, dst)
    os.replace = hooked
elif mode == "update":  # Ctrl-C lands right after this process's `at`-th update, before the loop counts it
    trainer = backends.module(argv[argv.index("--backend") + 1], "train").Trainer
    step = trainer.step
    def hooked(self, x, y, **kw):
        result = step(self, x, y, **kw)
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == at:
            os.kill(os.getpid(), signal.SIGINT)
        return result
    trainer.step = hooked
sys.exit(main(argv))
"""


def _corpus(tmp_path: Path, chars: int = 4000) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(corpus.shakespeare()[:chars], encoding="utf-8")
    return path


def _env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def _cli(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "charclip", *argv],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )


def _stop(
    argv: list[str], mode: str, at: int, marker: Path, sig: int
) -> subprocess.CompletedProcess:
    """Run the CLI until the hook's stop point, then send `sig` from here."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOOK, mode, str(at), str(marker), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if proc.poll() is None:
        assert marker.exists(), f"the child never reached its stop point ({mode} {at})"
        time.sleep(0.05)  # marker written: the child is in (or about to enter) signal.pause()
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    marker.unlink(missing_ok=True)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _kill_when_logged(argv: list[str], metrics: Path, at: int) -> subprocess.CompletedProcess:
    """Plain `python -m charclip train`, killed with SIGKILL once its log shows step `at`."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "charclip", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and any(r.get("step", 0) >= at for r in _records(metrics)):
            proc.kill()
            break
        time.sleep(0.002)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _records(metrics: Path) -> list[dict]:
    records = []
    for line in metrics.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pass  # a line the child is writing right now
    return records


def _latest_step(run: Path) -> int:
    return ckpt_io.load(run).step


def _assert_same_checkpoint(got: Path, want: Path, story: str) -> None:
    from safetensors.numpy import load_file

    for name in (ckpt_io.MODEL_FILE, ckpt_io.STATE_FILE):
        a, b = load_file(str(got / name)), load_file(str(want / name))
        assert sorted(a) == sorted(b), f"{name}: tensors {sorted(set(a) ^ set(b))} differ ({story})"
        for key in b:
            np.testing.assert_array_equal(
                a[key], b[key], err_msg=f"{name}:{key} differs from the uninterrupted run ({story})"
            )
    got_meta = json.loads((got / ckpt_io.META_FILE).read_text(encoding="utf-8"))
    want_meta = json.loads((want / ckpt_io.META_FILE).read_text(encoding="utf-8"))
    assert got_meta == want_meta, f"checkpoint.json differs ({story}): " + str(
        {
            k: (got_meta.get(k), want_meta.get(k))
            for k in want_meta
            if got_meta.get(k) != want_meta.get(k)
        }
    )
    for name in (ckpt_io.MODEL_FILE, ckpt_io.STATE_FILE, ckpt_io.META_FILE, ckpt_io.META_SEAL_FILE):
        assert (got / name).read_bytes() == (want / name).read_bytes(), (
            f"{name} is not byte-identical ({story})"
        )


def _without_time(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_killed_and_resumed_run_ends_bit_identical(tmp_path, backend):
    """SIGKILL at a random step, inside a checkpoint write, between the folder and LATEST, and at another
    random step; then Ctrl-C just after an update; each time resume. The end equals the uninterrupted run."""
    data = _corpus(tmp_path)
    common = ["train", "--backend", backend, "--data", str(data), *TINY]
    ref, run = tmp_path / "reference", tmp_path / "run"
    done = _cli([*common, "--steps", str(STEPS), "--out", str(ref)])
    assert done.returncode == 0, done.stderr
    rng = random.Random(f"kill-{backend}")  # random kill points, the same on every run of the test
    story: list[str] = []
    resume = [
        "train",
        "--backend",
        backend,
        "--resume",
        str(run),
        "--steps",
        str(STEPS),
        "--no-progress",
        "--sample-chars",
        "0",
    ]

    # 1. A plain `charclip train` meant to run a million steps, killed from outside at a random step.
    at = rng.randint(
        EVERY + 1, 2 * EVERY + 2
    )  # past the first checkpoint, so there is one to resume from
    killed = _kill_when_logged(
        [*common, "--steps", "1000000", "--out", str(run)], run / "metrics.jsonl", at
    )
    assert killed.returncode == -signal.SIGKILL, (
        f"the run was not killed: rc {killed.returncode}\n{killed.stderr}"
    )
    logged = max(r["step"] for r in _records(run / "metrics.jsonl") if "loss" in r)
    s = _latest_step(run)
    may_be = {logged // EVERY * EVERY} | (
        {logged - EVERY} if logged % EVERY == 0 else set()
    )  # killed in that save
    assert s in may_be, f"killed after step {logged}, LATEST is step {s}, expected one of {may_be}"
    story.append(f"SIGKILL after step {logged} -> resume from {s}")

    # 2.-4. Kills at exact points, each from the checkpoint the previous one left.
    # A kill inside checkpoint s+2E leaves s+E; one before LATEST moves to s+3E leaves s+2E (and a
    # complete, orphaned s+3E folder that later runs write again); one mid-interval leaves s+2E.
    plan = (
        ("save", s + 2 * EVERY, s + EVERY),
        ("latest", s + 3 * EVERY, s + 2 * EVERY),
        ("step", s + 2 * EVERY + rng.randint(1, EVERY - 1), s + 2 * EVERY),
    )
    for mode, at, expect in plan:
        got = _stop(resume, mode, at, tmp_path / "marker", signal.SIGKILL)
        assert got.returncode == -signal.SIGKILL, f"{mode} {at}: rc {got.returncode}\n{got.stderr}"
        s = _latest_step(run)
        assert s == expect, (
            f"SIGKILL at {mode} {at}: LATEST is step {s}, expected {expect} ({story})"
        )
        story.append(f"SIGKILL at {mode} {at} -> resume from {s}")

    # 5. Ctrl-C just after an update: the run stops at the end of that step, checkpointed and consistent.
    n = rng.randint(1, EVERY - 1)
    got = _stop(resume, "update", n, tmp_path / "marker", signal.SIGINT)
    assert got.returncode == 130, f"Ctrl-C: rc {got.returncode}\n{got.stdout}\n{got.stderr}"
    assert f"interrupted at step {s + n}; checkpoint written to" in got.stdout, got.stdout
    assert "Traceback" not in got.stderr, got.stderr
    assert _latest_step(run) == s + n, (
        f"Ctrl-C after step {s + n}: LATEST is step {_latest_step(run)}"
    )
    story.append(f"SIGINT after the update of step {s + n}")

    done = _cli(resume)
    assert done.returncode == 0, done.stderr
    story = "; ".join(story)
    _assert_same_checkpoint(ckpt_io.resolve(run), ckpt_io.resolve(ref), story)
    got_log, want_log = (
        _without_time(read_metrics(run / "metrics.jsonl")),
        _without_time(read_metrics(ref / "metrics.jsonl")),
    )
    steps = [r["step"] for r in got_log if "loss" in r]
    assert steps == list(range(1, STEPS + 1)), (
        f"logged training steps are not 1..{STEPS} once each: {steps} ({story})"
    )
    first_diff = next((i for i, (a, b) in enumerate(zip(got_log, want_log)) if a != b), None)
    assert got_log == want_log, f"metrics differ ({story}); first at record {first_diff}: " + (
        f"{got_log[first_diff]} vs {want_log[first_diff]}"
        if first_diff is not None
        else f"{len(got_log)} vs {len(want_log)} records"
    )


def test_ctrl_c_writes_a_checkpoint_and_says_where(tmp_path):
    """SIGINT to a plain `charclip train`: exit 130, one line naming the checkpoint, and that checkpoint
    holds exactly the steps the log shows."""
    data = _corpus(tmp_path)
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "charclip",
            "train",
            "--data",
            str(data),
            *TINY,
            "--steps",
            "1000000",
            "--out",
            str(run),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and any(
            r.get("step", 0) >= 7 for r in _records(run / "metrics.jsonl")
        ):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, f"rc {proc.returncode}\n{out}\n{err}"
    assert "Traceback" not in err, err
    lines = [l for l in out.splitlines() if l.startswith("charclip: interrupted at step")]
    assert len(lines) == 1, out
    step = int(lines[0].split()[4].rstrip(";"))
    path = Path(lines[0].split("checkpoint written to ")[1].split(";")[0])
    ck = ckpt_io.load(path)
    logged = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert ck.step == step == logged[-1], (
        f"message says {step}, checkpoint holds {ck.step}, log ends at {logged[-1]}"
    )
    assert logged == list(range(1, step + 1)), f"logged steps: {logged}"
    assert f"--resume {run}" in lines[0], lines[0]


class _Crash(Exception):
    """Stands for the process dying at this point: nothing after it runs."""


def _checkpoint(step: int, seed: int) -> ckpt_io.Checkpoint:
    vocab = Vocab("abcdef")
    model = ModelConfig(vocab_size=len(vocab), hidden_size=8, num_layers=1, embedding_dim=4)
    train = TrainConfig(batch_size=2, seq_len=4, steps=100)
    params = init_params(model, seed, "float32")
    adam = {"step": np.array(step, np.int64)}
    adam.update(
        {
            f"{m}.{k}": np.full_like(v, seed)
            for m in ("exp_avg", "exp_avg_sq")
            for k, v in params.items()
        }
    )
    hidden = {part: np.full((1, 2, 8), seed, np.float32) for part in ("h", "c")}
    return ckpt_io.Checkpoint(
        model=model,
        train=train,
        vocab=vocab,
        params=params,
        step=step,
        position=Position(0, step),
        backend="torch",
        corpus={"path": None},
        adam=adam,
        hidden=hidden,
    )


@pytest.mark.parametrize("same_step", [False, True], ids=["next-step", "same-step-again"])
def test_a_crash_anywhere_in_save_leaves_a_whole_checkpoint(tmp_path, monkeypatch, same_step):
    """Stop `save` at each of its file-system operations in turn, leaving that operation half done
    (a truncated file, a half-deleted folder); the run folder then loads as the old or the new
    checkpoint, whole."""
    import shutil

    old, new = _checkpoint(3, seed=1), _checkpoint(3 if same_step else 6, seed=2)
    real = {
        "write": ckpt_io._write_tensors,
        "replace": os.replace,
        "rmtree": shutil.rmtree,
        "dump": json.dump,
    }
    outcomes = []
    for n in range(200):
        run = tmp_path / f"run{n}"
        ckpt_io.save(run, old)
        calls = [0]

        def arm(op, half_done):
            def hooked(*args, **kwargs):
                calls[0] += 1
                if calls[0] == n + 1:
                    half_done(*args, **kwargs)
                    raise _Crash(op)
                return real[op](*args, **kwargs)

            return hooked

        def half_write(path, tensors):
            real["write"](path, tensors)
            Path(path).write_bytes(Path(path).read_bytes()[:40])

        def half_rmtree(path, ignore_errors=False):
            files = sorted(p for p in Path(path).rglob("*") if p.is_file())
            if files:
                files[0].unlink()

        def half_dump(obj, f, **kwargs):
            f.write(json.dumps(obj)[:30])

        monkeypatch.setattr(ckpt_io, "_write_tensors", arm("write", half_write))
        monkeypatch.setattr(os, "replace", arm("replace", lambda *a, **k: None))
        monkeypatch.setattr(shutil, "rmtree", arm("rmtree", half_rmtree))
        monkeypatch.setattr(json, "dump", arm("dump", half_dump))
        try:
            ckpt_io.save(run, new)
            crashed = None
        except _Crash as e:
            crashed = str(e)
        monkeypatch.undo()
        got = ckpt_io.load(run)
        which = [
            c
            for c in (old, new)
            if got.step == c.step
            and all(np.array_equal(got.params[k], c.params[k]) for k in c.params)
        ]
        assert which, (
            f"crash {n} ({crashed}): loaded step {got.step} equals neither the old nor the new checkpoint"
        )
        for k, v in which[-1].adam.items():
            np.testing.assert_array_equal(
                got.adam[k], v, err_msg=f"crash {n} ({crashed}): adam {k} mixed up"
            )
        outcomes.append((crashed, "new" if which[-1] is new else "old"))
        if crashed is None:
            break
    assert outcomes[-1] == (None, "new"), f"save never completed: {outcomes}"
    assert len(outcomes) > 5, f"too few crash points exercised: {outcomes}"


def test_leftovers_of_a_killed_writer_are_removed_by_the_next_save(tmp_path):
    run = tmp_path / "run"
    ckpt_io.save(run, _checkpoint(3, seed=1))
    root = run / "checkpoints"
    (root / ".step-00000006.tmp999999").mkdir()  # a writer killed mid-save leaves these
    (root / ".step-00000006.tmp999999" / "model.safetensors").write_bytes(b"half")
    (root / ".LATEST.tmp999999").write_text("step-00000006\n")
    ckpt_io.save(run, _checkpoint(6, seed=2))
    assert sorted(p.name for p in root.iterdir()) == ["LATEST", "step-00000003", "step-00000006"]
    assert ckpt_io.load(run).step == 6


# ---- fault injection: a run killed (or refused a write) at any file-system call -------------------
#
# Every call the checkpoint and metrics writers make to the file system (os.replace, os.fsync,
# os.link, os.mkdir, shutil.rmtree, the safetensors write, json.dump, each metrics line) is
# counted in an uninterrupted reference run. Then, for each chosen call k, a fresh run is made
# to fail at its k-th call, either dying there ("kill": the call is left half done, nothing after
# it runs) or getting an OSError (ENOSPC) back. After each: LATEST names a whole checkpoint, the
# metrics log is whole (a torn last line aside) and covers that checkpoint's steps, and resuming
# ends bit-identical to the reference. The CI subset takes 12 points of each kind; set
# CHARCLIP_FAULTS=all to take every point (the count is printed with -s).

FAULT_STEPS = 12
FAULT_ARGS = [
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
    "--checkpoint-every",
    "4",
    "--eval-every",
    "4",
    "--eval-batches",
    "1",
    "--sample-chars",
    "0",
    "--no-progress",
]


class _Dying(BaseException):
    """The process dies at this call (BaseException: no handler on the way catches it)."""


class _Faults:
    """Counts the writers' file-system calls; makes the `at`-th one fail as `how` ("kill" or "enospc")."""

    def __init__(self, monkeypatch, at: int | None = None, how: str = "kill"):
        import shutil

        from charclip import run as run_mod

        self.calls, self.at, self.how, self.where = 0, at, how, None
        real = {
            "replace": os.replace,
            "fsync": os.fsync,
            "link": os.link,
            "mkdir": os.mkdir,
            "rmtree": shutil.rmtree,
            "tensors": ckpt_io._write_tensors,
            "dump": json.dump,
            "line": run_mod.Metrics.write,
        }

        def half(name, *args, **kwargs):  # what a kill in the middle of the call leaves behind
            if name == "tensors":
                real["tensors"](*args, **kwargs)
                Path(args[0]).write_bytes(Path(args[0]).read_bytes()[:40])
            elif name == "dump":
                args[1].write(json.dumps(args[0])[:30])
            elif name == "line":
                args[0].file.write(json.dumps(kwargs)[:17])

        def wrap(name):
            def call(*args, **kwargs):
                self.calls += 1
                if self.calls == self.at:
                    self.where = name
                    if self.how == "kill":
                        half(name, *args, **kwargs)
                        raise _Dying(name)
                    if not (
                        name == "rmtree" and kwargs.get("ignore_errors")
                    ):  # that call cannot fail
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return real[name](*args, **kwargs)

            return call

        for name, (owner, attr) in {
            "replace": (os, "replace"),
            "fsync": (os, "fsync"),
            "link": (os, "link"),
            "mkdir": (os, "mkdir"),
            "rmtree": (shutil, "rmtree"),
            "tensors": (ckpt_io, "_write_tensors"),
            "dump": (json, "dump"),
            "line": (run_mod.Metrics, "write"),
        }.items():
            monkeypatch.setattr(owner, attr, wrap(name))


def _fault_points(n: int) -> list[int]:
    if os.environ.get("CHARCLIP_FAULTS") == "all":
        return list(range(1, n + 1))
    return sorted(random.Random("faults").sample(range(1, n + 1), min(12, n)))


@pytest.fixture(scope="module")
def fault_reference(tmp_path_factory):
    from charclip.cli import main

    root = tmp_path_factory.mktemp("faults")
    data = _corpus(root, 3000)
    mp = pytest.MonkeyPatch()
    counter = _Faults(mp)
    try:
        assert (
            main(
                [
                    "train",
                    "--data",
                    str(data),
                    "--out",
                    str(root / "ref"),
                    "--steps",
                    str(FAULT_STEPS),
                    *FAULT_ARGS,
                ]
            )
            == 0
        )
    finally:
        mp.undo()
    return data, root / "ref", counter.calls


@pytest.mark.parametrize("how", ["kill", "enospc"])
def test_fault_injection_at_the_writers_file_system_calls(
    fault_reference, tmp_path, monkeypatch, capsys, how
):
    from charclip.cli import main

    data, ref, n = fault_reference
    points = _fault_points(n)
    with capsys.disabled():
        print(
            f"\nfault injection ({how}): {len(points)} of {n} file-system calls of a {FAULT_STEPS}-step run"
        )
    fresh = ["train", "--data", str(data), "--steps", str(FAULT_STEPS), *FAULT_ARGS]
    for k in points:
        out = tmp_path / f"{how}-{k}"
        faults = _Faults(monkeypatch, at=k, how=how)
        try:
            rc = main([*fresh, "--out", str(out)])
        except _Dying:
            rc = "killed"
        monkeypatch.undo()
        story = f"{how} at call {k} ({faults.where})"
        err = capsys.readouterr().err
        if (
            how == "enospc" and rc != 0
        ):  # 0 where the failure was harmless (mkdir of a folder that exists)
            assert rc == 2 and err.strip().splitlines()[-1].startswith("charclip: error: "), (
                f"{story}: rc {rc}, {err}"
            )
            assert "Traceback" not in err, f"{story}: {err}"
        try:
            ck = ckpt_io.load(out)
        except (
            Exception
        ):  # no checkpoint yet: the run starts again, replacing the folder on request
            ck = None
            assert not (out / "checkpoints" / "LATEST").exists(), (
                f"{story}: LATEST exists but does not load"
            )
        lines = (
            (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
            if (out / "metrics.jsonl").exists()
            else []
        )
        records = []
        for i, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except ValueError:
                assert i == len(lines) - 1, f"{story}: metrics line {i + 1} of {len(lines)} is torn"
        logged = [r["step"] for r in records if "loss" in r]
        assert logged == list(range(1, len(logged) + 1)), f"{story}: logged steps {logged}"
        if ck is not None:
            assert len(logged) >= ck.step, (
                f"{story}: the log ends at step {len(logged)}, before the checkpoint {ck.step}"
            )
            again = [
                "train",
                "--resume",
                str(out),
                "--steps",
                str(FAULT_STEPS),
                "--no-progress",
                "--sample-chars",
                "0",
            ]
        else:
            again = [*fresh, "--out", str(out), "--overwrite"]
        if (
            ck is None or ck.step < FAULT_STEPS
        ):  # else the final checkpoint was whole before the failing call
            assert main(again) == 0, f"{story}: the rerun failed: {capsys.readouterr().err}"
        capsys.readouterr()
        _assert_same_checkpoint(ckpt_io.resolve(out), ckpt_io.resolve(ref), story)
        got = _without_time(read_metrics(out / "metrics.jsonl"))
        want = _without_time(read_metrics(ref / "metrics.jsonl"))
        assert got == want, f"{story}: metrics differ from the uninterrupted run"
    assert len(points) >= 12 or os.environ.get("CHARCLIP_FAULTS") == "all", points
