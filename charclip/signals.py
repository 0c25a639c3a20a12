"""Stop signals: Ctrl-C (SIGINT), SIGTERM and SIGHUP all mean "stop, keeping what was done".

`timeout`, job schedulers and `docker stop` send SIGTERM; closing a terminal sends SIGHUP.
Before the training loop starts, each raises `Interrupted` (a KeyboardInterrupt), which the
CLI turns into one line and exit status 128 + the signal's number. Inside the loop,
`charclip.run` defers them to the end of the current step and writes a checkpoint first.
A signal that was ignored when the process started (`nohup`, a background job started
with SIGINT ignored) stays ignored.
"""

from __future__ import annotations

import signal
import threading

STOP_SIGNALS = tuple(
    s
    for s in (signal.SIGINT, getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None))
    if s
)


class Interrupted(KeyboardInterrupt):
    """A stop signal arrived; `exit_code` is the shell's convention, 128 + its number."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def exit_code(e: KeyboardInterrupt) -> int:
    return e.exit_code if isinstance(e, Interrupted) else 128 + signal.SIGINT


def honoured() -> list[int]:
    """The stop signals this process reacts to: those not ignored at its start."""
    return [s for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN]


def _raise(signum, frame) -> None:
    raise Interrupted(signum)


def install() -> dict[int, object]:
    """Every honoured stop signal raises `Interrupted`; returns the handlers replaced, for `restore`."""
    if (
        threading.current_thread() is not threading.main_thread()
    ):  # only the main thread may set handlers
        return {}
    return {s: signal.signal(s, _raise) for s in honoured()}


def restore(previous: dict[int, object]) -> None:
    for s, handler in previous.items():
        signal.signal(s, handler)


class Deferred:
    """While active, a stop signal asks the caller to stop at the next safe point (`requested`).

    A second stop signal still raises `Interrupted` at once. Signals ignored at the
    start stay ignored.
    """

    def __init__(self):
        self.requested: int | None = None  # the signal number, once one arrived
        self.previous: dict[int, object] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in honoured():
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:
            raise Interrupted(signum)
        self.requested = signum

    def __exit__(self, *exc) -> None:
        restore(self.previous)
