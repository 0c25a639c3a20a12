"""The training run around a backend's trainer, written once for both backends.

The trainer is anything satisfying `charclip.contract.Trainer`, made by a factory from
`charclip.backends`. This module feeds it batches, shows progress, logs metrics as
JSON lines, validates, checkpoints, and handles Ctrl-C, non-finite steps and divergence.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from charclip import backends
from charclip import checkpoint as ckpt_io
from charclip import corpus, schedules
from charclip.batching import Position, Streams, split
from charclip.config import ModelConfig, TrainConfig
from charclip.contract import NonFiniteStep
from charclip.errors import CharclipError
from charclip.vocab import Vocab
from charclip.weights import init_params

DIVERGENCE_FACTOR = 3.0  # char-rnn's rule: a loss this many times the first one means divergence


class _DeferInterrupt:
    """Ctrl-C asks the loop to stop after the current step instead of breaking into it.

    A KeyboardInterrupt raised inside a step (say, halfway through Adam's in-place
    update) would leave a checkpoint whose parameters and step disagree. A second
    Ctrl-C still stops at once, without a checkpoint.
    """

    requested = False

    def __enter__(self):
        self.previous = None
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


@dataclass
class Data:
    vocab: Vocab
    train: Streams
    val: Streams
    info: dict


def prepare_data(path: str | None, cfg: TrainConfig, vocab: Vocab | None = None) -> Data:
    """Read the corpus, build (or check against) the vocabulary, split and cut into streams."""
    text = corpus.load(path)
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
    """Metrics as JSON lines, one per training step and one per validation."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is not None and path.exists():  # drop what was logged after the checkpoint
            kept = [l for l in path.read_text(encoding="utf-8", errors="replace").splitlines() if l and _step_of(l) <= resume_step]
            path.write_text("".join(l + "\n" for l in kept), encoding="utf-8")
        elif path.exists():
            path.unlink()
        # Line-buffered: a killed run has logged every step it took, so none goes missing on resume.
        self.file = open(path, "a", encoding="utf-8", buffering=1)

    def write(self, **record) -> None:
        self.file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.file.close()


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # a line torn by a crash mid-write: dropped


def read_metrics(path: str | os.PathLike) -> list[dict]:
    return [json.loads(l) for l in Path(path).read_text(encoding="utf-8").splitlines() if l]


def train(
    model_cfg: ModelConfig | None,
    cfg: TrainConfig | None,
    *,
    backend: str,
    out_dir: str | os.PathLike,
    data_path: str | None = None,
    resume: str | None = None,
    device: str = "cpu",
    progress: bool = True,
    sample_chars: int = 300,
    log=print,
    make_trainer=None,
) -> dict:
    """Train (or resume) a run; return a summary. Everything lands in `out_dir`.

    A resumed run keeps the checkpoint's configurations; `cfg.steps` may extend it (cfg None: unchanged).
    `make_trainer` is the trainer factory (`charclip.backends.trainer_factory`; default: one device).
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    start_step, position, adam, hidden = 0, Position(), None, None
    if resume:
        ck = ckpt_io.load(resume)
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
        if start_step >= cfg.steps:
            raise CharclipError(f"the checkpoint is at step {start_step}, already at --steps {cfg.steps}; pass a larger --steps")
    else:
        data = prepare_data(data_path, cfg)
        model_cfg = replace(model_cfg, vocab_size=len(data.vocab))
        if cfg.schedule == "cosine" and cfg.decay_steps == 0:  # fixed now: extending --steps on resume keeps the curve
            cfg = replace(cfg, decay_steps=cfg.steps)
        params = init_params(model_cfg, cfg.seed, cfg.dtype)
    vocab = data.vocab
    out.mkdir(parents=True, exist_ok=True)
    make_trainer = make_trainer or backends.trainer_factory(backend)
    trainer = make_trainer(model_cfg, cfg, params, adam=adam, hidden=hidden, device=device)

    saved: dict[int, Path] = {}

    def save(step: int, pos: Position) -> Path:
        if step not in saved:  # once per step: Ctrl-C just after a periodic checkpoint does not rewrite it
            saved[step] = ckpt_io.save(out, ckpt_io.Checkpoint(
                model=model_cfg, train=cfg, vocab=vocab, params=trainer.params_numpy(), step=step, position=pos,
                backend=backend, corpus=data.info, adam=trainer.adam_state(), hidden=trainer.hidden_state(),
            ))
        return saved[step]

    metrics = Metrics(out / "metrics.jsonl", start_step if resume else None)
    n_params = sum(int(np.prod(v.shape)) for v in params.values())
    log(f"charclip: {backend} backend, {model_cfg.cell} {model_cfg.num_layers}x{model_cfg.hidden_size}, "
        f"{n_params:,} parameters, {data.info['chars']:,} characters, vocabulary {len(vocab)}, "
        f"{data.train.batches_per_epoch} batches per epoch, output in {out}")
    first_loss, warned, clipped, skipped, step, last = None, False, 0, 0, start_step, None
    val_loss = None
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=start_step, disable=not progress, unit="step", dynamic_ncols=True)
    with _DeferInterrupt() as interrupt:
        while step < cfg.steps and not interrupt.requested:
            if position.batch == 0:
                trainer.reset_hidden()  # a new epoch starts the streams afresh
            x, y = data.train.batch(cfg.seed, position)
            lr = schedules.learning_rate(cfg, step)  # the same float for both backends at every step
            try:
                last = trainer.step(x, y, lr=lr)
            except NonFiniteStep as e:
                path = save(step, position)
                raise CharclipError(
                    f"step {step + 1}: the loss or gradient is not finite ({e}); stopped with --nonfinite error. "
                    f"Checkpoint from before this step: {path}. Lower --lr or --clip-norm, or use --nonfinite skip"
                ) from None
            step, position = step + 1, data.train.next(position)
            clipped += last.clipped
            skipped += last.skipped
            metrics.write(step=step, loss=last.loss, grad_norm=last.grad_norm, clipped=last.clipped,
                          skipped=last.skipped, time=round(time.perf_counter() - t0, 4),
                          **({"lr": lr} if cfg.schedule != "constant" else {}))
            if first_loss is None and math.isfinite(last.loss):
                first_loss = last.loss
            if not warned and first_loss is not None and not last.loss <= DIVERGENCE_FACTOR * first_loss:
                warned = True
                bar.write(f"charclip: warning: step {step}: loss {last.loss:.3g} is over {DIVERGENCE_FACTOR:g}x the first "
                          f"loss {first_loss:.3g}: training is diverging; lower --lr or --clip-norm")
            bar.update(1)
            bar.set_postfix(loss=f"{last.loss:.3f}", norm=f"{last.grad_norm:.3g}", val="-" if val_loss is None else f"{val_loss:.3f}")
            if step % cfg.eval_every == 0 or step == cfg.steps:
                val_loss = trainer.evaluate(data.val.eval_batches(cfg.eval_batches))
                metrics.write(step=step, val_loss=val_loss)
            if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                save(step, position)
    bar.close()
    metrics.close()
    path = save(step, position)
    if interrupt.requested:
        log(f"charclip: interrupted at step {step}; checkpoint written to {path}; continue with --resume {out}")
        raise SystemExit(130)
    elapsed = time.perf_counter() - t0
    ran = step - start_step
    summary = {
        "backend": backend, "steps": step, "train_loss": last.loss if last else None, "val_loss": val_loss,
        "clipped_fraction": clipped / max(ran, 1), "skipped_steps": skipped, "seconds": round(elapsed, 2),
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
        summary["sample"] = sample_mod.sample(model_cfg, trainer.params_numpy(), vocab, prime, sample_chars,
                                              temperature=0.8, seed=cfg.seed, device=device)
    return summary
