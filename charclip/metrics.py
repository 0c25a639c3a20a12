"""The metrics file of a run, `metrics.jsonl`: one JSON object per line; written, read, repaired.

A training step writes `{"step", "loss", "grad_norm", "clipped", "skipped", "time"}` (plus `lr`
under a schedule, and `loss_scale` / `overflow` under fp16); a validation writes `{"step",
"val_loss"}`. Every line is strict JSON: a NaN or infinite value is written as null and its key
listed under "nonfinite". Readers keep only JSON objects whose step is a non-negative integer,
so a line torn by a crash (or damage) is dropped rather than fatal.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from charclip import runfolder
from charclip.errors import CharclipError


def json_safe(x):
    """`x` ready for strict JSON: every NaN or infinite float becomes None (JSON has no spelling
    for them; Python's json would write a bare NaN), through dicts, lists and tuples. NumPy arrays
    and scalars become Python lists and numbers; a key JSON cannot spell becomes its str()."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {_json_key(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):  # NumPy, without importing it
        return json_safe(x.tolist())
    return x


def _json_key(k):
    if isinstance(k, (str, int, float, bool)) or k is None:
        return k  # json spells these itself
    return _json_key(k.item()) if hasattr(k, "item") else str(k)


def json_line(record: dict) -> str:
    """One metrics line, strict JSON: a NaN or infinite value is written as null, and its key is
    listed under "nonfinite" (bare NaN, which Python's json writes by default, is no JSON)."""
    bad = sorted(k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v))
    if bad:
        flagged = record.get("nonfinite") if isinstance(record.get("nonfinite"), list) else []
        record = {**json_safe(record), "nonfinite": sorted(set(flagged) | set(bad), key=str)}
    return json.dumps(record, allow_nan=False) + "\n"


def finite(x) -> bool:
    """Whether `x` is a finite number (not a bool, not None)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_step(r) -> bool:
    return (
        isinstance(r, dict)
        and isinstance(r.get("step"), int)
        and not isinstance(r["step"], bool)
        and (r["step"] >= 0)
    )


def read_records(path: Path) -> list[dict]:
    """The well-formed records of a metrics file: JSON objects whose step is a non-negative
    integer."""
    if not path.is_file():
        return []
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                r = json.loads(line)
            except (ValueError, RecursionError):
                continue  # a line torn by a crash mid-write, or damage: dropped
            if _is_step(r):
                records.append(r)
    return records


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Every line of a metrics file, strictly (a damaged line raises): for a run's own readers."""
    return [
        json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line
    ]


def describe_clipped(clipped: int, steps: int) -> str:
    """The clipped share as the closing line and the plot's legend both say it."""
    return f"{clipped} of {steps} steps clipped ({clipped / max(steps, 1):.1%})"


class Metrics:
    """The metrics file of a run being written, and the counts the run's summary needs.

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
        kept = (
            [r for r in read_records(path) if r["step"] <= resume_step]
            if resume_step is not None
            else []
        )
        # Rewritten whole: a line an older charclip wrote with a bare NaN becomes JSON (null and a
        # flag).
        runfolder.write_file(
            path, "".join(json_line(r) for r in kept)
        )  # atomic rename, no link followed
        trained = [r for r in kept if "loss" in r]
        self.logged_steps = len(trained)
        self.clipped = sum(r.get("clipped") is True for r in trained)
        self.skipped = sum(r.get("skipped") is True for r in trained)
        self.overflows = sum(
            r.get("overflow") is True for r in trained
        )  # fp16 steps skipped for an overflow
        self.best_val = min(
            (r["val_loss"] for r in kept if finite(r.get("val_loss"))), default=math.inf
        )
        self.last_loss = trained[-1].get("loss") if trained else None  # for a closing-only resume
        self.last_val = next((r["val_loss"] for r in reversed(kept) if "val_loss" in r), None)
        self.time_offset = max((r["time"] for r in trained if finite(r.get("time"))), default=0.0)
        # Line-buffered: a killed run has logged every step it took, so none goes missing on resume.
        # O_NOFOLLOW: the file just renamed into place is appended to, never a link made since.
        flags = (
            os.O_WRONLY | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        )
        self.file = open(os.open(path, flags), "a", encoding="utf-8", buffering=1)

    def write(self, **record) -> None:
        if "loss" in record:
            self.logged_steps += 1
            self.clipped += bool(record.get("clipped"))
            self.skipped += bool(record.get("skipped"))
            self.overflows += bool(record.get("overflow"))
        self.file.write(json_line(record))

    def close(self) -> None:
        self.file.close()
