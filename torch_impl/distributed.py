"""Training on several processes: DDP or FSDP2, one global batch, one global norm.

`charclip train --backend torch --nproc N --parallel ddp|fsdp` starts N processes on
this machine (gloo on the CPU, NCCL on GPUs; loopback addresses only). The global
batch of `batch_size` streams is cut into N equal slices, one per rank, and each rank
carries the hidden state of its own streams. The gradient every rank clips is the
mean over the whole batch, so the step equals one process running the whole batch:

- DDP all-reduces the gradient during `backward()`; every rank then holds the whole,
  identical gradient, and `clip_grad_norm_` measures it locally. Summing the ranks'
  squared norms here would count every tensor N times (norm * sqrt(N)).
- FSDP2 (`fully_shard`) reduce-scatters it: each rank holds a slice (a DTensor).
  `clip_grad_norm_` on DTensor gradients all-reduces the squared slice norms, so it
  returns the global norm as a replicated DTensor (`full_tensor()` reads it). A norm
  of the local slices alone would let every rank clip by a different number.

docs/distributed.md writes the global norm out as an equation and says what the
tests prove.

Rank 0 runs the ordinary loop (`charclip.run.train`, handed in by `charclip.backends.launcher`): it logs, plots and writes the
checkpoint, in the single-process format. Its trainer is a `_Leader` that
broadcasts every call (step, evaluate, gather the parameters, ...) to the other
ranks, which `_follow` and run the same call, so every collective is entered by all
ranks in the same order.

Process handling: the ranks die with the launching process, however it dies (Linux's
PR_SET_PDEATHSIG, plus a watchdog thread that notices the parent is gone on any
system), so no rank outlives it to write the run folder. Ctrl-C, SIGTERM and SIGHUP
are rank 0's to handle: the launcher forwards SIGTERM and SIGHUP to it, the other ranks
ignore all three, and rank 0 stops every rank after the current step with a checkpoint.
A rank that fails or dies stops the others (see `launch`).
"""

from __future__ import annotations

import ctypes
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time
from datetime import timedelta
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from charclip import signals
from charclip.config import LAYOUTS, ModelConfig, TrainConfig
from charclip.contract import NonFiniteStep
from charclip.errors import CharclipError
from charclip.signals import STOP_SIGNALS
from charclip.torch.train import Trainer

PARALLEL = LAYOUTS["torch"]  # --parallel: replicated (DDP) or sharded (FSDP2) parameters
HOST = "127.0.0.1"  # loopback only: nothing listens beyond this machine
COLLECTIVE_TIMEOUT = timedelta(minutes=10)  # a rank stuck this long in a collective gives up
GRACE_SECONDS = 15.0  # after one rank fails, the others get this long to stop by themselves
WATCHDOG_SECONDS = 0.5  # how often a rank checks that its launcher is still alive
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class RankDied(CharclipError):
    """A process of the group was killed (by a signal) before the run finished."""


def _uneven(cfg: TrainConfig, world: int) -> str:
    """The one-line error for a batch that N ranks (each cutting K micro-batches) cannot share."""
    of = f", each of --accumulate {cfg.accumulate} micro-batches" if cfg.accumulate > 1 else ""
    return (
        f"--batch-size {cfg.batch_size} does not split into --nproc {world} equal slices{of}; "
        f"use a multiple of {world * cfg.accumulate}"
    )


def _sum_gradients(state, bucket):
    """DDP communication hook: all-reduce a bucket of gradients as a sum (DDP's own divides by N)."""
    del state
    return (
        dist.all_reduce(bucket.buffer(), async_op=True)
        .get_future()
        .then(lambda fut: fut.value()[0])
    )


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a DTensor (a collective); a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


class DistributedTrainer(Trainer):
    """`charclip.torch.train.Trainer` on one rank of a process group: only the placement hooks differ.

    Every rank is given the same global batch and trains on its slice of the streams;
    the checkpoint-facing methods (`params_numpy`, `adam_state`, `hidden_state`)
    return whole tensors, gathered, so a checkpoint loads anywhere.
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        cfg: TrainConfig,
        params: dict[str, np.ndarray],
        *,
        parallel: str,
        adam: dict[str, np.ndarray] | None = None,
        hidden: dict[str, np.ndarray] | None = None,
        device: str = "cpu",
    ):
        if parallel not in PARALLEL:
            raise CharclipError(f"unknown --parallel {parallel!r}; use ddp or fsdp")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if cfg.batch_size % (self.world * cfg.accumulate):
            raise CharclipError(_uneven(cfg, self.world))
        self.parallel = parallel
        super().__init__(model_cfg, cfg, params, adam=adam, hidden=hidden, device=device)

    def _parallel(self, module):
        # Gradients are summed over the ranks, not averaged: each rank back-propagates its share
        # of the global mean loss (`_ranks`), so its backward pass (float16 under --precision fp16)
        # sees the values one process would, and overflows on the same steps.
        if self.parallel == "ddp":
            ids = [torch.cuda.current_device()] if self.device.type == "cuda" else None
            ddp = DistributedDataParallel(module, device_ids=ids)
            ddp.register_comm_hook(None, _sum_gradients)
            return ddp
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # The root module itself: every parameter becomes a DTensor (a mix of
        # sharded and plain gradients would fail in clip_grad_norm_'s foreach norm).
        # FSDP2 averages its reduce-scatter (a sum would need PREMUL_SUM, which gloo lacks), so
        # `_summed` multiplies its gradients back by N after the backward passes.
        return fully_shard(module, mesh=init_device_mesh(self.device.type, (self.world,)))

    def _summed(self):
        if self.parallel == "fsdp":
            with torch.no_grad():
                for p in self.module.parameters():
                    if p.grad is not None:
                        p.grad.mul_(self.world)

    def _ranks(self):
        return self.world

    def _slice(self, a):
        """This rank's streams of a global batch (rows of `a`, or the batch axis 1 of a hidden state)."""
        n = (a.shape[0] if isinstance(a, np.ndarray) else a.shape[1]) // self.world
        return (
            a[self.rank * n : (self.rank + 1) * n]
            if isinstance(a, np.ndarray)
            else a[:, self.rank * n : (self.rank + 1) * n]
        )

    def _local(self, x):
        return self._slice(x)

    def _local_hidden(self, h):
        if h is None:
            return None
        return (
            tuple(self._slice(t).contiguous() for t in h)
            if isinstance(h, tuple)
            else self._slice(h).contiguous()
        )

    def _global_loss(self, loss):
        """Equal slices: the mean of the slice means is the batch mean (the same on every rank)."""
        t = loss.detach().clone()
        dist.all_reduce(t)
        return t.item() / self.world

    def _whole(self, t):
        return _full(t)

    def _placed(self, p, a):
        from torch.distributed.tensor import DTensor, distribute_tensor

        t = torch.from_numpy(np.array(a)).to(self.device)
        return distribute_tensor(t, p.device_mesh, p.placements) if isinstance(p, DTensor) else t

    def _gather_hidden(self, h):
        if h is None:
            return None
        whole = []
        for t in (
            h if isinstance(h, tuple) else (h,)
        ):  # (L, B/N, H) on each rank -> (L, B, H), streams in rank order
            pieces = [torch.empty_like(t) for _ in range(self.world)]
            dist.all_gather(pieces, t.contiguous())
            whole.append(torch.cat(pieces, dim=1))
        return tuple(whole) if isinstance(h, tuple) else whole[0]


# ---- rank 0 drives, the other ranks follow -------------------------------------------


def _control_group():
    """Commands travel as pickled objects on a CPU group (NCCL moves only GPU tensors)."""
    return None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def _broadcast(message: list, group) -> list:
    dist.broadcast_object_list(message, src=0, group=group)
    return message


class _Leader:
    """Rank 0's trainer inside `charclip.run.train`: every call also runs on the other ranks."""

    def __init__(
        self, model_cfg, cfg, params, *, parallel, group, adam=None, hidden=None, device="cpu"
    ):
        self.group = group
        kwargs = dict(parallel=parallel, adam=adam, hidden=hidden, device=device)
        _broadcast(["init", (model_cfg, cfg, params, kwargs)], self.group)
        self.trainer = DistributedTrainer(model_cfg, cfg, params, **kwargs)

    def _call(self, name: str, *args):
        _broadcast([name, args], self.group)
        return getattr(self.trainer, name)(*args)

    def step(self, x, y, lr=None, masks=None):
        return self._call(
            "step", x, y, lr, masks
        )  # the global batch's masks: each rank cuts its rows (_local)

    def evaluate(self, batches):
        return self._call("evaluate", list(batches))

    def apply_gradients(self, grads, lr=None):
        return self._call("apply_gradients", grads, lr)

    def reset_hidden(self):
        return self._call("reset_hidden")

    def params_numpy(self):
        return self._call("params_numpy")

    def adam_state(self):
        return self._call("adam_state")

    def hidden_state(self):
        return self._call("hidden_state")


def _follow(group) -> None:
    """A rank other than 0: run what rank 0 runs, until it says stop."""
    trainer = None
    while True:
        name, args = _broadcast([None, None], group)
        if name == "stop":
            return
        if name == "init":
            model_cfg, cfg, params, kwargs = args
            trainer = DistributedTrainer(model_cfg, cfg, params, **kwargs)
            continue
        try:
            getattr(trainer, name)(*args)
        except NonFiniteStep:
            pass  # rank 0 saw the same step and decides what happens next


def leader_factory(parallel: str, group):
    """Rank 0's trainer factory (the `charclip.contract` signature): each call is mirrored on every rank."""
    return partial(_Leader, parallel=parallel, group=group)


def _train_rank(rank: int, world: int, train_fn, model_cfg, cfg, parallel: str, kwargs: dict):
    group = _control_group()
    if rank != 0:
        for s in STOP_SIGNALS:  # rank 0's to handle: it stops all, with a checkpoint
            signal.signal(s, signal.SIG_IGN)
        return _follow(group)
    from tqdm.auto import tqdm

    tqdm.set_lock(
        threading.RLock()
    )  # its default multiprocessing lock would leak a semaphore at os._exit
    try:
        return train_fn(model_cfg, cfg, make_trainer=leader_factory(parallel, group), **kwargs)
    finally:
        _broadcast(["stop", ()], group)


def launch_training(
    train_fn,
    model_cfg: ModelConfig | None,
    cfg: TrainConfig | None,
    *,
    world: int,
    layout: str = "ddp",
    **kwargs,
) -> dict:
    """Run the training loop `train_fn` (`charclip.run.train`) on `world` processes, layout "ddp" or "fsdp".

    Rank 0 calls `train_fn(model_cfg, cfg, make_trainer=leader_factory(...), **kwargs)`; the
    other ranks follow its trainer's calls. Returns rank 0's summary.
    """
    if layout not in PARALLEL:
        raise CharclipError(f"unknown --parallel {layout!r}; use ddp or fsdp")
    if world < 1:
        raise CharclipError(f"--nproc must be 1 or more, got {world}")
    if cfg is not None and cfg.batch_size % (world * cfg.accumulate):
        raise CharclipError(_uneven(cfg, world))
    options = kwargs.get("options")  # charclip.config.RunOptions, or its pieces as keywords
    device = options.device if options is not None else kwargs.get("device", "cpu")
    try:
        return launch(_train_rank, world, train_fn, model_cfg, cfg, layout, kwargs, device=device)
    except RankDied as e:
        out = options.out if options is not None else kwargs["out_dir"]
        raise CharclipError(f"{e}; {_resume_hint(out)}") from None


def _resume_hint(out_dir) -> str:
    from charclip import checkpoint

    try:
        ck = checkpoint.load(out_dir)
    except CharclipError:
        return f"{out_dir} holds no checkpoint to resume from"
    return f"the last whole checkpoint is step {ck.step}: continue with --resume {out_dir}"


# ---- starting and watching the processes ----------------------------------------------


def _port() -> int:
    """MASTER_PORT if set (it must be free), else a free port the system picks."""
    wanted = os.environ.get("MASTER_PORT")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, int(wanted) if wanted else 0))
        except (OSError, ValueError) as e:
            raise CharclipError(
                f"cannot use port {wanted} on {HOST} (MASTER_PORT) for the process group: "
                f"{getattr(e, 'strerror', None) or e}; choose a free port or unset MASTER_PORT"
            ) from None
        return s.getsockname()[1]


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (
        text[0]
        if isinstance(e, CharclipError)
        else f"{type(e).__name__}: {text[0] if text else ''}"
    )[:500]


def _die_with(parent: int) -> None:
    """End this process when the launcher `parent` ends, whatever ends it (SIGKILL included)."""
    if sys.platform.startswith("linux"):
        try:  # the kernel sends SIGKILL to this process when its parent exits
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # no prctl: the watchdog below still ends us, within WATCHDOG_SECONDS

    def watch():
        while (
            os.getppid() == parent
        ):  # once the parent is gone, the process is handed to another one
            time.sleep(WATCHDOG_SECONDS)
        os._exit(1)

    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    threading.Thread(target=watch, name="charclip-parent-watchdog", daemon=True).start()


def _rank_main(rank, world, port, device, fn, args, report, parent, honour_sigint):
    """One process: join the group, run fn, send rank 0's result or any rank's error (one line) to `report`."""
    code = 0
    _die_with(parent)
    if (
        rank == 0
    ):  # stop signals raise Interrupted until run.train defers them; SIGINT only if the user's shell sends it
        signal.signal(
            signal.SIGINT, signal.default_int_handler if honour_sigint else signal.SIG_IGN
        )
        signals.install()
    try:
        if device == "gpu":
            torch.cuda.set_device(rank)
        torch.set_num_threads(
            max(1, len(os.sched_getaffinity(0)) // world)
        )  # the ranks share the cores
        if "lo" in {
            name for _, name in socket.if_nameindex()
        }:  # gloo and NCCL talk over loopback, not the LAN
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
            os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
        try:
            dist.init_process_group(
                "nccl" if device == "gpu" else "gloo",
                init_method=f"tcp://{HOST}:{port}",
                rank=rank,
                world_size=world,
                timeout=COLLECTIVE_TIMEOUT,
            )
        except Exception as e:
            raise CharclipError(
                f"could not start the process group on {HOST}:{port}: {_one_line(e)}"
            ) from None
        result = fn(rank, world, *args)
        if rank == 0:
            report.send(("result", result))
    except (
        SystemExit
    ) as e:  # a stop signal on rank 0: run.train saved a checkpoint, then exits 128 + signal
        code = e.code if isinstance(e.code, int) else 1
        report.send(("exit", code))
    except KeyboardInterrupt as e:  # a stop signal before the loop started: nothing written yet
        code = signals.exit_code(e)
        report.send(("stopped", code))
    except BaseException as e:
        code = 1
        report.send(("error", _one_line(e)))
    finally:
        if dist.is_initialized() and code == 0:
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)  # no interpreter teardown: a dead peer cannot hang it


def launch(fn, world: int, *args, device: str = "cpu"):
    """Run `fn(rank, world, *args)` in `world` fresh processes joined in one process group.

    Returns what rank 0's fn returned. A rank that fails or dies stops the others
    (after GRACE_SECONDS for them to notice) and raises CharclipError naming it.
    """
    if device == "gpu" and torch.cuda.device_count() < world:
        raise CharclipError(
            f"--nproc {world} --device gpu needs {world} GPUs; PyTorch sees {torch.cuda.device_count()}"
        )
    port = _port()
    ctx = mp.get_context("spawn")
    pipes = [
        ctx.Pipe(duplex=False) for _ in range(world)
    ]  # (read, write): each rank reports on its own
    honour_sigint = (
        signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
    )  # a background job keeps ignoring it
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(r, world, port, device, fn, args, pipes[r][1], os.getpid(), honour_sigint),
            daemon=True,
        )
        for r in range(world)
    ]

    def forward(
        signum, frame
    ):  # SIGTERM / SIGHUP to the launcher: rank 0 stops the run after this step
        if procs[0].pid is None:
            raise signals.Interrupted(
                signum
            )  # no rank yet: the launcher stops, killing any started below
        if procs[0].is_alive():
            os.kill(procs[0].pid, signum)

    # Ctrl-C reaches every process of the terminal's group; rank 0 handles it, the launcher ignores it.
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN)}
    for s in STOP_SIGNALS:
        if s != signal.SIGINT and signal.getsignal(s) is not signal.SIG_IGN:
            previous[s] = signal.signal(s, forward)
    try:
        for p in procs:
            p.start()
        for _, write in pipes:
            write.close()  # the ranks hold the write ends; a rank's exit then reads as end of file
        reports, exits = _wait(procs, [read for read, _ in pipes])
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return _outcome(world, reports, exits)


def _wait(procs, readers) -> tuple[list[tuple[int, str, object]], list[tuple[int, int]]]:
    """The ranks' reports (rank, kind, value) and their exits (rank, code), in the order they came.

    Once a rank fails, the others get GRACE_SECONDS to stop by themselves (a peer's
    death ends their collectives with an error) before the caller kills them.
    """
    reports, exits = [], []
    waiting = {p.sentinel: r for r, p in enumerate(procs)} | {c: r for r, c in enumerate(readers)}
    deadline = None
    while any(isinstance(w, int) for w in waiting):  # sentinels are ints, readers are connections
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready = multiprocessing.connection.wait(list(waiting), timeout)
        if not ready:
            break
        for w in ready:
            rank = waiting[w]
            if isinstance(w, int):
                del waiting[w]
                procs[rank].join()
                exits.append((rank, procs[rank].exitcode))
                if procs[rank].exitcode != 0 and deadline is None:
                    deadline = time.monotonic() + GRACE_SECONDS
                continue
            try:
                reports.append((rank, *w.recv()))
            except EOFError:
                del waiting[w]
    for w, rank in waiting.items():  # reports sent just before an exit
        while not isinstance(w, int) and w.poll():
            try:
                reports.append((rank, *w.recv()))
            except EOFError:
                break
    return reports, exits


def _outcome(world: int, reports, exits):
    """Rank 0's result, or the error of the rank that failed first, as one line."""
    for rank, kind, value in reports:
        if kind == "result":
            return value
    for rank, kind, value in reports:
        if (
            kind == "exit" and rank == 0 and value - 128 in STOP_SIGNALS
        ):  # rank 0 stopped on a signal, and said so
            raise SystemExit(value)
        if kind == "stopped" and rank == 0:
            raise signals.Interrupted(value - 128)
    errors = {rank: value for rank, kind, value in reports if kind == "error"}
    for rank, code in exits:
        if (
            code < 0
        ):  # killed by a signal: this rank is the cause, the others' errors follow from it
            raise RankDied(
                f"rank {rank} of {world} died ({signal.Signals(-code).name}); the run stopped, "
                "with nothing written for the unfinished step"
            )
        if rank in errors:
            raise CharclipError(
                errors[rank] if rank == 0 else f"rank {rank} of {world}: {errors[rank]}"
            )
    if errors:
        rank = min(errors)
        raise CharclipError(f"rank {rank} of {world}: {errors[rank]}")
    still = sorted(set(range(world)) - {rank for rank, _ in exits})
    raise CharclipError(
        f"the distributed run stopped without a result (ranks {still} did not finish)"
        if still
        else f"the distributed run stopped without a result (exit codes {dict(exits)})"
    )
