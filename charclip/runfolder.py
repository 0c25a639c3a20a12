"""The run folder is the user's data: one writer at a time, and nothing of an earlier run replaced unasked.

A training run holds an exclusive lock (`fcntl.flock`) on `RUN/.lock` from before its first
write to its exit, resume included; the lock file holds the writer's pid, so a second
process can say who has the folder. The kernel drops the lock when the holder dies,
however it dies, so a killed run never leaves the folder locked.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from charclip.errors import CharclipError

LOCK_FILE = ".lock"
OUTPUTS = ("checkpoints", "metrics.jsonl", "training.png", "summary.json")  # what a run writes; --overwrite removes these


def os_error(e: OSError, what: str) -> CharclipError:
    """An OSError as one line: what was being done, where, and why (no traceback)."""
    reason = e.strerror or type(e).__name__
    hint = {errno.ENOSPC: "; free some space", errno.EDQUOT: "; free some space", errno.EROFS: "; choose a writable --out",
            errno.EACCES: "; choose a writable --out", errno.EPERM: "; choose a writable --out"}.get(e.errno, "")
    where = f" {e.filename}" if e.filename else ""
    return CharclipError(f"{what}:{where}: {reason}{hint}")


def create(out: Path) -> None:
    """Create the run folder (and its parents), or say in one line why it cannot be."""
    if out.exists() and not out.is_dir():
        raise CharclipError(f"--out {out} is a file, not a folder; choose a folder for the run")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise CharclipError(f"--out {out} lies below {parent}, which is a file; choose a folder for the run")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error(e, f"cannot create the run folder {out}") from None


class Lock:
    """Exclusive ownership of a run folder for as long as this object is held (see the module's docstring)."""

    def __init__(self, run: Path):
        self.path = Path(run) / LOCK_FILE
        self.fd: int | None = None

    def __enter__(self) -> "Lock":
        try:
            import fcntl
        except ImportError:  # not a POSIX system: no advisory locks; run unguarded
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise os_error(e, f"cannot write to the run folder {self.path.parent}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 32).decode("ascii", "replace").strip()
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise os_error(e, f"cannot lock the run folder {self.path.parent}") from None
            who = f"pid {holder}" if holder.isdigit() else "another process"
            raise CharclipError(f"{self.path.parent} is in use by another charclip run ({who}); wait for it to "
                                "finish or stop it, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock; the file stays (removing it would race a waiting locker)
            self.fd = None


def contents(out: Path) -> list[str]:
    """What the folder holds, apart from the lock file."""
    return sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE)


def claim(out: Path, *, overwrite: bool) -> None:
    """A fresh run may start only in an empty folder, or with --overwrite in place of an earlier run's outputs."""
    held = contents(out)
    if not held:
        return
    if not overwrite:
        what = "an earlier run" if "checkpoints" in held or "metrics.jsonl" in held else f"{len(held)} entries"
        raise CharclipError(f"--out {out} already holds {what}; continue it with --resume {out}, train afresh with "
                            "a new --out folder, or pass --overwrite to replace it")
    for name in OUTPUTS:
        p = out / name
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
        except OSError as e:
            raise os_error(e, f"cannot remove the earlier run's {name}") from None
