"""The run folder is the user's data (issue 14): nothing wipes it, no two writers share it, no signal
loses it, and hostile paths or sizes end in one line instead of a hang, a traceback or a full memory.

Most cases run `charclip.cli.main` in-process on a tiny model (a few steps, milliseconds each).
Signals are sent to this very process from inside the loop (pytest runs in the main thread, so
the CLI's handlers are live). Only what needs separate processes spawns them: the real SIGTERM
of a plain run, and the launcher of `--nproc 2` killed under its ranks.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from charclip import checkpoint as ckpt_io
from charclip import corpus, run, runfolder
from charclip.cli import main
from charclip.errors import CharclipError
from charclip.metrics import Metrics, describe_clipped, read_metrics
from parity_tests.helpers import rewrite_meta

TINY = [
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


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(corpus.shakespeare()[:3000], encoding="utf-8")
    return path


def _train(text, out, *extra) -> list[str]:
    return ["train", "--data", str(text), "--out", str(out), *TINY, *extra]


def _one_error_line(capsys, rc: int) -> str:
    out, err = capsys.readouterr()
    lines = [l for l in err.strip().splitlines() if not l.startswith("charclip: note:")]
    assert rc == 2, f"exit status {rc}, expected 2; stderr: {err}"
    assert len(lines) == 1 and lines[0].startswith("charclip: error: "), (
        f"stderr is not one error line: {err!r}"
    )
    assert "Traceback" not in out + err
    return lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below `folder` (the lock file aside), with its bytes: what "untouched" means."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != runfolder.LOCK_FILE
    }


def _steps(metrics: Path) -> list[int]:
    return [r["step"] for r in read_metrics(metrics) if "loss" in r]


@pytest.fixture
def finished(text, tmp_path, capsys) -> Path:
    """A finished 8-step run."""
    out = tmp_path / "run"
    assert main(_train(text, out, "--steps", "8")) == 0
    capsys.readouterr()
    return out


# ---- 2. a rerun into an existing run folder ------------------------------------------------


def test_rerun_into_a_finished_run_is_refused_and_touches_nothing(text, finished, capsys):
    before = _snapshot(finished)
    line = _one_error_line(capsys, main(_train(text, finished, "--steps", "3")))
    assert "--resume" in line and "--out" in line and "--overwrite" in line, line
    assert _snapshot(finished) == before, "a refused rerun changed the run folder"


def test_a_non_empty_folder_that_is_no_run_is_refused_too(text, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    _one_error_line(capsys, main(_train(text, out, "--steps", "2")))
    assert (
        sorted(p.name for p in out.iterdir()) == ["notes.txt"]
        and (out / "notes.txt").read_text() == "keep me"
    )


def test_overwrite_replaces_the_earlier_run_on_request(text, finished, capsys):
    assert main(_train(text, finished, "--steps", "3", "--overwrite")) == 0
    assert _steps(finished / "metrics.jsonl") == [1, 2, 3]
    assert sorted(p.name for p in (finished / "checkpoints").glob("step-*")) == ["step-00000003"]


# ---- 3. two writers ---------------------------------------------------------------------------


def test_a_second_writer_is_refused_with_the_holders_pid(text, finished, capsys):
    before = _snapshot(finished)
    with runfolder.Lock(
        finished
    ):  # another process's run, as far as the lock can tell (flock is per open file)
        for argv in (
            _train(text, finished, "--steps", "3", "--overwrite"),
            [
                "train",
                "--resume",
                str(finished),
                "--steps",
                "12",
                "--no-progress",
                "--sample-chars",
                "0",
            ],
        ):
            line = _one_error_line(capsys, main(argv))
            assert f"pid {os.getpid()}" in line and "in use" in line, line
    assert _snapshot(finished) == before, "a refused second writer changed the run folder"


def test_the_lock_is_held_for_the_whole_run_including_a_resume(text, finished, monkeypatch, capsys):
    """While a resumed run trains, a second resume of the same folder is refused."""
    refused = []
    write = Metrics.write

    def hooked(self, **record):
        write(self, **record)
        if record.get("step") == 10 and "loss" in record and not refused:
            refused.append(
                main(
                    [
                        "train",
                        "--resume",
                        str(finished),
                        "--steps",
                        "20",
                        "--no-progress",
                        "--sample-chars",
                        "0",
                    ]
                )
            )

    monkeypatch.setattr(Metrics, "write", hooked)
    assert (
        main(
            [
                "train",
                "--resume",
                str(finished),
                "--steps",
                "12",
                "--no-progress",
                "--sample-chars",
                "0",
            ]
        )
        == 0
    )
    assert refused == [2], f"the nested resume returned {refused}"
    assert "in use by another charclip run" in capsys.readouterr().err
    assert _steps(finished / "metrics.jsonl") == list(range(1, 13))


# ---- 4. the metrics history -----------------------------------------------------------------


class _Crash(BaseException):
    """Stands for the process dying here (BaseException: nothing on the way catches it)."""


def test_a_kill_during_the_metrics_rewrite_leaves_the_whole_old_history(finished, monkeypatch):
    before = (finished / "metrics.jsonl").read_bytes()
    replace = os.replace

    def hooked(src, dst):
        if Path(dst).name == "metrics.jsonl":
            raise _Crash
        replace(src, dst)

    monkeypatch.setattr(os, "replace", hooked)
    with pytest.raises(_Crash):
        main(
            [
                "train",
                "--resume",
                str(finished),
                "--steps",
                "12",
                "--no-progress",
                "--sample-chars",
                "0",
            ]
        )
    monkeypatch.undo()
    assert (finished / "metrics.jsonl").read_bytes() == before


def test_resuming_an_older_step_folder_then_dying_loses_no_step(finished, monkeypatch, capsys):
    """Resume from step 4 while LATEST is 8, die before the next checkpoint: the next plain resume
    continues from step 4 (LATEST moved back with the metrics), so steps 5.. are all logged again."""
    write = Metrics.write

    def dying(self, **record):
        write(self, **record)
        if record.get("step") == 6 and "loss" in record:
            raise _Crash

    monkeypatch.setattr(Metrics, "write", dying)
    with pytest.raises(_Crash):
        main(
            [
                "train",
                "--resume",
                str(finished / "checkpoints" / "step-00000004"),
                "--no-progress",
                "--sample-chars",
                "0",
            ]
        )
    monkeypatch.undo()
    assert ckpt_io.load(finished).step == 4, "LATEST still names the abandoned step 8"
    assert main(["train", "--resume", str(finished), "--no-progress", "--sample-chars", "0"]) == 0
    assert _steps(finished / "metrics.jsonl") == list(range(1, 9))


def test_time_continues_on_resume(finished):
    kept = [r["time"] for r in read_metrics(finished / "metrics.jsonl") if "loss" in r]
    assert (
        main(
            [
                "train",
                "--resume",
                str(finished),
                "--steps",
                "11",
                "--no-progress",
                "--sample-chars",
                "0",
            ]
        )
        == 0
    )
    times = [r["time"] for r in read_metrics(finished / "metrics.jsonl") if "loss" in r]
    assert times[:8] == kept and all(b >= a for a, b in zip(times, times[1:])), (
        f"time column restarted: {times}"
    )


@pytest.mark.parametrize(
    "damage", ['{"step": "x"}', '{"step": null}', '{"step": true, "loss": 1}', "[1, 2]", "{", "dir"]
)
def test_a_damaged_metrics_file_does_not_crash_resume(finished, capsys, damage):
    metrics = finished / "metrics.jsonl"
    if damage == "dir":
        metrics.unlink()
        metrics.mkdir()
        line = _one_error_line(
            capsys,
            main(
                [
                    "train",
                    "--resume",
                    str(finished),
                    "--steps",
                    "10",
                    "--no-progress",
                    "--sample-chars",
                    "0",
                ]
            ),
        )
        assert "is not a file" in line, line
        return
    metrics.write_text(metrics.read_text() + damage + "\n")
    assert (
        main(
            [
                "train",
                "--resume",
                str(finished),
                "--steps",
                "10",
                "--no-progress",
                "--sample-chars",
                "0",
            ]
        )
        == 0
    )
    assert _steps(metrics) == list(range(1, 11))


# ---- 5. signals -------------------------------------------------------------------------------


def _signal_at(monkeypatch, step: int, signum: int) -> None:
    """Deliver `signum` to this process right after step `step` is logged (inside the loop)."""
    write = Metrics.write

    def hooked(self, **record):
        write(self, **record)
        if record.get("step") == step and "loss" in record:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(Metrics, "write", hooked)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_stop_like_ctrl_c(text, tmp_path, monkeypatch, capsys, signum):
    out = tmp_path / "run"
    _signal_at(monkeypatch, 6, signum)
    previous = signal.signal(
        signum, signal.SIG_DFL
    )  # as a terminal leaves it (nohup would ignore SIGHUP, and a run keeps that)
    try:
        with pytest.raises(SystemExit) as stop:
            main(_train(text, out, "--steps", "100"))
    finally:
        signal.signal(signum, previous)
    assert stop.value.code == 128 + signum
    said = capsys.readouterr().out
    assert (
        f"interrupted at step 6; checkpoint written to {out / 'checkpoints' / 'step-00000006'}"
        in said
    ), said
    assert ckpt_io.load(out).step == 6 and _steps(out / "metrics.jsonl") == list(range(1, 7))


def test_an_ignored_sigint_stays_ignored(text, tmp_path, monkeypatch):
    """A background job started with SIGINT ignored: a SIGINT mid-run changes nothing."""
    out = tmp_path / "run"
    _signal_at(monkeypatch, 3, signal.SIGINT)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert main(_train(text, out, "--steps", "6")) == 0
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert _steps(out / "metrics.jsonl") == list(range(1, 7))


def test_ctrl_c_during_start_up_is_one_line(text, tmp_path, monkeypatch, capsys):
    read = corpus.read_text

    def interrupted(path):
        os.kill(os.getpid(), signal.SIGINT)
        return read(path)

    monkeypatch.setattr(corpus, "read_text", interrupted)
    rc = main(_train(text, tmp_path / "run", "--steps", "6"))
    out, err = capsys.readouterr()
    assert rc == 130 and err.strip().splitlines() == ["charclip: interrupted (SIGINT)"], (rc, err)
    assert not (tmp_path / "run").exists()


def test_sigterm_to_the_real_command_checkpoints_and_exits_143(text, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "charclip", *_train(text, out, "--steps", "1000000")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    _wait_for_step(proc, out / "metrics.jsonl", 5)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, f"rc {proc.returncode}\n{stdout}\n{stderr}"
    assert "Traceback" not in stderr, stderr
    step = ckpt_io.load(out).step
    assert f"interrupted at step {step}; checkpoint written to" in stdout, stdout
    assert _steps(out / "metrics.jsonl") == list(range(1, step + 1))


def _wait_for_step(proc, metrics: Path, step: int) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if any(
                json.loads(l).get("step", 0) >= step for l in metrics.read_text().splitlines()[:-1]
            ):
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    raise AssertionError(f"the run never reached step {step}: rc {proc.poll()}")


# ---- 1. orphaned ranks --------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(d.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] not in (
            "Z",
            "X",
        )
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find the ranks")
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_ranks_die_with_their_launcher(text, tmp_path, signum):
    """`--nproc 2`: SIGKILL to the launcher takes both ranks (and the helper process) with it;
    SIGTERM makes rank 0 stop all after the step, with a checkpoint, and exit 143."""
    out = tmp_path / "run"
    argv = _train(text, out, "--steps", "1000000", "--nproc", "2")
    logs = [
        open(tmp_path / name, "w+") for name in ("stdout", "stderr")
    ]  # files: an orphan holding a pipe would hang us
    proc = subprocess.Popen(
        [sys.executable, "-m", "charclip", *argv],
        stdout=logs[0],
        stderr=logs[1],
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    _wait_for_step(proc, out / "metrics.jsonl", 6)  # past the checkpoint of step 4
    kids = _children(proc.pid)
    assert len(kids) >= 2, f"expected the two ranks below the launcher, found {kids}"
    proc.send_signal(signum)
    proc.wait(timeout=300)
    deadline = time.monotonic() + 30
    while any(_alive(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.1)
    orphans = [k for k in kids if _alive(k)]
    for k in orphans:  # leave no process behind, even when the test fails
        os.kill(k, signal.SIGKILL)
    stdout, stderr = (f.seek(0) or f.read() for f in logs)
    assert not orphans, f"processes outlived the launcher: {orphans}"
    if signum == signal.SIGTERM:
        assert proc.returncode == 143, f"rc {proc.returncode}\n{stdout}\n{stderr}"
        step = ckpt_io.load(out).step
        assert f"interrupted at step {step}; checkpoint written to" in stdout, stdout
    else:
        assert proc.returncode == -signal.SIGKILL
    before = _snapshot(out)
    time.sleep(1.0)
    assert _snapshot(out) == before, "something still writes the run folder"
    ckpt_io.load(out)  # LATEST names a whole checkpoint


# ---- 6. retention -------------------------------------------------------------------------------


def test_extending_a_finished_run_twice_keeps_where_each_part_ended(finished):
    for steps in ("16", "24"):
        assert (
            main(
                [
                    "train",
                    "--resume",
                    str(finished),
                    "--steps",
                    steps,
                    "--keep",
                    "1",
                    "--no-progress",
                    "--sample-chars",
                    "0",
                ]
            )
            == 0
        )
    names = sorted(p.name for p in (finished / "checkpoints").glob("step-*"))
    best = ckpt_io.read_pointer(finished / "checkpoints" / "BEST")
    assert {"step-00000008", "step-00000016", "step-00000024", best} == set(names), names
    rows = read_metrics(finished / "metrics.jsonl")
    vals = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    assert vals[int(best[5:])] == min(vals.values()), f"BEST is {best}, validation losses {vals}"
    assert ckpt_io.load(finished / "checkpoints" / "BEST").step == int(best[5:])


def test_keep_chooses_how_many_others_stay(text, tmp_path):
    out = tmp_path / "run"
    assert main(_train(text, out, "--steps", "20", "--keep", "3", "--eval-every", "100")) == 0
    names = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    # newest three (12, 16, 20, the last also final) and the best validation (measured at 20 only)
    assert names == ["step-00000012", "step-00000016", "step-00000020"], names


# ---- 7. what is read as a corpus -------------------------------------------------------------------


def _returns_within(fn, seconds: float):
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("result", _catch(fn)), daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still reading after {seconds} s"
    return box["result"]


def _catch(fn):
    try:
        return fn()
    except Exception as e:  # handed to the test thread
        return e


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero"])
def test_a_fifo_or_device_is_no_corpus(tmp_path, kind):
    path = tmp_path / "fifo"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path = Path(kind)
    e = _returns_within(lambda: corpus.read_text(path), 20)
    assert isinstance(e, CharclipError) and "not a regular file" in str(e) and "MiB" in str(e), e


def test_a_checkpoint_pointing_its_corpus_at_a_fifo_is_refused(finished, tmp_path, capsys):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for folder in (finished / "checkpoints").glob("step-*"):
        meta = json.loads((folder / ckpt_io.META_FILE).read_text())
        meta["corpus"]["path"] = str(fifo)
        rewrite_meta(folder, meta)
    for argv in (
        ["eval", str(finished)],
        ["train", "--resume", str(finished), "--steps", "12", "--no-progress"],
    ):
        rc = _returns_within(lambda: main(argv), 60)
        assert "not a regular file" in _one_error_line(capsys, rc)


def test_a_corpus_over_the_size_bound_is_refused_naming_it(tmp_path, monkeypatch):
    path = tmp_path / "big.txt"
    path.write_text("x" * 2000)
    monkeypatch.setattr(corpus, "MAX_CORPUS_BYTES", 1 << 10)
    with pytest.raises(CharclipError, match="larger than 0 MiB|larger than"):
        corpus.read_text(path)


# ---- 8. memory -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        ["--hidden", "1000000"],
        ["--embed", "1000000000"],
        ["--layers", "1000000", "--hidden", "256"],
    ],
    ids=lambda e: " ".join(e),
)
def test_a_model_too_large_for_the_machine_is_refused_before_allocating(
    text, tmp_path, capsys, extra
):
    t0 = time.monotonic()
    line = _one_error_line(capsys, main(_train(text, tmp_path / "run", "--steps", "2", *extra)))
    assert "GiB of memory" in line and "this machine has" in line, line
    assert time.monotonic() - t0 < 30, "the refusal came after allocating"
    assert not (tmp_path / "run").exists()


# ---- 9. LATEST -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content", ["../../elsewhere", "/etc", "step-00000008\x00", "big", "step-00000008/../../x"]
)
def test_latest_is_confined_bounded_and_escaped(finished, tmp_path, capsys, content):
    latest = finished / "checkpoints" / "LATEST"
    if content == "big":
        with open(latest, "wb") as f:
            f.truncate(1 << 30)  # sparse: a 1 GB file that takes no disk
    else:
        latest.write_text(content + "\n")
    line = _one_error_line(capsys, main(["sample", str(finished), "--length", "3"]))
    assert len(line) < 400 and "\x00" not in line, line


# ---- 10. --out that cannot be written -----------------------------------------------------------------


def test_out_naming_a_file_or_a_path_below_one_is_refused(text, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    for out in (f, f / "below"):
        line = _one_error_line(capsys, main(_train(text, out, "--steps", "2")))
        assert "is a file" in line, line
    assert f.read_text() == "x"


def test_a_read_only_out_is_one_line(text, tmp_path, monkeypatch, capsys):
    def read_only(self, *a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    line = _one_error_line(capsys, main(_train(text, tmp_path / "ro" / "run", "--steps", "2")))
    assert "Read-only file system" in line, line


def test_a_full_disk_mid_run_is_one_line_and_keeps_the_last_checkpoint(
    text, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    write = ckpt_io._write_tensors
    calls = []

    def full(path, tensors):
        calls.append(path)
        if len(calls) == 3:  # the second checkpoint's model file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        write(path, tensors)

    monkeypatch.setattr(ckpt_io, "_write_tensors", full)
    line = _one_error_line(capsys, main(_train(text, out, "--steps", "12")))
    assert "No space left on device" in line and "step-00000004" in line, line
    assert ckpt_io.load(out).step == 4
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")], (
        "a half-written folder stayed"
    )


# ---- 13. eval, sample and empty paths ------------------------------------------------------------


def _nan_params(finished: Path) -> Path:
    import hashlib

    from safetensors.numpy import load_file, save_file

    folder = ckpt_io.resolve(finished)
    tensors = load_file(str(folder / ckpt_io.MODEL_FILE))
    tensors["head.bias"] = np.full_like(tensors["head.bias"], np.nan)
    save_file(tensors, str(folder / ckpt_io.MODEL_FILE))
    meta = json.loads((folder / ckpt_io.META_FILE).read_text())
    meta["files"][ckpt_io.MODEL_FILE] = hashlib.sha256(
        (folder / ckpt_io.MODEL_FILE).read_bytes()
    ).hexdigest()
    rewrite_meta(folder, meta)
    return folder


def test_eval_of_nan_parameters_prints_valid_json(finished, capsys):
    folder = _nan_params(finished)
    assert main(["eval", str(folder)]) == 0
    out, err = capsys.readouterr()
    record = json.loads(out, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
    assert record["loss"] is None and "not all finite" in err, (out, err)


def test_sample_of_nan_parameters_says_so(finished, capsys):
    folder = _nan_params(finished)
    assert "not finite" in _one_error_line(capsys, main(["sample", str(folder), "--length", "5"]))


def test_a_tiny_temperature_samples_greedily_without_warnings(finished, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["sample", str(finished), "--length", "20", "--temperature", "1e-308"]) == 0
    assert len(capsys.readouterr().out) >= 20


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--resume", ""],
        ["train", "--out", ""],
        ["train", "--data", ""],
        ["eval", "RUN", "--data", ""],
    ],
    ids=lambda a: " ".join(a),
)
def test_empty_paths_are_refused(finished, capsys, argv):
    argv = [str(finished) if a == "RUN" else a for a in argv]
    assert "empty path" in _one_error_line(capsys, main(argv))


def test_eval_on_a_too_short_text_names_evals_own_option(finished, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("To be")
    line = _one_error_line(capsys, main(["eval", str(finished), "--data", str(short)]))
    assert "--data" in line and "--batch-size" not in line and "--seq-len" not in line, line


# ---- 14. the closing line and the plot after a resume ---------------------------------------------------


def test_closing_line_and_plot_legend_count_the_same_clipped_steps(
    text, finished, tmp_path, monkeypatch, capsys
):
    """A run that clipped early, resumed: the closing line and the plot count the whole run's clipped steps."""
    import matplotlib.axes

    # Just below the largest norm of the unclipped run's 8 steps: the history is the same up to that
    # step, so that step (at least) clips; the resumed steps 9-12 may clip none.
    norms = [r["grad_norm"] for r in read_metrics(finished / "metrics.jsonl") if "loss" in r]
    out = tmp_path / "clipped"
    assert (
        main(_train(text, out, "--steps", "8", "--clip-norm", repr(max(norms) * (1 - 1e-6)))) == 0
    )
    labels = []
    plot = matplotlib.axes.Axes.plot

    def record(self, *args, **kwargs):
        labels.append(kwargs.get("label"))
        return plot(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", record)
    capsys.readouterr()
    assert (
        main(
            ["train", "--resume", str(out), "--steps", "12", "--no-progress", "--sample-chars", "0"]
        )
        == 0
    )
    said = capsys.readouterr().out
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    clipped = sum(r["clipped"] for r in rows[:8])
    assert clipped > 0, f"no step clipped below the largest norm {max(norms)}"
    share = describe_clipped(sum(r["clipped"] for r in rows), len(rows))
    assert "done: 4 steps (steps 9-12)" in said and share in said, said
    assert share in labels, f"plot legend labels: {labels}"


# ---- options come from the configuration dataclasses (issue 11, finding 4) -----------------------------


def _subparsers():
    import argparse

    from charclip.cli import parser

    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


@pytest.mark.parametrize("command", ["train", "sample", "eval", "parity"])
def test_every_option_is_explained_with_its_default(command):
    import argparse

    p = _subparsers()[command]
    for action in p._actions:
        if isinstance(action, argparse._HelpAction) or not action.option_strings:
            continue
        text = p._get_formatter()._expand_help(action) if action.help else ""
        assert text, f"{command} {action.option_strings[0]} has no help"
        flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreConstAction))
        exempt = flag or (
            command == "parity" and action.default is None
        )  # parity's --json/--plot: off unless given
        assert exempt or "(default: " in text, (
            f"{command} {action.option_strings[0]}: no default in {text!r}"
        )
        assert "(default: )" not in text and "\n" not in text, (
            f"{command} {action.option_strings[0]}: {text!r}"
        )


def test_defaults_and_the_resume_rule_have_one_source(finished, capsys):
    import dataclasses
    import inspect

    from charclip.clipspec import NONFINITE_POLICIES
    from charclip.config import RunOptions, TrainConfig, options

    # run.train takes the RunOptions whole: no field is a second parameter with its own default
    params = set(inspect.signature(run.train).parameters)
    pieces = {f.name for f in dataclasses.fields(RunOptions)} & params
    assert not pieces, f"run.train repeats RunOptions fields as parameters: {sorted(pieces)}"
    assert (
        next(f for f in options(TrainConfig) if f.name == "nonfinite").metadata["choices"]
        is NONFINITE_POLICIES
    )
    assert (
        main(
            [
                "train",
                "--resume",
                str(finished),
                "--steps",
                "9",
                "--lr",
                "0.5",
                "--cell",
                "gru",
                "--data",
                str(finished / ".." / "nowhere.txt"),
                "--no-progress",
                "--sample-chars",
                "0",
            ]
        )
        == 2
    )  # --data is used
    capsys.readouterr()
    assert (
        main(
            [
                "train",
                "--resume",
                str(finished),
                "--steps",
                "9",
                "--lr",
                "0.5",
                "--cell",
                "gru",
                "--keep",
                "3",
                "--no-progress",
                "--sample-chars",
                "0",
            ]
        )
        == 0
    )
    notes = [l for l in capsys.readouterr().err.splitlines() if "ignored" in l]
    assert notes == [
        "charclip: note: --resume keeps the run's configuration; ignored: --cell, --lr"
    ], notes


# ---- small console fixes (issue 21, item 7) ------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_a_terminal_of_zero_columns_still_gets_a_progress_bar(text, tmp_path):
    """stderr on a pseudo-terminal that reports 0 columns: the bar is drawn at the fixed width, not
    squeezed to one cell (what tqdm does with the width it is told)."""
    import fcntl
    import struct
    import termios

    main_fd, term_fd = os.openpty()
    fcntl.ioctl(term_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 0, 0, 0))  # rows 24, columns 0
    argv = [a for a in _train(text, tmp_path / "run", "--steps", "4") if a != "--no-progress"]
    p = subprocess.Popen(
        [sys.executable, "-m", "charclip", *argv], stdout=subprocess.DEVNULL, stderr=term_fd
    )
    os.close(term_fd)
    shown = b""
    while True:
        try:
            chunk = os.read(main_fd, 4096)
        except OSError:  # the terminal closes when the child exits
            break
        if not chunk:
            break
        shown += chunk
    os.close(main_fd)
    assert p.wait(timeout=120) == 0, shown.decode(errors="replace")
    last = shown.decode(errors="replace").replace("\r\n", "\r").split("\r")[-2]
    assert "4/4" in last and last.count("\u2588") >= 10, f"no full-width bar in {last!r}"
    width = run.BAR_COLUMNS
    assert len(last) <= width, f"{len(last)} columns, more than the fixed {width}: {last!r}"


def test_a_loaded_machine_gets_a_thread_hint(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    hint = run.load_hint(load=5.0, cores=2)
    assert hint is not None and "OMP_NUM_THREADS=1" in hint and "5.0" in hint, hint
    assert run.load_hint(load=1.5, cores=2) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # already chosen: nothing to suggest
    assert run.load_hint(load=5.0, cores=2) is None


def test_the_two_validation_losses_say_what_they_cover(finished, capsys):
    """The training summary's validation loss is over --eval-batches batches, eval's over the whole
    split: the closing line and eval's JSON say which, so the two are not mistaken for one."""
    summary = json.loads((finished / "summary.json").read_text(encoding="utf-8"))
    assert summary["val_batches"] == 1  # TINY's --eval-batches
    assert main(["eval", str(finished)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["data"] == "validation split" and report["batches"] >= 1, report
    argv = ["train", "--resume", str(finished), "--steps", "9", "--no-progress"]
    assert main([*argv, "--sample-chars", "0"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("done:"))
    assert "(first 1 validation batches; `charclip eval` covers the whole split)" in line, line
