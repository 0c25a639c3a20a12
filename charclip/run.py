"""The training run around a backend's trainer, written once for both backends.

The trainer is anything satisfying `charclip.contract.Trainer`, made by a factory from
`charclip.backends`. This module feeds it batches, each step's learning rate
(`charclip.schedules`) and dropout masks (`charclip.dropout`), shows progress, logs
metrics as JSON lines, validates, checkpoints, and handles stop signals (Ctrl-C,
SIGTERM, SIGHUP), non-finite steps and divergence. It holds the run folder's lock
(`charclip.runfolder`) from before its first write to its end.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from charclip import backends
from charclip import checkpoint as ckpt_io
from charclip import corpus, dropout, runfolder, schedules, signals
from charclip.batching import Position, Streams, split
from charclip.config import ModelConfig, RunOptions, TrainConfig
from charclip.contract import NonFiniteStep
from charclip.errors import CharclipError
from charclip.vocab import Vocab
from charclip.weights import init_params

OVERFLOWS_SHOWN = 3  # fp16 loss-scale overflows reported on the console (all are in metrics.jsonl)
DIVERGENCE_FACTOR = 3.0  # char-rnn's rule: a loss this many times the first one means divergence


class _DeferInterrupt(signals.Deferred):
    """Ctrl-C, SIGTERM or SIGHUP asks the loop to stop after the current step instead of breaking into it.

    A KeyboardInterrupt raised inside a step (say, halfway through Adam's in-place
    update) would leave a checkpoint whose parameters and step disagree. A second
    stop signal still stops at once, without a checkpoint.
    """


@dataclass
class Data:
    vocab: Vocab
    train: Streams
    val: Streams
    info: dict


def prepare_data(path: str | None, cfg: TrainConfig, vocab: Vocab | None = None) -> Data:
    """Read the corpus, build (or check against) the vocabulary, split and cut into streams."""
    text = corpus.load(path)
    if path is not None:  # every checkpoint stores the corpus's absolute path, as UTF-8 JSON
        runfolder.require_utf8(Path(path).resolve(), "--data")
    vocab = vocab or Vocab.from_text(text)
    tokens = vocab.encode(text, what=f"the corpus {path or '(embedded Shakespeare)'}")
    train_tok, val_tok = split(tokens, cfg.val_fraction)
    train = Streams(train_tok, cfg.batch_size, cfg.seq_len)
    # Validation uses as many parallel streams as its text allows, up to the batch size.
    val_batch = min(cfg.batch_size, (len(val_tok) - cfg.seq_len) // (cfg.seq_len + 1))
    if val_batch < 1:
        raise CharclipError(
            f"the validation split has {len(val_tok)} characters, too few for one sequence of {cfg.seq_len}; "
            "use a longer corpus, a larger --val-fraction or a smaller --seq-len"
        )
    val = Streams(val_tok, val_batch, cfg.seq_len, what="validation text")
    # The path is stored absolute: resume and eval may run from another directory.
    info = {"path": str(Path(path).resolve()) if path else None, "sha256_16": corpus.fingerprint(text), "chars": len(text)}
    return Data(vocab, train, val, info)


class Metrics:
    """Metrics as JSON lines, one per training step and one per validation.

    On resume the history is cut back to the checkpoint's step (lines logged after it are
    dropped) by writing a new file and renaming it over the old one, so a kill at any
    moment leaves either the old history or the new one, whole. Lines that are not a
    JSON object with an integer step (damage, a line torn by a crash) are dropped too.
    The time column continues from the kept history.
    """

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if path.exists() and not path.is_file():
            raise CharclipError(f"{path} is not a file; move it out of the run folder")
        kept = [r for r in read_records(path) if r["step"] <= resume_step] if resume_step is not None else []
        # Rewritten whole: a line an older charclip wrote with a bare NaN becomes JSON (null and a flag).
        _replace_file(path, "".join(json_line(r) for r in kept))
        trained = [r for r in kept if "loss" in r]
        self.logged_steps = len(trained)
        self.clipped = sum(r.get("clipped") is True for r in trained)
        self.skipped = sum(r.get("skipped") is True for r in trained)
        self.overflows = sum(r.get("overflow") is True for r in trained)  # fp16 steps skipped for an overflow
        self.best_val = min((r["val_loss"] for r in kept if _finite(r.get("val_loss"))), default=math.inf)
        self.last_loss = trained[-1].get("loss") if trained else None  # the kept history's, for a closing-only resume
        self.last_val = next((r["val_loss"] for r in reversed(kept) if "val_loss" in r), None)
        self.time_offset = max((r["time"] for r in trained if _finite(r.get("time"))), default=0.0)
        # Line-buffered: a killed run has logged every step it took, so none goes missing on resume.
        # O_NOFOLLOW: the file just renamed into place is appended to, never a link made since.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        self.file = open(fd, "a", encoding="utf-8", buffering=1)

    def write(self, **record) -> None:
        if "loss" in record:
            self.logged_steps += 1
            self.clipped += bool(record.get("clipped"))
            self.skipped += bool(record.get("skipped"))
            self.overflows += bool(record.get("overflow"))
        self.file.write(json_line(record))

    def close(self) -> None:
        self.file.close()


def _scale_record(r) -> dict:
    """fp16's loss-scale columns of a step's metrics line: the scale it used, and whether it overflowed."""
    return {} if r.loss_scale is None else {"loss_scale": r.loss_scale, "overflow": r.overflow}


def json_line(record: dict) -> str:
    """One metrics line, strict JSON: a NaN or infinite value is written as null, and its key is listed
    under "nonfinite" (bare NaN, which Python's json writes by default, is no JSON)."""
    bad = sorted(k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v))
    if bad:
        flagged = record.get("nonfinite") if isinstance(record.get("nonfinite"), list) else []
        record = {**{k: None if k in bad else v for k, v in record.items()},
                  "nonfinite": sorted(set(flagged) | set(bad), key=str)}
    return json.dumps(record, allow_nan=False) + "\n"


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def read_records(path: Path) -> list[dict]:
    """The well-formed records of a metrics file: JSON objects whose step is a non-negative integer."""
    if not path.is_file():
        return []
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                r = json.loads(line)
            except (ValueError, RecursionError):
                continue  # a line torn by a crash mid-write, or damage: dropped
            if isinstance(r, dict) and isinstance(r.get("step"), int) and not isinstance(r["step"], bool) and r["step"] >= 0:
                records.append(r)
    return records


def _replace_file(path: Path, text: str) -> None:
    """Write `text` to a new file beside `path`, sync it, and rename it over `path` (atomic, no link followed)."""
    runfolder.write_file(path, text)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    return [json.loads(l) for l in Path(path).read_text(encoding="utf-8").splitlines() if l]


def describe_clipped(clipped: int, steps: int) -> str:
    """The clipped share as the closing line and the plot's legend both say it."""
    return f"{clipped} of {steps} steps clipped ({clipped / max(steps, 1):.1%})"


def memory_estimate(model_cfg: ModelConfig, cfg: TrainConfig) -> tuple[int, int]:
    """(parameters, bytes) of a training step, roughly: parameters, gradients and Adam's two moments
    (plus a NumPy copy at checkpoints), and the activations kept for the backward pass."""
    B, T, H, L = cfg.batch_size, cfg.seq_len, model_cfg.hidden_size, model_cfg.num_layers
    V, E, G = model_cfg.vocab_size, model_cfg.embedding_dim, model_cfg.gates
    n = V * E + G * H * (E + H + 2) + (L - 1) * G * H * (2 * H + 2) + V * H + V  # weights.param_shapes, summed
    acts = B * T * (model_cfg.embedding_dim + L * (model_cfg.gates + 2) * H + 3 * model_cfg.vocab_size)
    return n, np.dtype(cfg.dtype).itemsize * (5 * n + 2 * acts)


def machine_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _read_int(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None  # "max" (cgroup v2): no limit


def _own_address_space() -> int:
    """Bytes of address space this process maps now (VmSize), 0 where /proc does not say."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def memory_limits() -> list[tuple[str, int]]:
    """(what, bytes still available) for every bound on this process's memory that can be read: the
    machine's physical memory, the address-space limit (`ulimit -v`, less what is mapped already) and
    the cgroup's limit (containers; less what the cgroup uses already)."""
    limits = []
    have = machine_memory()
    if have is not None:
        limits.append(("this machine has", have))
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            limits.append(("the address-space limit (ulimit -v) leaves", max(soft - _own_address_space(), 0)))
    except (ImportError, AttributeError, OSError, ValueError):
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit = _read_int(limit_file)
        if limit is not None and (have is None or limit < have):  # v1 reports "no limit" as a huge number
            limits.append(("the container's memory limit (cgroup) leaves", max(limit - (_read_int(usage_file) or 0), 0)))
            break
    return limits


def check_memory(model_cfg: ModelConfig, cfg: TrainConfig) -> None:
    """Refuse, before allocating anything, a model that cannot fit in the memory this process may use."""
    n, need = memory_estimate(model_cfg, cfg)
    for what, have in memory_limits():
        if need > have:
            raise CharclipError(f"this model needs about {_gib(need)} of memory ({n:,} parameters), but {what} "
                                f"{_gib(have)}; use a smaller --hidden, --embed, --layers or --batch-size")


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def _closed(out: Path, step: int) -> bool:
    """Whether the run in `out` finished its closing phase at `step`: its summary.json says so."""
    try:
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(summary, dict) and summary.get("steps") == step


def run_folder_of(checkpoint_folder: Path) -> Path | None:
    """The run folder a step folder belongs to (RUN for RUN/checkpoints/step-N), or None for a loose one."""
    p = Path(checkpoint_folder)
    return p.parent.parent if p.parent.name == "checkpoints" else None


def train(
    model_cfg: ModelConfig | None,
    cfg: TrainConfig | None,
    *,
    backend: str,
    out_dir: str | os.PathLike,
    data_path: str | None = None,
    resume: str | os.PathLike | ckpt_io.Checkpoint | None = None,
    device: str = "cpu",
    progress: bool = True,
    sample_chars: int = RunOptions.sample_chars,
    keep: int = RunOptions.keep,
    overwrite: bool = False,
    log=print,
    make_trainer=None,
) -> dict:
    """Train (or resume) a run; return a summary. Everything lands in `out_dir`.

    `resume` is a checkpoint path or an already loaded `Checkpoint`. A resumed run keeps the
    checkpoint's configurations; `cfg.steps` may extend it (cfg None: unchanged). A fresh run
    (or a resumed one written to another folder) needs `out_dir` new or empty, unless
    `overwrite`. `keep`: newest checkpoints kept (see `charclip.checkpoint`). `make_trainer`
    replaces the backend's `Trainer` class (same arguments), e.g. a multi-device one.
    """
    if keep < 1:
        raise CharclipError(f"--keep must be 1 or more, got {keep}")
    out = Path(out_dir)
    runfolder.require_utf8(out, "--out")  # the console prints it, the summary stores it
    try:
        with contextlib.ExitStack() as lock:
            return _train(model_cfg, cfg, backend=backend, out=out, data_path=data_path, resume=resume, device=device,
                          progress=progress, sample_chars=sample_chars, keep=keep, overwrite=overwrite, log=log,
                          make_trainer=make_trainer, lock=lock)
    except OSError as e:  # a full disk, a read-only file system: the last checkpoint written is whole
        try:
            where = f"the last whole checkpoint is {ckpt_io.resolve(out)}"
        except CharclipError:
            where = "no checkpoint was written"
        raise CharclipError(f"{runfolder.os_error(e, f'cannot write the run in {out}')}; {where}") from None


def _train(model_cfg, cfg, *, backend, out, data_path, resume, device, progress, sample_chars, keep, overwrite, log,
           make_trainer, lock: contextlib.ExitStack) -> dict:
    from tqdm.auto import tqdm

    start_step, position, adam, hidden = 0, Position(), None, None
    if resume is not None:
        ck = resume if isinstance(resume, ckpt_io.Checkpoint) else ckpt_io.load(resume)
        model_cfg, vocab = ck.model, ck.vocab
        cfg = replace(ck.train, steps=cfg.steps) if cfg is not None and cfg.steps != ck.train.steps else ck.train
        data = prepare_data(data_path if data_path is not None else ck.corpus.get("path"), cfg, vocab)
        if data.info["sha256_16"] != ck.corpus.get("sha256_16"):
            log("charclip: note: the corpus differs from the one this checkpoint was trained on (fine-tuning)")
        params, adam, hidden = ck.params, ck.adam, ck.hidden
        start_step, position = ck.step, ck.position
        if position.batch >= data.train.batches_per_epoch:  # a shorter corpus than the checkpoint's: an index error later
            log(f"charclip: note: this corpus has {data.train.batches_per_epoch} batches per epoch, fewer than the "
                f"checkpoint's position {position.batch}; continuing from the start of epoch {position.epoch + 1}")
            position = Position(position.epoch + 1, 0)
    else:
        data = prepare_data(data_path, cfg)
        model_cfg = replace(model_cfg, vocab_size=len(data.vocab))
        check_memory(model_cfg, cfg)
        params = init_params(model_cfg, cfg.seed, cfg.dtype)
        if cfg.schedule == "cosine" and cfg.decay_steps == 0:  # fixed now: extending --steps on resume keeps the curve
            cfg = replace(cfg, decay_steps=cfg.steps)
    vocab = data.vocab
    same_run = resume is not None and ck.path is not None and run_folder_of(ck.path) is not None and (
        run_folder_of(ck.path).resolve() == out.resolve())
    # A finished run whose closing phase (plot, sample, summary: summary.json is written last) did
    # not complete, say for a full disk or a signal, gets that phase redone; otherwise there is nothing to do.
    finishing = resume is not None and start_step >= cfg.steps
    if finishing and not (same_run and not _closed(out, start_step)):
        raise CharclipError(f"the checkpoint is at step {start_step}, already at --steps {cfg.steps}; pass a larger --steps")
    if not same_run and not overwrite and out.is_dir():
        runfolder.claim(out, overwrite=False)  # refused before even the lock file is made in someone's folder
    # Everything is checked; from here on the run folder is written, by this process alone.
    runfolder.create(out)
    lock.enter_context(runfolder.Lock(out))
    runfolder.check_links(out)
    runfolder.remove_stale_temporaries(out)  # of writers killed mid-write: under the lock, none is alive
    if not same_run:  # again under the lock: another run may have started in it meanwhile
        runfolder.claim(out, overwrite=overwrite)
    else:  # resumed from an older step folder: LATEST moves back to it before the metrics are cut back to it
        ckpt_io.point_latest(out, ck.path)
    make_trainer = make_trainer or backends.trainer_factory(backend)
    trainer = make_trainer(model_cfg, cfg, params, adam=adam, hidden=hidden, device=device)

    saved: dict[int, Path] = {}

    def save(step: int, pos: Position, best: bool = False) -> Path:
        if step not in saved:  # once per step: Ctrl-C just after a periodic checkpoint does not rewrite it
            try:
                saved[step] = ckpt_io.save(out, ckpt_io.Checkpoint(
                    model=model_cfg, train=cfg, vocab=vocab, params=trainer.params_numpy(), step=step, position=pos,
                    backend=backend, corpus=data.info, adam=trainer.adam_state(), hidden=trainer.hidden_state(),
                ), keep=keep, best=best)
            except ckpt_io.NonFiniteCheckpoint as e:  # --nonfinite propagate let NaN in: keep the last whole one
                try:
                    where = f"the last whole checkpoint is {ckpt_io.resolve(out)}"
                except CharclipError:
                    where = "no checkpoint was written"
                raise CharclipError(f"{e}; {where}; --nonfinite error or skip keep a run finite") from None
        elif best:
            ckpt_io.mark_best(out, saved[step], keep=keep)
        return saved[step]

    metrics = Metrics(out / "metrics.jsonl", start_step if same_run else None)
    n_params = sum(int(np.prod(v.shape)) for v in params.values())
    log(f"charclip: {backend} backend, {model_cfg.cell} {model_cfg.num_layers}x{model_cfg.hidden_size}, "
        f"{n_params:,} parameters, {data.info['chars']:,} characters, vocabulary {len(vocab)}, "
        f"{data.train.batches_per_epoch} batches per epoch, output in {out}")
    first_loss, warned, step, last, scale_warned = None, False, start_step, None, False
    val_loss = None
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=start_step, disable=not progress, unit="step", dynamic_ncols=True)
    with _DeferInterrupt() as interrupt:
        while step < cfg.steps and not interrupt.requested:
            if position.batch == 0:
                trainer.reset_hidden()  # a new epoch starts the streams afresh
            x, y = data.train.batch(cfg.seed, position)
            lr = schedules.learning_rate(cfg, step)  # the same float for both backends at every step
            masks = dropout.masks(model_cfg, cfg, step, *x.shape)  # keyed by the step: a resumed run draws the same
            try:
                last = trainer.step(x, y, lr=lr, masks=masks)
            except NonFiniteStep as e:
                path = save(step, position)
                raise CharclipError(
                    f"step {step + 1}: the loss or gradient is not finite ({e}); stopped with --nonfinite error. "
                    f"Checkpoint from before this step: {path}. Lower --lr or --clip-norm, or use --nonfinite skip"
                ) from None
            step, position = step + 1, data.train.next(position)
            metrics.write(step=step, loss=last.loss, grad_norm=last.grad_norm, clipped=last.clipped,
                          skipped=last.skipped, time=round(metrics.time_offset + time.perf_counter() - t0, 4),
                          **({"lr": lr} if cfg.schedule != "constant" else {}), **_scale_record(last))
            if last.overflow and metrics.overflows <= OVERFLOWS_SHOWN:
                more = "; further ones go to metrics.jsonl only" if metrics.overflows == OVERFLOWS_SHOWN else ""
                bar.write(f"charclip: step {step}: the fp16 gradient overflowed at loss scale {last.loss_scale:g}; "
                          f"step skipped, scale now {last.loss_scale * cfg.loss_scale_backoff:g}{more}")
            if last.loss_scale is not None and last.loss_scale < 1 and not scale_warned:
                scale_warned = True  # GradScaler's rule has no floor: every further overflow halves it again
                bar.write(f"charclip: warning: step {step}: the fp16 loss scale has fallen to {last.loss_scale:g}: the "
                          "float16 pass overflows even unscaled; use --precision bf16 or full, or lower --lr")
            if first_loss is None and math.isfinite(last.loss):
                first_loss = last.loss
            if not warned and first_loss is not None and not last.loss <= DIVERGENCE_FACTOR * first_loss:
                warned = True
                bar.write(f"charclip: warning: step {step}: loss {last.loss:.3g} is over {DIVERGENCE_FACTOR:g}x the first "
                          f"loss {first_loss:.3g}: training is diverging; lower --lr or --clip-norm")
            bar.update(1)
            chars_per_s = (step - start_step) * cfg.batch_size * cfg.seq_len / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{last.loss:.3f}", norm=f"{last.grad_norm:.3g}", val="-" if val_loss is None else f"{val_loss:.3f}",
                            chars_s=f"{chars_per_s:,.0f}", **({} if last.loss_scale is None else {"scale": f"{last.loss_scale:g}"}))
            if step % cfg.eval_every == 0 or step == cfg.steps:
                val_loss = trainer.evaluate(data.val.eval_batches(cfg.eval_batches))
                metrics.write(step=step, val_loss=val_loss)
                if _finite(val_loss) and val_loss < metrics.best_val:  # kept whatever its age, as BEST
                    metrics.best_val = val_loss
                    save(step, position, best=True)
            if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                save(step, position)
        bar.close()
        metrics.close()
        path = ck.path if finishing else save(step, position)
    if finishing:
        log(f"charclip: the run had reached step {step} but not finished its closing phase; finished it now")
    if interrupt.requested:
        log(f"charclip: interrupted at step {step}; checkpoint written to {path}; continue with --resume {out}")
        raise SystemExit(128 + interrupt.requested)
    elapsed = time.perf_counter() - t0
    summary = {
        "backend": backend, "steps": step, "steps_run": step - start_step,
        "train_loss": last.loss if last else metrics.last_loss,
        "val_loss": metrics.last_val if val_loss is None else val_loss,
        "logged_steps": metrics.logged_steps, "clipped_steps": metrics.clipped,
        "clipped_fraction": metrics.clipped / max(metrics.logged_steps, 1), "skipped_steps": metrics.skipped,
        "overflow_steps": metrics.overflows, "precision": cfg.precision,
        "seconds": round(elapsed, 2), "chars_per_second": round((step - start_step) * cfg.batch_size * cfg.seq_len
                                                                 / max(elapsed, 1e-9), 1),
        "checkpoint": str(path), "metrics": str(out / "metrics.jsonl"),
    }
    try:
        from charclip.plots import plot_training

        summary["plot"] = str(plot_training(out / "metrics.jsonl", out / "training.png", cfg.clip.threshold))
    except ImportError:
        log("charclip: note: matplotlib is not installed; skipped the loss plot")
    if sample_chars:
        sample_mod = backends.module(backend, "sample")
        prime = "\n" if "\n" in vocab.chars else vocab.chars[0]  # a corpus without newlines has no "\n" to start from
        try:
            summary["sample"] = sample_mod.sample(model_cfg, trainer.params_numpy(), vocab, prime, sample_chars,
                                                  temperature=0.8, seed=cfg.seed, device=device)
        except CharclipError as e:  # e.g. non-finite parameters after --nonfinite propagate: the run itself is saved
            log(f"charclip: note: no closing sample: {e}")
    # The run's summary beside its metrics; NaN and infinities have no JSON spelling: null.
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in summary.items()}
    _replace_file(out / "summary.json", json.dumps(clean, indent=1) + "\n")
    return summary
