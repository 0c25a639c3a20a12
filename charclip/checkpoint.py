"""The checkpoint format, one for both backends. No pickle anywhere.

A run directory holds `checkpoints/step-NNNNNNNN/` folders, a `checkpoints/LATEST`
file naming the newest and, once a validation loss was measured, `checkpoints/BEST`
naming the checkpoint with the lowest one. Each folder holds:

- `model.safetensors`: the parameters under PyTorch `state_dict` names, so
  `CharRNN.load_state_dict(safetensors.torch.load_file(...))` works as is;
- `train_state.safetensors`: Adam's moments (`adam.exp_avg.<name>`,
  `adam.exp_avg_sq.<name>`) and the hidden state carried between batches
  (`hidden.h`, and `hidden.c` for an LSTM), each of shape (layers, batch, hidden);
  under `--precision fp16` also the dynamic loss scale (`adam.loss_scale`, float32) and its
  count of clean steps since the last change (`adam.loss_scale_good_steps`);
- `checkpoint.json`: format version, backend, configuration, vocabulary, step,
  data position, and the SHA-256 of both tensor files. It is parsed strictly: a
  repeated key, a format version below 1 or an integer of absurd length is damage;
- `checkpoint.json.sha256`: the SHA-256 of `checkpoint.json` itself, one line as `sha256sum`
  writes it (so `sha256sum -c checkpoint.json.sha256` checks it too). An edited number in
  `checkpoint.json` that every other check would accept is damage too.

Format versions: 2 adds `checkpoint.json.sha256` (required from 2 on); 1 lacks it and still
loads, its `checkpoint.json` checked by the strict parse alone. The seal is checked whenever it
is there, whatever version `checkpoint.json` claims, so editing the version does not skip it.

Every tensor a resume needs is required, and the training state (Adam's moments, the
hidden state, the loss scale) must be finite, both on load and on save: a state holding
NaN or infinity is never written, so LATEST never names one. Files are created new
(never through a symbolic link) with the process umask's mode.

Writes are atomic: the folder is written under a temporary name, flushed, and
renamed; then LATEST is replaced atomically. A crash at any moment leaves the
previous checkpoint whole and LATEST pointing at it.

Retention: after a save, the `keep` newest checkpoints stay, and so do, whatever their
age, the one LATEST names, the one BEST names, and every checkpoint a run finished on
(its step equals its configuration's `steps`), so extending a finished run never
deletes where it ended.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from charclip import config as C
from charclip import runfolder
from charclip.batching import Position
from charclip.errors import CharclipError
from charclip.vocab import Vocab
from charclip.weights import param_shapes

FORMAT = "charclip-checkpoint"
FORMAT_VERSION = 2  # 2: checkpoint.json.sha256 seals checkpoint.json
MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.safetensors"
META_FILE = "checkpoint.json"
META_SEAL_FILE = "checkpoint.json.sha256"
SEALED_FROM = 2  # the first format version whose checkpoints carry META_SEAL_FILE
_MAX_SEAL_BYTES = 256
KEEP = 2  # newest checkpoints kept per run (besides LATEST's, BEST's and final ones); older ones go after a save
POINTERS = ("LATEST", "BEST")
MAX_POINTER_BYTES = 64  # a pointer holds one folder name; a longer file is not one of ours
_POINTER_NAME = re.compile(
    r"\.?step-\d{8,}(\.tmp\d+)?"
)  # a step folder, or save's temporary copy of one
MAX_INT_DIGITS = (
    30  # a step, a size or a seed has far fewer; Python refuses to parse over 4300 with a traceback
)
_META_KEYS = {
    "format",
    "format_version",
    "backend",
    "model",
    "train",
    "vocab",
    "step",
    "position",
    "corpus",
    "files",
}


@dataclass
class Checkpoint:
    model: C.ModelConfig
    train: C.TrainConfig
    vocab: Vocab
    params: dict[str, np.ndarray]
    step: int = 0
    position: Position = field(default_factory=Position)
    backend: str = ""
    corpus: dict = field(default_factory=dict)
    adam: dict[str, np.ndarray] | None = None  # "step", "exp_avg.<name>", "exp_avg_sq.<name>"
    hidden: dict[str, np.ndarray] | None = None  # "h", and "c" for an LSTM
    path: Path | None = None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def seal(raw: bytes) -> str:
    """The content of checkpoint.json.sha256 for checkpoint.json's bytes `raw`: one line in
    `sha256sum`'s format, the hex digest, two spaces, the file name."""
    return f"{hashlib.sha256(raw).hexdigest()}  {META_FILE}\n"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_tensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save

    # Serialised here and written by create_new: a new file (never through a link), mode per the
    # umask (safetensors' own writer makes it 0600, unreadable to the run's other readers), synced.
    data = save(
        {k: np.asarray(v, order="C") for k, v in tensors.items()}
    )  # ascontiguousarray would make 0-d arrays 1-d
    runfolder.create_new(path, data)


def _point(root: Path, name: str, pointer: str = "LATEST") -> None:
    """Atomically make `root/pointer` (LATEST or BEST) name the folder `name`."""
    runfolder.write_file(root / pointer, name + "\n")  # .POINTER.tmpPID, synced, renamed over it
    _fsync_dir(root)


def _point_latest(root: Path, name: str) -> None:
    _point(root, name, "LATEST")


def point_latest(run_dir: str | os.PathLike, folder: Path) -> None:
    """Make `run_dir`'s LATEST name `folder` (one of its step folders) unless it does already."""
    root = Path(run_dir) / "checkpoints"
    try:
        if (root / read_pointer(root / "LATEST")).resolve() == Path(folder).resolve():
            return
    except CharclipError:
        pass  # missing or damaged: rewritten below
    _point_latest(root, Path(folder).name)


def mark_best(run_dir: str | os.PathLike, folder: Path, *, keep: int = KEEP) -> None:
    """Point `run_dir/checkpoints/BEST` at the checkpoint `folder` (a step folder of that run), then prune."""
    root = Path(run_dir) / "checkpoints"
    _point(root, Path(folder).name, "BEST")
    _prune(root, keep)


def read_pointer(path: Path) -> str:
    """The folder name a LATEST or BEST file holds, checked: short, one of ours, nothing that leaves checkpoints/."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_POINTER_BYTES + 1)
    except OSError as e:
        raise CharclipError(f"cannot read {path}: {e.strerror}") from None
    if len(raw) > MAX_POINTER_BYTES:
        raise CharclipError(
            f"{path} is longer than a checkpoint name ({MAX_POINTER_BYTES} bytes at most); the run folder "
            "is damaged: pass a step folder instead"
        )
    name = raw.decode("utf-8", errors="replace").strip()
    if not _POINTER_NAME.fullmatch(name):
        raise CharclipError(
            f"{path} names {ascii(name)[:80]}, not a checkpoint folder (step-NNNNNNNN) beside it; "
            "the run folder is damaged: pass a step folder instead"
        )
    return name


def save(
    run_dir: str | os.PathLike, ckpt: Checkpoint, *, keep: int = KEEP, best: bool = False
) -> Path:
    """Write `ckpt` atomically under `run_dir/checkpoints/`, point LATEST (and BEST if `best`) at it, and prune."""
    root = Path(run_dir) / "checkpoints"
    if root.is_symlink():
        raise CharclipError(
            f"{root} is a symbolic link, which charclip never makes; checkpoints would be written "
            "outside the run folder: remove the link"
        )
    _check_finite(ckpt)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{ckpt.step:08d}"
    final = root / name
    tmp = root / f".{name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_folder(tmp, ckpt)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk leaves no half-written folder behind
        raise
    if (
        final.exists()
    ):  # the same step written again: LATEST must name a whole folder at every moment
        _point_latest(root, tmp.name)  # the new copy, whole, while the old one goes
        shutil.rmtree(final)
        linked = root / f".{name}.link{os.getpid()}"
        shutil.rmtree(linked, ignore_errors=True)
        shutil.copytree(tmp, linked, copy_function=os.link)  # hard links: no data copied
        os.replace(linked, final)
        _point_latest(root, name)
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, final)
        _point_latest(root, name)
    if best:
        _point(root, name, "BEST")
    _prune(root, keep)
    # LATEST now names a whole folder, so hidden entries are leftovers of a writer killed
    # mid-save (a run has one writer); nothing reads them.
    for stale in root.glob(".*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    return final


def _hidden_or_zeros(ckpt: Checkpoint) -> dict[str, np.ndarray]:
    """The carried hidden state; none yet (a fresh epoch) is zeros, which is what a step starts from then."""
    if ckpt.hidden:
        return ckpt.hidden
    shape = (ckpt.model.num_layers, ckpt.train.batch_size, ckpt.model.hidden_size)  # (L, B, H)
    return {k: np.zeros(shape, np.dtype(ckpt.train.dtype)) for k in ckpt.model.state_parts}


class NonFiniteCheckpoint(CharclipError):
    """A checkpoint whose parameters or training state hold NaN or infinity: not written."""


def _check_finite(ckpt: Checkpoint) -> None:
    """A checkpoint is a state to continue from: one whose training state (Adam's moments, the hidden
    state, the loss scale) holds NaN or infinity is never written (nor named by LATEST); the caller
    keeps the last whole one. Parameters are not checked: a NaN embedding row of a character that never
    occurs trains harmlessly, and eval and sample report non-finite parameters themselves."""
    tensors = {
        **{f"adam.{k}": v for k, v in (ckpt.adam or {}).items()},
        **{f"hidden.{k}": v for k, v in (ckpt.hidden or {}).items()},
    }
    bad = [
        k
        for k, v in tensors.items()
        if np.issubdtype(np.asarray(v).dtype, np.floating) and not np.isfinite(v).all()
    ]
    if bad:
        raise NonFiniteCheckpoint(
            f"the training state at step {ckpt.step} is not finite ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}); no checkpoint was written for it"
        )


def _write_folder(tmp: Path, ckpt: Checkpoint) -> None:
    tmp.mkdir()
    _write_tensors(tmp / MODEL_FILE, ckpt.params)
    state = {f"adam.{k}": v for k, v in (ckpt.adam or {}).items()}
    state.update({f"hidden.{k}": v for k, v in _hidden_or_zeros(ckpt).items()})
    _write_tensors(tmp / STATE_FILE, state)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "backend": ckpt.backend,
        "model": C.to_dict(ckpt.model),
        "train": C.to_dict(ckpt.train),
        "vocab": list(ckpt.vocab.chars),
        "step": ckpt.step,
        "position": {"epoch": ckpt.position.epoch, "batch": ckpt.position.batch},
        "corpus": ckpt.corpus,
        "files": {MODEL_FILE: _sha256(tmp / MODEL_FILE), STATE_FILE: _sha256(tmp / STATE_FILE)},
    }
    raw = json.dumps(meta, indent=1, ensure_ascii=False).encode("utf-8")
    runfolder.create_new(tmp / META_FILE, raw)  # new files, never through a link; umask's mode
    runfolder.create_new(tmp / META_SEAL_FILE, seal(raw).encode("ascii"))
    _fsync_dir(tmp)


def _finished(folder: Path) -> bool:
    """Whether the checkpoint in `folder` is where a run ended (its step equals its --steps)."""
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        return meta["step"] == meta["train"]["steps"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return False  # damaged or foreign: nothing worth keeping for


def _prune(root: Path, keep: int) -> None:
    steps = sorted(
        (
            p
            for p in root.glob("step-*")
            if p.is_dir() and not p.is_symlink() and p.name[5:].isdigit()
        ),
        key=lambda p: int(p.name[5:]),
    )
    protected = {p.name for p in steps[-max(keep, 1) :]}
    for pointer in POINTERS:
        try:
            protected.add(read_pointer(root / pointer))
        except CharclipError:
            pass  # absent (no BEST yet) or damaged: protects nothing
    for old in steps:
        if old.name not in protected and not _finished(old):
            shutil.rmtree(old, ignore_errors=True)


def resolve(path: str | os.PathLike) -> Path:
    """The checkpoint folder meant by `path`: a checkpoint folder, a run folder, or its checkpoints/."""
    p = Path(path)
    if not p.exists():
        raise CharclipError(f"checkpoint not found: {p}")
    if (p / META_FILE).is_file():
        return p
    if (
        p.name in POINTERS and p.is_file()
    ):  # RUN/checkpoints/BEST or .../LATEST: the folder it names
        target = p.parent / read_pointer(p)
        if target.is_symlink() or not (target / META_FILE).is_file():
            raise CharclipError(f"{p} names {target.name}, which is not a complete checkpoint")
        return target
    for root in (p / "checkpoints", p):
        latest = root / "LATEST"
        if latest.is_file():
            target = root / read_pointer(latest)
            if target.is_symlink() or not (target / META_FILE).is_file():
                raise CharclipError(
                    f"{latest} names {target.name}, which is not a complete checkpoint"
                )
            return target
    raise CharclipError(
        f"{p} is neither a checkpoint folder (with {META_FILE}) nor a run folder with checkpoints/LATEST"
    )


class _Malformed(ValueError):
    """checkpoint.json spells something no charclip writes (a repeated key, a huge number)."""


def _no_repeated_keys(pairs: list[tuple]) -> dict:
    keys = [k for k, _ in pairs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:  # json keeps the last silently: a second "vocab" would remap every character
        raise _Malformed(f"the key {repeated[0]!r} appears more than once")
    return dict(pairs)


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _Malformed(
            f"a number has {len(text.lstrip('-'))} digits (at most {MAX_INT_DIGITS} are meaningful)"
        )
    return int(text)


def parse_meta(raw: bytes) -> object:
    """checkpoint.json's bytes as JSON, strictly: UTF-8, no repeated key, no integer of absurd length."""
    return json.loads(
        raw.decode("utf-8"), object_pairs_hook=_no_repeated_keys, parse_int=_bounded_int
    )


def _read_meta(folder: Path) -> dict:
    path = folder / META_FILE
    try:
        raw = path.read_bytes()
    except OSError as e:  # not damage: say what happened
        raise runfolder.os_error(e, f"cannot read {path}") from None
    seal_path = folder / META_SEAL_FILE
    if seal_path.exists() and not seal_path.is_file():  # a FIFO would block the read
        raise CharclipError(f"{seal_path} is not a regular file; the checkpoint is damaged")
    try:
        with open(seal_path, "rb") as f:
            recorded = f.read(_MAX_SEAL_BYTES + 1)  # ours is 82 bytes; a longer file is not one
    except FileNotFoundError:
        recorded = None  # a format 1 checkpoint; from format 2 on this is damage (below)
    except OSError as e:
        raise runfolder.os_error(e, f"cannot read {seal_path}") from None
    if recorded is not None and recorded != seal(raw).encode("ascii"):
        raise CharclipError(
            f"{path} does not match the SHA-256 recorded in {META_SEAL_FILE}: "
            "the checkpoint is damaged"
        )
    try:
        meta = parse_meta(raw)
    except _Malformed as e:
        raise CharclipError(f"{path} is malformed ({e}); the checkpoint is damaged") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: absurd nesting
        raise CharclipError(
            f"{path} is not readable JSON ({type(e).__name__}); the checkpoint is damaged"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CharclipError(f"{folder / META_FILE} is not a charclip checkpoint")
    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version > FORMAT_VERSION:
        raise CharclipError(
            f"{folder} has checkpoint format version {version!r}; this charclip reads up to {FORMAT_VERSION}: upgrade charclip"
        )
    if version < 1:
        raise CharclipError(
            f"{path} has format version {version}, which no charclip wrote; the checkpoint is damaged"
        )
    if version >= SEALED_FROM and recorded is None:
        raise CharclipError(
            f"{seal_path} is missing (format version {version} writes it); the checkpoint is damaged"
        )
    missing, extra = _META_KEYS - meta.keys(), meta.keys() - _META_KEYS
    if missing or extra:
        raise CharclipError(
            f"{folder / META_FILE} has missing keys {sorted(missing)} / unknown keys {sorted(extra)}"
        )
    return meta


def _read_tensors(path: Path, expected_sha: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not path.is_file():
        raise CharclipError(f"{path} is missing; the checkpoint is incomplete")
    try:
        actual = _sha256(path)
    except OSError as e:  # an I/O or permission error is not a corrupted file: say which
        raise runfolder.os_error(e, f"cannot read {path}") from None
    if actual != expected_sha:
        raise CharclipError(
            f"{path} does not match the SHA-256 recorded in {META_FILE}: the file is truncated or corrupted"
        )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CharclipError(f"{path} is not a valid safetensors file: {e}") from None


def load(path: str | os.PathLike) -> Checkpoint:
    """Read and validate a checkpoint completely before returning anything.

    A run folder's latest checkpoint may be pruned by its training run between resolving LATEST and
    reading the files (`--keep 1`); then LATEST names a newer one, which is read instead (once)."""
    folder = None
    try:
        folder = resolve(path)
        return _load(folder)
    except CharclipError as first:
        # A writer saves the new checkpoint and moves LATEST before it prunes the old one, so a
        # checkpoint that vanished under the reader shows as LATEST naming another folder now.
        try:
            again = resolve(path)
        except CharclipError:
            raise first from None
        if again == folder:
            raise
        return _load(again)


def _load(folder: Path) -> Checkpoint:
    meta = _read_meta(folder)
    try:
        model = C.model_from_dict(meta["model"])
        train = C.train_from_dict(meta["train"])
        if not isinstance(meta["vocab"], list) or not all(
            isinstance(c, str) and len(c) == 1 for c in meta["vocab"]
        ):
            raise CharclipError("the vocabulary is not a list of single characters")
        if any(
            "\ud800" <= c <= "\udfff" for c in meta["vocab"]
        ):  # JSON can spell them; UTF-8 text cannot hold them
            raise CharclipError(
                "the vocabulary holds a lone surrogate, which no UTF-8 text contains"
            )
        vocab = Vocab("".join(meta["vocab"]))
        step = _count(meta["step"], "step")
        position = Position(
            _count(meta["position"]["epoch"], "epoch"), _count(meta["position"]["batch"], "batch")
        )
        files = dict(meta["files"])
        corpus = meta["corpus"]
        if (
            not isinstance(corpus, dict)
            or not isinstance(corpus.get("path"), (str, type(None)))
            or not isinstance(meta["backend"], str)
        ):
            raise CharclipError("the corpus or backend entry is malformed")
    except CharclipError as e:
        raise CharclipError(f"{folder / META_FILE}: {e}") from None
    except (TypeError, KeyError, ValueError, AttributeError) as e:
        raise CharclipError(
            f"{folder / META_FILE} has a malformed field ({type(e).__name__}: {e})"
        ) from None
    if len(vocab) != model.vocab_size:
        raise CharclipError(
            f"{folder}: the vocabulary has {len(vocab)} characters but the model expects {model.vocab_size}"
        )
    params = _read_tensors(folder / MODEL_FILE, files.get(MODEL_FILE, ""))
    expected = param_shapes(model)
    if set(params) != set(expected):
        raise CharclipError(
            f"{folder / MODEL_FILE} holds tensors {sorted(set(params) ^ set(expected))} that do not fit the configuration"
        )
    for name, shape in expected.items():
        if params[name].shape != shape or params[name].dtype != np.dtype(train.dtype):
            raise CharclipError(
                f"{folder / MODEL_FILE}: {name} is {params[name].dtype}{list(params[name].shape)}, expected {train.dtype}{list(shape)}"
            )
    state = _read_tensors(folder / STATE_FILE, files.get(STATE_FILE, ""))
    _check_state(folder / STATE_FILE, state, model, train, expected, step)
    adam = {k[len("adam.") :]: v for k, v in state.items() if k.startswith("adam.")}
    hidden = {k[len("hidden.") :]: v for k, v in state.items() if k.startswith("hidden.")}
    return Checkpoint(
        model=model,
        train=train,
        vocab=vocab,
        params=params,
        step=step,
        position=position,
        backend=meta["backend"],
        corpus=corpus,
        adam=adam or None,
        hidden=hidden or None,
        path=folder,
    )


def _count(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CharclipError(f"{what} must be a non-negative integer, got {value!r}")
    return value


def _check_state(
    where: Path,
    state: dict[str, np.ndarray],
    model: C.ModelConfig,
    train: C.TrainConfig,
    shapes: dict[str, tuple],
    step: int,
) -> None:
    """Adam's moments and the carried hidden state must fit the model exactly, or the first step fails."""
    dtype = np.dtype(train.dtype)
    expect: dict[str, tuple[tuple, np.dtype]] = {}
    # Adam's state is always saved (a resume without it would silently restart the optimizer).
    expect["adam.step"] = (
        (),
        np.dtype(np.int64),
    )  # (1,) in files written before 0-d arrays were kept 0-d
    expect.update(
        {f"adam.{m}.{n}": (s, dtype) for m in ("exp_avg", "exp_avg_sq") for n, s in shapes.items()}
    )
    if C.loss_scaled(train):  # fp16: the dynamic loss scale and its count of clean steps
        expect["adam.loss_scale"] = ((), np.dtype(np.float32))
        expect["adam.loss_scale_good_steps"] = ((), np.dtype(np.int64))
    # The carried hidden state too: without it a resume would silently start the streams from zeros.
    h_shape = (model.num_layers, train.batch_size, model.hidden_size)  # (L, B, H)
    expect.update({f"hidden.{k}": (h_shape, dtype) for k in model.state_parts})
    if set(state) != set(expect):
        raise CharclipError(
            f"{where} holds tensors {sorted(set(state) ^ set(expect))} that do not fit the configuration"
        )
    for name, (shape, dt) in expect.items():
        if (
            state[name].shape != shape
            and not (name == "adam.step" and state[name].shape == (1,))
            or state[name].dtype != dt
        ):
            raise CharclipError(
                f"{where}: {name} is {state[name].dtype}{list(state[name].shape)}, expected {dt}{list(shape)}"
            )
    nonfinite = [k for k, v in state.items() if v.dtype.kind == "f" and not np.isfinite(v).all()]
    if (
        nonfinite
    ):  # NaN moments would make the run non-finite; infinite second moments freeze every parameter
        raise CharclipError(
            f"{where}: {', '.join(sorted(nonfinite)[:3])} holds NaN or infinite values, which no "
            "finite training state has; the checkpoint is damaged"
        )
    adam_step = int(state["adam.step"].reshape(()))
    if not 0 <= adam_step <= step:
        raise CharclipError(
            f"{where}: the optimizer has taken {adam_step} steps, not between 0 and the checkpoint's {step}"
        )
    moments = [v for k, v in state.items() if k.startswith("adam.exp_avg")]
    if adam_step == 0 and any(
        np.any(v != 0) for v in moments
    ):  # both backends would drop them and restart Adam
        raise CharclipError(
            f"{where}: the optimizer has taken 0 steps but its moments are not zero"
        )
    if any(np.any(v < 0) for k, v in state.items() if k.startswith("adam.exp_avg_sq.")):
        raise CharclipError(
            f"{where}: Adam's second moment is negative somewhere, which no training produces"
        )
    if "adam.loss_scale" in state:
        scale, good = float(state["adam.loss_scale"]), int(state["adam.loss_scale_good_steps"])
        # Repeated backoff may reach 0 (GradScaler has no floor), so 0 is a scale a run can write.
        if not (math.isfinite(scale) and scale >= 0) or not 0 <= good < train.loss_scale_interval:
            raise CharclipError(
                f"{where}: the loss scale {scale} (after {good} clean steps) is not a finite, "
                f"non-negative number with a count below {train.loss_scale_interval}"
            )
