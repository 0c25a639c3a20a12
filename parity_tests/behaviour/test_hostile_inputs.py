"""Nothing let in: broken checkpoints, bad corpora and out-of-range options each end in one line
`charclip: error: ...`, exit status 2, no traceback, and nothing half-loaded.

Most cases go through `charclip.cli.main` in-process (fast); one goes through a subprocess to show
that no traceback reaches stderr. The Hypothesis fuzzers feed arbitrary bytes to the checkpoint
loader and the corpus reader: the only exception allowed out is CharclipError.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from charclip import checkpoint as ckpt_io
from charclip import corpus
from charclip.cli import main
from charclip.errors import CharclipError
from parity_tests.helpers import reseal, rewrite_meta

TINY = [
    "--batch-size",
    "4",
    "--seq-len",
    "8",
    "--hidden",
    "16",
    "--embed",
    "8",
    "--layers",
    "1",
    "--checkpoint-every",
    "5",
    "--eval-every",
    "5",
    "--eval-batches",
    "1",
    "--sample-chars",
    "0",
    "--no-progress",
]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A valid checkpoint folder (torch, LSTM, float32) from a 5-step run."""
    root = tmp_path_factory.mktemp("good")
    data = root / "corpus.txt"
    data.write_text(corpus.shakespeare()[:2000], encoding="utf-8")
    assert (
        main(["train", "--data", str(data), "--out", str(root / "run"), "--steps", "5", *TINY]) == 0
    )
    return ckpt_io.resolve(root / "run")


def _copy(good: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "ck"
    shutil.copytree(good, folder)
    return folder


def _rehash(folder: Path) -> None:
    """Make checkpoint.json's SHA-256 agree with edited tensor files, so the edit itself is what gets checked."""
    meta = json.loads((folder / ckpt_io.META_FILE).read_text(encoding="utf-8"))
    meta["files"] = {
        f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in meta["files"]
    }
    rewrite_meta(folder, meta)


def _edit_meta(folder: Path, edit) -> None:
    meta = json.loads((folder / ckpt_io.META_FILE).read_text(encoding="utf-8"))
    edit(meta)
    rewrite_meta(folder, meta)


def _write_meta_text(folder: Path, text: str) -> None:
    """Any text as checkpoint.json, resealed, so the parser itself meets it."""
    (folder / ckpt_io.META_FILE).write_text(text)
    reseal(folder)


def _edit_tensors(folder: Path, name: str, edit) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(folder / name))
    edit(tensors)
    save_file(tensors, str(folder / name))
    _rehash(folder)


def _lying_header(folder: Path) -> None:
    """A safetensors header whose first tensor claims a million more bytes than the file holds."""
    raw = (folder / ckpt_io.MODEL_FILE).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"][1] += 1_000_000
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    (folder / ckpt_io.MODEL_FILE).write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    _rehash(folder)


def _set(path: list, value):
    def edit(meta):
        d = meta
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value

    return edit


BROKEN = {
    "empty model file": lambda f: (f / ckpt_io.MODEL_FILE).write_bytes(b""),
    "truncated model file": lambda f: (f / ckpt_io.MODEL_FILE).write_bytes(
        (f / ckpt_io.MODEL_FILE).read_bytes()[:-7]
    ),
    "flipped byte in state file": lambda f: (f / ckpt_io.STATE_FILE).write_bytes(
        (lambda b: b[:100] + bytes([b[100] ^ 1]) + b[101:])((f / ckpt_io.STATE_FILE).read_bytes())
    ),
    "missing state file": lambda f: (f / ckpt_io.STATE_FILE).unlink(),
    "empty json": lambda f: _write_meta_text(f, ""),
    "truncated json": lambda f: _write_meta_text(f, (f / ckpt_io.META_FILE).read_text()[:50]),
    "json is a list": lambda f: _write_meta_text(f, "[1, 2]"),
    "deeply nested json": lambda f: _write_meta_text(f, "[" * 100_000 + "]" * 100_000),
    "stale checkpoint.json seal": lambda f: (f / ckpt_io.META_FILE).write_text(
        (f / ckpt_io.META_FILE).read_text().replace('"step": 5', '"step": 4', 1)
    ),
    "header lies about sizes": _lying_header,
    "header claims 2**62 bytes": lambda f: (
        (f / ckpt_io.MODEL_FILE).write_bytes(
            struct.pack("<Q", 2**62) + (f / ckpt_io.MODEL_FILE).read_bytes()[8:]
        ),
        _rehash(f),
    ),
    "missing json key": lambda f: _edit_meta(f, lambda m: m.pop("position")),
    "extra json key": lambda f: _edit_meta(f, _set(["surprise"], 1)),
    "newer format version": lambda f: _edit_meta(
        f, _set(["format_version"], ckpt_io.FORMAT_VERSION + 1)
    ),
    "not a charclip checkpoint": lambda f: _edit_meta(f, _set(["format"], "something-else")),
    "vocabulary shorter than the tensors": lambda f: _edit_meta(f, lambda m: m["vocab"].pop()),
    "vocabulary and model both one shorter": lambda f: _edit_meta(
        f,
        lambda m: (
            m["vocab"].pop(),
            m["model"].__setitem__("vocab_size", m["model"]["vocab_size"] - 1),
        ),
    ),
    "vocabulary not sorted": lambda f: _edit_meta(f, lambda m: m["vocab"].reverse()),
    "vocabulary entry of two characters": lambda f: _edit_meta(
        f, lambda m: m["vocab"].__setitem__(0, "ab")
    ),
    "hidden size disagrees with tensors": lambda f: _edit_meta(
        f, _set(["model", "hidden_size"], 17)
    ),
    "unknown cell": lambda f: _edit_meta(f, _set(["model", "cell"], "transformer")),
    "negative step": lambda f: _edit_meta(f, _set(["step"], -1)),
    "step is text": lambda f: _edit_meta(f, _set(["step"], "five")),
    "negative data position": lambda f: _edit_meta(f, _set(["position", "batch"], -2)),
    "corpus is a string": lambda f: _edit_meta(f, _set(["corpus"], "abc")),
    "NaN learning rate": lambda f: _edit_meta(f, _set(["train", "lr"], float("nan"))),
    "clip settings missing": lambda f: _edit_meta(f, lambda m: m["train"].pop("clip")),
    "parameter of the wrong shape": lambda f: _edit_tensors(
        f, ckpt_io.MODEL_FILE, lambda t: t.__setitem__("head.bias", np.zeros(3, np.float32))
    ),
    "parameter of the wrong dtype": lambda f: _edit_tensors(
        f,
        ckpt_io.MODEL_FILE,
        lambda t: t.__setitem__("head.bias", t["head.bias"].astype(np.float64)),
    ),
    "parameter missing": lambda f: _edit_tensors(
        f, ckpt_io.MODEL_FILE, lambda t: t.pop("head.bias")
    ),
    "Adam moment of the wrong shape": lambda f: _edit_tensors(
        f,
        ckpt_io.STATE_FILE,
        lambda t: t.__setitem__("adam.exp_avg.head.bias", np.zeros(3, np.float32)),
    ),
    "Adam step is a vector": lambda f: _edit_tensors(
        f, ckpt_io.STATE_FILE, lambda t: t.__setitem__("adam.step", np.zeros(3, np.int64))
    ),
    "Adam moment missing": lambda f: _edit_tensors(
        f, ckpt_io.STATE_FILE, lambda t: t.pop("adam.exp_avg_sq.head.weight")
    ),
    "hidden state of the wrong batch": lambda f: _edit_tensors(
        f, ckpt_io.STATE_FILE, lambda t: t.__setitem__("hidden.h", np.zeros((1, 3, 16), np.float32))
    ),
    "LSTM cell state missing": lambda f: _edit_tensors(
        f, ckpt_io.STATE_FILE, lambda t: t.pop("hidden.c")
    ),
    # Fields that used to pass `load` unchecked (issue 14, class 11).
    "beta1 of 2": lambda f: _edit_meta(f, _set(["train", "beta1"], 2.0)),
    "NaN beta2": lambda f: _edit_meta(f, _set(["train", "beta2"], float("nan"))),
    "beta2 of 1": lambda f: _edit_meta(f, _set(["train", "beta2"], 1.0)),
    "zero eps": lambda f: _edit_meta(f, _set(["train", "eps"], 0.0)),
    "eps is text": lambda f: _edit_meta(f, _set(["train", "eps"], "1e-8")),
    "negative seed": lambda f: _edit_meta(f, _set(["train", "seed"], -1)),
    "fractional seed": lambda f: _edit_meta(f, _set(["train", "seed"], 1.5)),
    "vocabulary holds a lone surrogate": lambda f: _edit_meta(
        f, lambda m: m["vocab"].__setitem__(-1, "\ud800")
    ),
    "no Adam tensors": lambda f: _edit_tensors(
        f, ckpt_io.STATE_FILE, lambda t: [t.pop(k) for k in [k for k in t if k.startswith("adam.")]]
    ),
    "Adam step 0 with non-zero moments": lambda f: _edit_tensors(
        f, ckpt_io.STATE_FILE, lambda t: t.__setitem__("adam.step", np.array(0, np.int64))
    ),
    "negative Adam second moment": lambda f: _edit_tensors(
        f,
        ckpt_io.STATE_FILE,
        lambda t: t.__setitem__(
            "adam.exp_avg_sq.head.bias", -np.ones_like(t["adam.exp_avg_sq.head.bias"])
        ),
    ),
    "unknown tensor in state file": lambda f: _edit_tensors(
        f, ckpt_io.STATE_FILE, lambda t: t.__setitem__("mystery", np.zeros(1, np.float32))
    ),
}


def _one_error_line(capsys, rc: int) -> str:
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2, f"exit status {rc}, expected 2; stderr: {err}"
    assert len(lines) == 1 and lines[0].startswith("charclip: error: "), (
        f"stderr is not one error line: {err!r}"
    )
    assert "Traceback" not in out + err
    return lines[0]


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_checkpoint_is_refused_in_one_line(good, tmp_path, capsys, case):
    folder = _copy(good, tmp_path)
    BROKEN[case](folder)
    with pytest.raises(CharclipError):
        ckpt_io.load(folder)
    capsys.readouterr()
    _one_error_line(capsys, main(["sample", str(folder), "--length", "5"]))
    out = tmp_path / "resumed"
    _one_error_line(
        capsys,
        main(
            [
                "train",
                "--resume",
                str(folder),
                "--out",
                str(out),
                "--steps",
                "8",
                "--no-progress",
                "--sample-chars",
                "0",
            ]
        ),
    )
    assert not (out / "checkpoints").exists(), "a refused checkpoint still started a run"


def test_latest_naming_a_missing_folder_is_refused(good, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(good.parent.parent, run)
    (run / "checkpoints" / "LATEST").write_text("step-00000999\n")
    assert "not a complete checkpoint" in _one_error_line(capsys, main(["sample", str(run)]))


BAD_CORPORA = {
    "empty": (b"", "is empty"),
    "binary": (bytes(range(256)) * 40, "looks binary"),
    "not UTF-8": ("caf\u00e9 ".encode("latin-1") * 2000, "is not UTF-8"),
    "byte-order mark only": (b"\xef\xbb\xbf", "is empty"),
    "shorter than one batch": (b"To be or not to be.\n" * 4, "fewer than one batch needs"),
}


@pytest.mark.parametrize("case", sorted(BAD_CORPORA))
def test_bad_corpus_is_refused_in_one_line(tmp_path, capsys, case):
    data, says = BAD_CORPORA[case]
    path = tmp_path / "corpus.txt"
    path.write_bytes(data)
    # Half the text for validation, so the short corpus fails on the training side, where a batch is cut.
    line = _one_error_line(
        capsys,
        main(
            [
                "train",
                "--data",
                str(path),
                "--out",
                str(tmp_path / "run"),
                "--steps",
                "3",
                "--val-fraction",
                "0.5",
                *TINY,
            ]
        ),
    )
    assert says in line, line
    assert not (tmp_path / "run").exists(), "a refused corpus still created the run folder"


def test_one_enormous_line_trains_and_samples(tmp_path, capsys):
    """200,000 characters and no newline: a valid corpus. The run trains and its closing sample works
    (it used to fail after training, priming with a newline the vocabulary lacks)."""
    path = tmp_path / "line.txt"
    path.write_text(corpus.shakespeare()[:200_000].replace("\n", " "), encoding="utf-8")
    argv = ["train", "--data", str(path), "--out", str(tmp_path / "run"), "--steps", "3", *TINY]
    argv[argv.index("--sample-chars") + 1] = "20"
    assert main(argv) == 0, capsys.readouterr().err
    assert "--- sample" in capsys.readouterr().out


BAD_OPTIONS = {
    "zero steps": (["--steps", "0"], "--steps"),
    "negative batch size": (["--batch-size", "-4"], "--batch-size"),
    "zero sequence length": (["--seq-len", "0"], "--seq-len"),
    "zero hidden size": (["--hidden", "0"], "--hidden"),
    "negative layers": (["--layers", "-1"], "--layers"),
    "NaN clip threshold": (["--clip-norm", "nan"], "--clip-norm"),
    "negative clip threshold": (["--clip-norm", "-1"], "--clip-norm"),
    "infinite clip value": (["--clip-value", "inf"], "--clip-value"),
    "NaN learning rate": (["--lr", "nan"], "--lr"),
    "zero learning rate": (["--lr", "0"], "--lr"),
    "validation fraction 1": (["--val-fraction", "1"], "--val-fraction"),
    "NaN validation fraction": (["--val-fraction", "nan"], "--val-fraction"),
    "negative seed": (["--seed", "-1"], "--seed"),
    "negative sample length": (["--sample-chars", "-5"], "--sample-chars"),
    "zero checkpoint interval": (["--checkpoint-every", "0"], "--checkpoint-every"),
    "dropout 1": (["--dropout", "1"], "--dropout must lie in [0, 1)"),
    "negative dropout": (["--dropout", "-0.1"], "--dropout must lie in [0, 1)"),
}


@pytest.mark.parametrize("case", sorted(BAD_OPTIONS))
def test_out_of_range_train_option_is_refused(tmp_path, capsys, case):
    extra, says = BAD_OPTIONS[case]
    data = tmp_path / "corpus.txt"
    data.write_text(corpus.shakespeare()[:2000], encoding="utf-8")
    line = _one_error_line(
        capsys, main(["train", "--data", str(data), "--out", str(tmp_path / "run"), *TINY, *extra])
    )
    assert says in line, line


@pytest.mark.parametrize(
    "extra,says",
    [
        (["--temperature", "0"], "--temperature"),
        (["--temperature", "nan"], "--temperature"),
        (["--temperature", "-1"], "--temperature"),
        (["--top-k", "0"], "--top-k"),
        (["--top-k", "1000"], "--top-k"),
        (["--length", "-1"], "--length"),
        (["--prime", ""], "--prime"),
        (["--prime", "\u2603"], "outside the model's vocabulary"),
        (["--seed", "-3"], "--seed"),
    ],
    ids=lambda v: v if isinstance(v, str) else " ".join(v),
)
def test_out_of_range_sample_option_is_refused(good, capsys, extra, says):
    line = _one_error_line(capsys, main(["sample", str(good), "--length", "5", *extra]))
    assert says in line, line


def test_no_traceback_reaches_stderr_of_the_real_command(good, tmp_path):
    """Through a subprocess: a damaged checkpoint and a bad option each give one line and exit 2."""
    folder = _copy(good, tmp_path)
    BROKEN["header lies about sizes"](folder)
    for argv in (["sample", str(folder)], ["sample", str(good), "--temperature", "0"]):
        done = subprocess.run(
            [sys.executable, "-m", "charclip", *argv], capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("charclip: error: "), (
            done.stderr
        )
        assert done.stdout == "", done.stdout


# Fuzzing. The checkpoint loader takes any bytes in any of its three files, and any single
# mutation of a valid checkpoint; the corpus reader takes any bytes.

_FILES = (ckpt_io.META_FILE, ckpt_io.MODEL_FILE, ckpt_io.STATE_FILE)
_fuzz = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _reseal_or_rehash(folder: Path, which: str) -> None:
    if which == ckpt_io.META_FILE:
        reseal(folder)
    else:
        _rehash(folder)


def _load_or_refuse(folder: Path) -> None:
    try:
        ck = ckpt_io.load(folder)
    except CharclipError:
        return
    # Accepted: then it must be whole, every parameter present and shaped as configured.
    from charclip.weights import param_shapes

    assert {k: v.shape for k, v in ck.params.items()} == param_shapes(ck.model)
    assert len(ck.vocab) == ck.model.vocab_size


@_fuzz
@given(which=st.sampled_from(_FILES), data=st.binary(max_size=600), rehash=st.booleans())
def test_fuzz_any_bytes_in_a_checkpoint_file(good, tmp_path_factory, which, data, rehash):
    folder = _copy(good, tmp_path_factory.mktemp("fuzz"))
    (folder / which).write_bytes(data)
    if rehash:  # past the checksums, so the parser itself meets the bytes
        _reseal_or_rehash(folder, which)
    _load_or_refuse(folder)


@_fuzz
@given(
    which=st.sampled_from(_FILES),
    where=st.floats(0, 1),
    action=st.sampled_from(["flip", "cut", "insert", "zero"]),
    byte=st.integers(0, 255),
    length=st.integers(1, 64),
    rehash=st.booleans(),
)
def test_fuzz_mutations_of_a_valid_checkpoint(
    good, tmp_path_factory, which, where, action, byte, length, rehash
):
    folder = _copy(good, tmp_path_factory.mktemp("fuzz"))
    raw = bytearray((folder / which).read_bytes())
    i = min(int(where * len(raw)), len(raw) - 1)
    if action == "flip":
        raw[i] ^= byte or 1
    elif action == "cut":
        del raw[i : i + length]
    elif action == "insert":
        raw[i:i] = bytes([byte]) * length
    else:
        raw[i : i + length] = bytes(min(length, len(raw) - i))
    (folder / which).write_bytes(bytes(raw))
    if rehash:
        _reseal_or_rehash(folder, which)
    _load_or_refuse(folder)


@_fuzz
@given(
    meta=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=12,
    ),
    key=st.sampled_from(
        [
            "model",
            "train",
            "vocab",
            "step",
            "position",
            "corpus",
            "files",
            "backend",
            "format_version",
        ]
    ),
)
def test_fuzz_json_values_in_a_valid_checkpoint(good, tmp_path_factory, meta, key):
    """Any JSON value in place of one field of checkpoint.json."""
    folder = _copy(good, tmp_path_factory.mktemp("fuzz"))
    _edit_meta(folder, _set([key], meta))
    _load_or_refuse(folder)


@_fuzz
@given(data=st.binary(max_size=2000))
def test_fuzz_corpus_reader(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("corpus") / "c.txt"
    path.write_bytes(data)
    try:
        text = corpus.read_text(path)
    except CharclipError:
        return
    assert text and "\x00" not in text and not text.startswith("\ufeff")
