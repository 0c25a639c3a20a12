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
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from charclip import backends, corpus, dropout, runfolder, schedules, signals
from charclip import checkpoint as ckpt_io
from charclip.batching import Position, Streams, split
from charclip.config import ModelConfig, RunOptions, TrainConfig
from charclip.contract import NonFiniteStep
from charclip.errors import CharclipError

# read_metrics is named here too for callers that imported it from charclip.run
from charclip.metrics import Metrics, finite, json_safe, read_metrics  # noqa: F401
from charclip.vocab import Vocab
from charclip.weights import init_params

BAR_COLUMNS = 100  # the progress bar's width where the terminal reports none
OVERFLOWS_SHOWN = 3  # fp16 loss-scale overflows reported on the console (all are in metrics.jsonl)
DIVERGENCE_FACTOR = 3.0  # char-rnn's rule: a loss this many times the first one means divergence


def diverged(losses) -> bool:
    """The rule over a finished run's losses: one is not finite, or one exceeds
    DIVERGENCE_FACTOR times the first (the experiments' copy of the loop's warning)."""
    arr = np.asarray(losses, dtype=float)
    return bool(not np.isfinite(arr).all() or np.nanmax(arr) > DIVERGENCE_FACTOR * arr[0])


class _DeferInterrupt(signals.Deferred):
    """Ctrl-C, SIGTERM or SIGHUP asks the loop to stop after the current step, not break into it.

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
            f"the validation split has {len(val_tok)} characters, too few for one sequence of "
            f"{cfg.seq_len}; "
            "use a longer corpus, a larger --val-fraction or a smaller --seq-len"
        )
    val = Streams(val_tok, val_batch, cfg.seq_len, what="validation text")
    # The path is stored absolute: resume and eval may run from another directory.
    info = {
        "path": str(Path(path).resolve()) if path else None,
        "sha256_16": corpus.fingerprint(text),
        "chars": len(text),
    }
    return Data(vocab, train, val, info)


def _scale_record(r) -> dict:
    """fp16's loss-scale columns of a step's metrics line: the scale it used, and whether it
    overflowed."""
    return {} if r.loss_scale is None else {"loss_scale": r.loss_scale, "overflow": r.overflow}


def memory_estimate(model_cfg: ModelConfig, cfg: TrainConfig) -> tuple[int, int]:
    """(parameters, bytes) of a training step, roughly: parameters, gradients and Adam's two moments
    (plus a NumPy copy at checkpoints), and the activations kept for the backward pass."""
    B, T, H, L = cfg.batch_size, cfg.seq_len, model_cfg.hidden_size, model_cfg.num_layers
    V, E, G = model_cfg.vocab_size, model_cfg.embedding_dim, model_cfg.gates
    n = (
        V * E + G * H * (E + H + 2) + (L - 1) * G * H * (2 * H + 2) + V * H + V
    )  # weights.param_shapes, summed
    acts = (
        B * T * (model_cfg.embedding_dim + L * (model_cfg.gates + 2) * H + 3 * model_cfg.vocab_size)
    )
    return n, np.dtype(cfg.dtype).itemsize * (5 * n + 2 * acts)


def machine_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _read_int(path) -> int | None:
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


CGROUP_ROOT = Path("/sys/fs/cgroup")  # where the cgroup file systems are mounted
PROC_CGROUP = Path("/proc/self/cgroup")  # which cgroups this process is in
_CGROUP_V2 = ("", "memory.max", "memory.current")  # (hierarchy folder, limit, usage)
_CGROUP_V1 = ("memory", "memory.limit_in_bytes", "memory.usage_in_bytes")
_NO_LIMIT = 1 << 62  # cgroup v1 spells "no limit" as about 2**63 bytes


def _cgroup_folders(root: Path, membership: Path) -> list[tuple[Path, str, str]]:
    """(folder, limit file, usage file) for this process's memory cgroup and each of its ancestors,
    innermost first, from /proc/self/cgroup: `0::/PATH` (v2) or `N:...memory...:/PATH` (v1)."""
    try:
        lines = membership.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        lines = []
    found = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        number, controllers, path = parts
        if number == "0" and controllers == "":
            sub, limit, usage = _CGROUP_V2
        elif "memory" in controllers.split(","):
            sub, limit, usage = _CGROUP_V1
        else:
            continue
        base = root / sub if sub else root
        folder = base.joinpath(*[p for p in path.split("/") if p and p != ".."])
        while True:  # a limit on any ancestor bounds this process too
            found.append((folder, limit, usage))
            if folder == base:
                break
            folder = folder.parent
    if not found:  # no /proc: the mount's top folders, which a container shows as its own group
        found = [
            (root / sub if sub else root, limit, usage)
            for sub, limit, usage in (_CGROUP_V2, _CGROUP_V1)
        ]
    return found


def cgroup_memory_left(root: Path = CGROUP_ROOT, membership: Path = PROC_CGROUP) -> int | None:
    """Bytes this process may still allocate under its cgroups' memory limits (containers,
    systemd slices, batch schedulers), or None where no limit is set or none can be read.

    For the process's memory cgroup and each ancestor that sets a limit (v2 `memory.max`, v1
    `memory.limit_in_bytes`), the limit less that group's usage (`memory.current`,
    `memory.usage_in_bytes`); the smallest. `root` and `membership` are the cgroup mount and
    /proc/self/cgroup, to be pointed elsewhere by tests."""
    left = None
    for folder, limit_file, usage_file in _cgroup_folders(Path(root), Path(membership)):
        limit = _read_int(folder / limit_file)
        if limit is None or limit >= _NO_LIMIT:
            continue
        here = max(limit - (_read_int(folder / usage_file) or 0), 0)
        left = here if left is None else min(left, here)
    return left


def memory_limits() -> list[tuple[str, int]]:
    """(what, bytes still available) for every bound on this process's memory that can be read: the
    machine's physical memory, the address-space limit (`ulimit -v`, less what is mapped already)
    and the cgroups' limits (less what the groups use already; `cgroup_memory_left`)."""
    limits = []
    have = machine_memory()
    if have is not None:
        limits.append(("this machine has", have))
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            limits.append(
                ("the address-space limit (ulimit -v) leaves", max(soft - _own_address_space(), 0))
            )
    except (ImportError, AttributeError, OSError, ValueError):
        pass
    left = cgroup_memory_left(CGROUP_ROOT, PROC_CGROUP)  # read at each call: tests point them away
    if left is not None and (have is None or left < have):
        limits.append(("the memory limit of this process's cgroup (container) leaves", left))
    return limits


def check_memory(model_cfg: ModelConfig, cfg: TrainConfig) -> None:
    """Refuse, before allocating anything, a model that cannot fit in the memory this process may
    use."""
    n, need = memory_estimate(model_cfg, cfg)
    for what, have in memory_limits():
        if need > have:
            raise CharclipError(
                f"this model needs about {_gib(need)} of memory ({n:,} parameters), but {what} "
                f"{_gib(have)}; use a smaller --hidden, --embed, --layers or --batch-size"
            )


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def run_folder_of(checkpoint_folder: Path) -> Path | None:
    """The run folder a step folder belongs to (RUN for RUN/checkpoints/step-N), or None for a
    loose one."""
    p = Path(checkpoint_folder)
    return p.parent.parent if p.parent.name == "checkpoints" else None


# ---- where a run starts: fresh, or from a checkpoint (the resume rules, all here) -------


def resolve(
    options: RunOptions, resumed: ckpt_io.Checkpoint | None = None
) -> tuple[RunOptions, ckpt_io.Checkpoint | None]:
    """`options` with the backend and the run folder filled in, and the checkpoint to resume from.

    The checkpoint is loaded once, here (`resumed`: already loaded). A resumed run continues in the
    backend that wrote it and, unless --out says otherwise, in the run folder its step folder is in;
    a fresh run goes to runs/<backend>-<time>.
    """
    if options.resume is not None and resumed is None:
        resumed = ckpt_io.load(options.resume)
    backend = options.backend or (resumed.backend if resumed is not None else "torch")
    out = options.out
    if out is None and resumed is not None:
        out = run_folder_of(resumed.path)
        if out is None:
            raise CharclipError(
                f"{resumed.path} is a checkpoint folder outside a run folder; "
                "pass --out DIR for the resumed run"
            )
    out = str(out or f"runs/{backend}-{time.strftime('%Y%m%d-%H%M%S')}")
    return replace(options, backend=backend, out=out), resumed


def load_hint(load: float | None = None, cores: int | None = None) -> str | None:
    """A one-line hint when the machine is busier than it has cores (1-minute load average), else
    None.

    torch's default thread count (one per core) competes with the other load, which made a default
    run many times slower on a loaded 2-core machine (issue 21); one thread is the cure.
    """
    try:
        load = os.getloadavg()[0] if load is None else load
    except (OSError, AttributeError):  # no load average on this platform
        return None
    if cores is None:
        cores = (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count() or 1
        )
    if load <= cores or os.environ.get("OMP_NUM_THREADS"):
        return None
    return (
        f"charclip: note: the load average ({load:.1f}) exceeds the {cores} cores; torch's default "
        "threads can make training many times slower under load: try OMP_NUM_THREADS=1 "
        "(docs/usage.md)"
    )


def launch(
    model_cfg: ModelConfig,
    cfg: TrainConfig | None,
    options: RunOptions,
    *,
    resumed: ckpt_io.Checkpoint | None = None,
    log=print,
) -> dict:
    """Train as `charclip train` does: resolve the options, then run `train` on the devices asked
    for.

    `cfg` None on resume keeps the checkpoint's configuration (else its --steps extends it);
    `resumed`: the checkpoint of `options.resume`, if the caller has loaded it already.
    """
    options, resumed = resolve(options, resumed)
    torch = options.backend == "torch"
    hint = load_hint() if torch else None
    if hint:
        log(hint)
    world, layout, other = (
        (options.nproc, options.parallel, options.devices)
        if torch
        else (options.devices, options.mesh, options.nproc)
    )
    if other != 1:
        raise CharclipError("--nproc is for --backend torch and --devices for --backend jax")
    run_on = backends.launcher(options.backend, world, layout if world > 1 else None)
    return run_on(train, model_cfg, cfg, options=options, resumed=resumed, log=log)


def _options_of(keywords: dict, resumed) -> tuple[RunOptions, ckpt_io.Checkpoint | None]:
    """The RunOptions of a call in the keyword spelling (backend=, out_dir=, data_path=, resume=,
    device=, progress=, sample_chars=, keep=, overwrite=); `resume` may be a loaded Checkpoint."""
    names = {"out_dir": "out", "data_path": "data", "progress": "no_progress"}
    unknown = (
        set(keywords)
        - set(names)
        - {"backend", "resume", "device", "sample_chars", "keep", "overwrite"}
    )
    if unknown:
        raise TypeError(f"train() got unexpected keyword arguments {sorted(unknown)}")
    given = {names.get(k, k): v for k, v in keywords.items()}
    if "no_progress" in given:
        given["no_progress"] = not given["no_progress"]
    for k in ("out", "resume"):
        if isinstance(given.get(k), os.PathLike):
            given[k] = os.fspath(given[k])
    if isinstance(given.get("resume"), ckpt_io.Checkpoint):
        resumed = given["resume"]
        given["resume"] = str(resumed.path)
    return RunOptions(**given), resumed


def train(
    model_cfg: ModelConfig | None,
    cfg: TrainConfig | None,
    options: RunOptions | None = None,
    *,
    resumed: ckpt_io.Checkpoint | None = None,
    log=print,
    make_trainer=None,
    **keywords,
) -> dict:
    """Train (or resume) a run in one process; return its summary. Everything lands in
    `options.out`.

    A resumed run (`options.resume`, or `resumed`, the checkpoint already loaded) keeps the
    checkpoint's configurations; `cfg.steps` may extend it (cfg None: unchanged). A fresh run (or a
    resumed one written to another folder) needs its folder new or empty, unless
    `options.overwrite`.
    `make_trainer` replaces the backend's `Trainer` class (same arguments), e.g. a multi-device one.
    The options may also be given as keywords (`backend="jax", out_dir=..., data_path=...`, see
    `_options_of`). Returns the summary `summary.json` also holds.
    """
    if keywords:
        if options is not None:
            raise TypeError("train() takes options or their keywords, not both")
        options, resumed = _options_of(keywords, resumed)
    options, resumed = resolve(options or RunOptions(), resumed)
    out = Path(options.out)
    runfolder.require_utf8(out, "--out")  # the console prints it, the summary stores it
    try:
        with contextlib.ExitStack() as lock:
            return Run(model_cfg, cfg, options, resumed, log=log, make_trainer=make_trainer).train(
                lock
            )
    except (
        OSError
    ) as e:  # a full disk, a read-only file system: the last checkpoint written is whole
        raise CharclipError(
            f"{runfolder.os_error(e, f'cannot write the run in {out}')}; {_last_whole(out)}"
        ) from None


def _last_whole(out: Path) -> str:
    try:
        return f"the last whole checkpoint is {ckpt_io.resolve(out)}"
    except CharclipError:
        return "no checkpoint was written"


def _closed(out: Path, step: int) -> bool:
    """Whether the run in `out` finished its closing phase at `step`: its summary.json says so."""
    try:
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(summary, dict) and summary.get("steps") == step


# ---- the run ---------------------------------------------------------------------------


class Run:
    """One training run, its steps named as the loop reads:

    prepare_data -> build_or_resume -> claim_folder -> (step, validate, checkpoint)* -> finish
    """

    def __init__(
        self,
        model_cfg: ModelConfig | None,
        cfg: TrainConfig | None,
        options: RunOptions,
        resumed: ckpt_io.Checkpoint | None,
        *,
        log=print,
        make_trainer=None,
    ):
        self.options, self.resumed, self.log = options, resumed, log
        self.backend, self.out = options.backend, Path(options.out)
        self.make_trainer = make_trainer
        self.model_cfg, self.cfg = model_cfg, cfg
        self.start_step, self.position = 0, Position()
        self.saved: dict[int, Path] = {}  # step -> its checkpoint folder, written once per step
        self.last = None  # the last step's StepResult
        self.val_loss = None  # the last validation loss of this invocation

    def train(self, lock: contextlib.ExitStack) -> dict:
        """The whole run; `lock` holds the run folder's lock until the caller's block ends."""
        self.prepare_data()
        self.build_or_resume()
        self.claim_folder(lock)
        make_trainer = self.make_trainer or backends.trainer_factory(self.backend)
        self.trainer = make_trainer(
            self.model_cfg,
            self.cfg,
            self.params,
            adam=self.adam,
            hidden=self.hidden,
            device=self.options.device,
        )
        self.metrics = Metrics(
            self.out / "metrics.jsonl", self.start_step if self.same_run else None
        )
        self.log(
            f"charclip: {self.backend} backend, {self.model_cfg.cell} {self.model_cfg.num_layers}x"
            f"{self.model_cfg.hidden_size}, {self._n_params():,} parameters, "
            f"{self.data.info['chars']:,} characters, vocabulary {len(self.data.vocab)}, "
            f"{self.data.train.batches_per_epoch} batches per epoch, output in {self.out}"
        )
        return self.loop()

    def prepare_data(self) -> None:
        """The corpus, cut into training and validation streams (a resumed run: the checkpoint's
        vocabulary and configuration, its corpus unless --data names another)."""
        ck, path = self.resumed, self.options.data
        if ck is None:
            self.data = prepare_data(path, self.cfg)
            return
        cfg = self.cfg
        self.cfg = (
            replace(ck.train, steps=cfg.steps)
            if cfg is not None and cfg.steps != ck.train.steps
            else ck.train
        )
        self.data = prepare_data(
            path if path is not None else ck.corpus.get("path"), self.cfg, ck.vocab
        )
        if self.data.info["sha256_16"] != ck.corpus.get("sha256_16"):
            self.log(
                "charclip: note: the corpus differs from the one this checkpoint was trained on "
                "(fine-tuning)"
            )

    def build_or_resume(self) -> None:
        """Fresh: initial weights from the seed. Resumed: the checkpoint's weights, Adam state,
        hidden state, step and place in the corpus."""
        ck = self.resumed
        self.adam = self.hidden = None
        if ck is None:
            self.model_cfg = replace(self.model_cfg, vocab_size=len(self.data.vocab))
            check_memory(self.model_cfg, self.cfg)
            self.params = init_params(self.model_cfg, self.cfg.seed, self.cfg.dtype)
            if (
                self.cfg.schedule == "cosine" and self.cfg.decay_steps == 0
            ):  # fixed now: a longer --steps on resume
                self.cfg = replace(self.cfg, decay_steps=self.cfg.steps)  # keeps the curve
            return
        self.model_cfg, self.params, self.adam, self.hidden = (
            ck.model,
            ck.params,
            ck.adam,
            ck.hidden,
        )
        self.start_step, self.position = ck.step, ck.position
        per_epoch = self.data.train.batches_per_epoch
        if (
            self.position.batch >= per_epoch
        ):  # a shorter corpus than the checkpoint's: an index error later
            self.log(
                f"charclip: note: this corpus has {per_epoch} batches per epoch, fewer than the "
                f"checkpoint's position {self.position.batch}; continuing from the start of epoch "
                f"{self.position.epoch + 1}"
            )
            self.position = Position(self.position.epoch + 1, 0)

    def claim_folder(self, lock: contextlib.ExitStack) -> None:
        """Check everything, then take the run folder: created, locked, cleaned, claimed."""
        ck, out = self.resumed, self.out
        self.same_run = (
            ck is not None
            and ck.path is not None
            and run_folder_of(ck.path) is not None
            and (run_folder_of(ck.path).resolve() == out.resolve())
        )
        # A finished run whose closing phase (plot, sample, summary: summary.json is written last)
        # did not complete, say for a full disk or a signal, gets that phase redone; else there is
        # nothing to do.
        self.finishing = ck is not None and self.start_step >= self.cfg.steps
        if self.finishing and not (self.same_run and not _closed(out, self.start_step)):
            raise CharclipError(
                f"the checkpoint is at step {self.start_step}, already at --steps "
                f"{self.cfg.steps}; pass a larger --steps"
            )
        overwrite = self.options.overwrite
        if not self.same_run and not overwrite and out.is_dir():
            runfolder.claim(
                out, overwrite=False
            )  # refused before even the lock file is made in someone's folder
        # Everything is checked; from here on the run folder is written, by this process alone.
        runfolder.create(out)
        lock.enter_context(runfolder.Lock(out))
        runfolder.check_links(out)
        runfolder.remove_stale_temporaries(
            out
        )  # of writers killed mid-write: under the lock, none is alive
        if not self.same_run:  # again under the lock: another run may have started in it meanwhile
            runfolder.claim(out, overwrite=overwrite)
        else:  # resumed from an older step folder: LATEST moves back to it before the metrics
            # are cut back to it
            ckpt_io.point_latest(out, ck.path)

    def loop(self) -> dict:
        """Step until --steps or a stop signal, validating and checkpointing on schedule; then
        finish."""
        from tqdm.auto import tqdm

        cfg, step = self.cfg, self.start_step
        self.t0 = time.perf_counter()
        width = _bar_width()
        self.bar = tqdm(
            total=cfg.steps,
            initial=step,
            disable=self.options.no_progress,
            unit="step",
            dynamic_ncols=width is None,
            ncols=width,
        )
        self.watch = _Watch(cfg, self.bar.write)
        with _DeferInterrupt() as interrupt:
            while step < cfg.steps and not interrupt.requested:
                step = self.step(step)
                if step % cfg.eval_every == 0 or step == cfg.steps:
                    self.validate(step)
                if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                    self.checkpoint(step)
            self.bar.close()
            self.metrics.close()
            path = self.resumed.path if self.finishing else self.checkpoint(step)
        if self.finishing:
            self.log(
                f"charclip: the run had reached step {step} but not finished its closing phase; "
                "finished it now"
            )
        if interrupt.requested:
            self.log(
                f"charclip: interrupted at step {step}; checkpoint written to {path}; "
                f"continue with --resume {self.out}"
            )
            raise SystemExit(128 + interrupt.requested)
        return self.finish(step, path)

    def step(self, step: int) -> int:
        """Training step `step + 1`: one batch, its learning rate and dropout masks; logged. Returns
        the new step count."""
        cfg, position = self.cfg, self.position
        if position.batch == 0:
            self.trainer.reset_hidden()  # a new epoch starts the streams afresh
        x, y = self.data.train.batch(cfg.seed, position)
        lr = schedules.learning_rate(cfg, step)  # the same float for both backends at every step
        masks = dropout.masks(
            self.model_cfg, cfg, step, *x.shape
        )  # keyed by the step: a resumed run draws the same
        try:
            last = self.trainer.step(x, y, lr=lr, masks=masks)
        except NonFiniteStep as e:
            path = self.checkpoint(step)
            raise CharclipError(
                f"step {step + 1}: the loss or gradient is not finite ({e}); stopped with "
                f"--nonfinite error. Checkpoint from before this step: {path}. Lower --lr or "
                "--clip-norm, or use --nonfinite skip"
            ) from None
        step, self.position, self.last = step + 1, self.data.train.next(position), last
        self.metrics.write(
            step=step,
            loss=last.loss,
            grad_norm=last.grad_norm,
            clipped=last.clipped,
            skipped=last.skipped,
            time=round(self.metrics.time_offset + self._elapsed(), 4),
            **({"lr": lr} if cfg.schedule != "constant" else {}),
            **_scale_record(last),
        )
        self.watch.after(step, last, self.metrics.overflows)
        self.bar.update(1)
        chars_per_s = (
            (step - self.start_step) * cfg.batch_size * cfg.seq_len / max(self._elapsed(), 1e-9)
        )
        val = "-" if self.val_loss is None else f"{self.val_loss:.3f}"
        scale = {} if last.loss_scale is None else {"scale": f"{last.loss_scale:g}"}
        self.bar.set_postfix(
            loss=f"{last.loss:.3f}",
            norm=f"{last.grad_norm:.3g}",
            val=val,
            chars_s=f"{chars_per_s:,.0f}",
            **scale,
        )
        return step

    def validate(self, step: int) -> None:
        """The validation loss over --eval-batches batches; a new best is checkpointed as BEST."""
        self.val_loss = self.trainer.evaluate(self.data.val.eval_batches(self.cfg.eval_batches))
        self.metrics.write(step=step, val_loss=self.val_loss)
        if (
            finite(self.val_loss) and self.val_loss < self.metrics.best_val
        ):  # kept whatever its age, as BEST
            self.metrics.best_val = self.val_loss
            self.checkpoint(step, best=True)

    def checkpoint(self, step: int, best: bool = False) -> Path:
        """The checkpoint of `step`, written once (Ctrl-C just after a periodic one does not rewrite
        it)."""
        out, keep = self.out, self.options.keep
        if step not in self.saved:
            try:
                self.saved[step] = ckpt_io.save(
                    out,
                    ckpt_io.Checkpoint(
                        model=self.model_cfg,
                        train=self.cfg,
                        vocab=self.data.vocab,
                        params=self.trainer.params_numpy(),
                        step=step,
                        position=self.position,
                        backend=self.backend,
                        corpus=self.data.info,
                        adam=self.trainer.adam_state(),
                        hidden=self.trainer.hidden_state(),
                    ),
                    keep=keep,
                    best=best,
                )
            except (
                ckpt_io.NonFiniteCheckpoint
            ) as e:  # --nonfinite propagate let NaN in: keep the last whole one
                raise CharclipError(
                    f"{e}; {_last_whole(out)}; --nonfinite error or skip keep a run finite"
                ) from None
        elif best:
            ckpt_io.mark_best(out, self.saved[step], keep=keep)
        return self.saved[step]

    def finish(self, step: int, path: Path) -> dict:
        """The closing phase: summary, plot, sample; summary.json is written last."""
        cfg, metrics, elapsed = self.cfg, self.metrics, self._elapsed()
        steps_run = step - self.start_step
        summary = {
            "backend": self.backend,
            "steps": step,
            "steps_run": steps_run,
            "train_loss": self.last.loss if self.last else metrics.last_loss,
            "val_loss": metrics.last_val if self.val_loss is None else self.val_loss,
            # val_loss covers these first validation batches, not the whole split
            "val_batches": cfg.eval_batches,
            "logged_steps": metrics.logged_steps,
            "clipped_steps": metrics.clipped,
            "clipped_fraction": metrics.clipped / max(metrics.logged_steps, 1),
            "skipped_steps": metrics.skipped,
            "overflow_steps": metrics.overflows,
            "precision": cfg.precision,
            "seconds": round(elapsed, 2),
            "chars_per_second": round(
                steps_run * cfg.batch_size * cfg.seq_len / max(elapsed, 1e-9), 1
            ),
            "checkpoint": str(path),
            "metrics": str(self.out / "metrics.jsonl"),
        }
        try:
            from charclip.plots import plot_training

            summary["plot"] = str(
                plot_training(
                    self.out / "metrics.jsonl", self.out / "training.png", cfg.clip.threshold
                )
            )
        except ImportError:
            self.log("charclip: note: matplotlib is not installed; skipped the loss plot")
        if self.options.sample_chars:
            sample = self.sample()
            if sample is not None:
                summary["sample"] = sample
        # The run's summary beside its metrics; NaN and infinities have no JSON spelling: null.
        clean = json_safe(summary)
        runfolder.write_file(self.out / "summary.json", json.dumps(clean, indent=1) + "\n")
        return summary

    def sample(self) -> str | None:
        """The closing sample (temperature 0.8), or None with a note when it cannot be drawn."""
        vocab = self.data.vocab
        prime = (
            "\n" if "\n" in vocab.chars else vocab.chars[0]
        )  # a corpus without newlines has no "\n"
        try:
            return backends.module(self.backend, "sample").sample(
                self.model_cfg,
                self.trainer.params_numpy(),
                vocab,
                prime,
                self.options.sample_chars,
                temperature=0.8,
                seed=self.cfg.seed,
                device=self.options.device,
            )
        except (
            CharclipError
        ) as e:  # e.g. non-finite parameters after --nonfinite propagate: the run is saved
            self.log(f"charclip: note: no closing sample: {e}")
            return None

    def _elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def _n_params(self) -> int:
        return sum(int(np.prod(v.shape)) for v in self.params.values())


def _bar_width() -> int | None:
    """The progress bar's fixed width where the terminal (stderr, tqdm's file) reports 0 columns, as
    some consoles and `stty cols 0` do (tqdm would draw no bar); None elsewhere: tqdm follows the
    terminal."""
    try:
        columns = os.get_terminal_size(sys.stderr.fileno()).columns
    except (
        OSError,
        ValueError,
        AttributeError,
    ):  # not a terminal (a file, a pipe, a test's capture)
        return None
    return BAR_COLUMNS if columns <= 0 else None


class _Watch:
    """The console's warnings about a run going wrong, each said once (or a few times)."""

    def __init__(self, cfg: TrainConfig, write):
        self.cfg, self.write = cfg, write
        self.first_loss, self.diverging, self.scale_low = None, False, False

    def after(self, step: int, last, overflows: int) -> None:
        if last.overflow and overflows <= OVERFLOWS_SHOWN:
            more = "; further ones go to metrics.jsonl only" if overflows == OVERFLOWS_SHOWN else ""
            self.write(
                f"charclip: step {step}: the fp16 gradient overflowed at loss scale "
                f"{last.loss_scale:g}; "
                f"step skipped, scale now {last.loss_scale * self.cfg.loss_scale_backoff:g}{more}"
            )
        if last.loss_scale is not None and last.loss_scale < 1 and not self.scale_low:
            # GradScaler's rule has no floor: every further overflow halves it again
            self.scale_low = True
            self.write(
                f"charclip: warning: step {step}: the fp16 loss scale has fallen to "
                f"{last.loss_scale:g}: the float16 pass overflows even unscaled; use --precision "
                "bf16 or full, or lower --lr"
            )
        if self.first_loss is None and math.isfinite(last.loss):
            self.first_loss = last.loss
        if (
            not self.diverging
            and self.first_loss is not None
            and not last.loss <= DIVERGENCE_FACTOR * self.first_loss
        ):
            self.diverging = True
            self.write(
                f"charclip: warning: step {step}: loss {last.loss:.3g} is over "
                f"{DIVERGENCE_FACTOR:g}x the first loss {self.first_loss:.3g}: training is "
                "diverging; lower --lr or --clip-norm"
            )
