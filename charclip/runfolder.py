"""The run folder is the user's data: one writer at a time, and nothing of an earlier run replaced unasked.

A training run holds an exclusive lock (`fcntl.flock`) on `RUN/.lock` from before its first
write to its exit, resume included; the lock file holds the writer's pid, so a second
process can say who has the folder. The kernel drops the lock when the holder dies,
however it dies, so a killed run never leaves the folder locked; a run that ends removes
the file.

Nothing outside the run folder is ever written through it: every file charclip writes is
created afresh (`O_CREAT | O_EXCL | O_NOFOLLOW`, then renamed into place), never opened
through a name someone may have made a symbolic link (`write_file`, `create_new`).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import shutil
from pathlib import Path

from charclip.errors import CharclipError

LOCK_FILE = ".lock"
OUTPUTS = (
    "checkpoints",
    "metrics.jsonl",
    "training.png",
    "summary.json",
)  # what a run writes; --overwrite removes these


def os_error(e: OSError, what: str) -> CharclipError:
    """An OSError as one line: what was being done, where, and why (no traceback)."""
    reason = e.strerror or type(e).__name__
    hint = {
        errno.ENOSPC: "; free some space",
        errno.EDQUOT: "; free some space",
        errno.EROFS: "; choose a writable --out",
        errno.EACCES: "; choose a writable --out",
        errno.EPERM: "; choose a writable --out",
    }.get(e.errno, "")
    name = os.fsdecode(e.filename) if e.filename else ""
    # A path the message names already is not said twice.
    where = f": {name}" if name and name not in what else ""
    return CharclipError(f"{what}{where}: {reason}{hint}")


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_TEMPORARY = re.compile(r"\..+\.tmp(\d+)")  # write_file's temporaries: .NAME.tmpPID


def create_new(path: Path, data: bytes) -> None:
    """Write `data` to `path`, which must not exist yet, and sync it.

    `O_EXCL | O_NOFOLLOW`: a file or a symbolic link already there is an error, never opened.
    The mode is 0o666 less the process umask, as for any file a program creates, so whoever
    may read the run may read this file."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags, 0o666)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_file(path: Path, data: bytes | str) -> None:
    """Replace `path` with a file holding `data`, atomically.

    Written to a new temporary file beside it (`create_new`), then renamed over it. A rename
    replaces a symbolic link itself, not its target, so a link planted at `path` sends nothing
    outside the folder. A failure removes the temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # from a dead process of the same pid; unlinks a link, not its target
    try:
        create_new(tmp, data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_figure(fig, path: Path, **savefig) -> None:
    """Render the matplotlib figure `fig` as PNG and write it to `path` with `write_file`
    (atomically, never through a link planted there). `savefig`: its options (dpi, ...)."""
    png = io.BytesIO()
    fig.savefig(png, format="png", **savefig)
    write_file(path, png.getvalue())


def remove_stale_temporaries(folder: Path) -> None:
    """Remove `write_file` temporaries (`.NAME.tmpPID`) left in `folder` by killed writers.

    Called under the run's lock, so no live writer of this folder has one open; a temporary whose
    pid is this process's own is from an earlier process of the same pid, dead too."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if _TEMPORARY.fullmatch(entry.name) and not entry.is_dir(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def create(out: Path) -> None:
    """Create the run folder (and its parents), or say in one line why it cannot be."""
    if out.exists() and not out.is_dir():
        raise CharclipError(f"--out {out} is a file, not a folder; choose a folder for the run")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise CharclipError(
                f"--out {out} lies below {parent}, which is a file; choose a folder for the run"
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error(e, f"cannot create the run folder {out}") from None


class Lock:
    """Exclusive ownership of a run folder for as long as this object is held (see the module's docstring)."""

    def __init__(self, run: Path):
        self.path = Path(run) / LOCK_FILE
        self.fd: int | None = None

    def __enter__(self) -> Lock:
        try:
            import fcntl
        except ImportError:  # not a POSIX system: no advisory locks; run unguarded
            return self
        while True:
            if self.path.is_symlink():  # never charclip's; following it writes the pid elsewhere
                raise CharclipError(
                    f"{self.path} is a symbolic link, which charclip never makes; "
                    "remove it and retry"
                )
            try:
                # O_NOFOLLOW: a link made since the check above is refused too, never followed.
                flags = os.O_RDWR | os.O_CREAT | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
                fd = os.open(self.path, flags, 0o666)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    continue  # the link is reported above
                raise os_error(e, f"cannot write to the run folder {self.path.parent}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.read(fd, 32).decode("ascii", "replace").strip()
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise os_error(e, f"cannot lock the run folder {self.path.parent}") from None
                who = f"pid {holder}" if holder.isdigit() else "another process"
                raise CharclipError(
                    f"{self.path.parent} is in use by another charclip run ({who}); wait for it to "
                    "finish or stop it, or choose another --out"
                ) from None
            # The holder before us removes the file when it ends (__exit__): the file we locked
            # may be gone from the folder. Only a lock on the folder's own file counts; else retry.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path, follow_symlinks=False))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            # Removed while held, then released: a waiting locker sees the file gone and retries
            # on a new one, so no finished run keeps a lock file naming a dead pid.
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(self.fd)
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
        if "checkpoints" not in held and "metrics.jsonl" not in held:
            raise CharclipError(
                f"--out {out} already holds {len(held)} entries; train in a new "
                "--out folder, or pass --overwrite to write the run beside them"
            )
        from charclip import checkpoint

        try:
            checkpoint.resolve(out)
        except CharclipError:  # killed before its first whole checkpoint: nothing to --resume
            raise CharclipError(
                f"--out {out} holds an earlier run that has no whole checkpoint "
                "(it was stopped before its first one); pass --overwrite to start it "
                "afresh, or use a new --out folder"
            ) from None
        raise CharclipError(
            f"--out {out} already holds an earlier run; continue it with --resume "
            f"{out}, train afresh with a new --out folder, or pass --overwrite to "
            "replace it"
        )
    for name in OUTPUTS:
        p = out / name
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
        except OSError as e:
            raise os_error(e, f"cannot remove the earlier run's {name}") from None


def check_links(out: Path) -> None:
    """Refuse a run folder whose `checkpoints` is a symbolic link (checkpoints would land elsewhere).

    (The files a run replaces, metrics.jsonl, summary.json and training.png, are renamed over
    whatever is there, a link included, so they never write through one.)"""
    if (out / "checkpoints").is_symlink():
        raise CharclipError(
            f"{out / 'checkpoints'} is a symbolic link, which charclip never "
            "makes; checkpoints would be written outside the run folder: remove "
            "the link, or pass --overwrite"
        )


def shown(path) -> str:
    """A path as text any console can print: bytes that are not UTF-8 appear as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def require_utf8(path, option: str) -> None:
    """Refuse, before anything is trained, a path whose name is not UTF-8.

    A checkpoint stores its paths as UTF-8 JSON: such a name would fail at the first save and
    lose the run."""
    try:
        os.fsdecode(path).encode("utf-8")
    except UnicodeEncodeError:
        raise CharclipError(
            f"{option} {shown(path)} has a name that is not UTF-8, which a "
            "checkpoint cannot record; rename it"
        ) from None


def _probe(folder: Path, what: str) -> None:
    """Create and remove a file in `folder`: proof, before the work, that results can be written."""
    import tempfile

    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".charclip-probe-")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise os_error(e, f"{what}: cannot write in {folder}") from None


def writable_folder(path, option: str) -> Path:
    """A command's output folder `path`, created if need be and proven writable.

    Any problem is one line naming `option`."""
    path = Path(path)
    require_utf8(path, option)
    if path.exists() and not path.is_dir():
        raise CharclipError(
            f"{option} {path}: cannot create the output folder, it is a file; choose a folder"
        )
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise CharclipError(
                f"{option} {path}: cannot create the output folder below {parent}, "
                "which is a file; choose a folder"
            )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error(e, f"{option}: cannot create the output folder {path}") from None
    _probe(path, option)
    return path


def writable_file(path, option: str) -> Path:
    """A command's output file `path`: not a folder, in a writable folder (created if need be)."""
    path = Path(path)
    require_utf8(path, option)
    if path.is_dir():
        raise CharclipError(f"{option} {path} is a folder; name a file to write")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise CharclipError(
                f"{option} {path} lies below {parent}, which is a file; choose another path"
            )
    writable_folder(path.parent, option)
    return path
