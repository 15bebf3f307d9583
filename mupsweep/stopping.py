"""Ctrl-C (SIGINT) and SIGTERM as one interrupt: `stop_signals` makes either raise
`Interrupted` (a KeyboardInterrupt) once in the main thread, so a long command unwinds the way
Ctrl-C always did (trials failed and re-queued, outputs written) and says what it kept. SIGTERM
is what schedulers, `timeout`, Kubernetes and Slurm send; without this it ended the process
where it stood (tune's workers went on training as orphans). Imports nothing of the project,
so train, tune and the command line can all use it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # handled as an interrupt (`stop_signals`)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM, raised in the main thread by `stop_signals`. A
    KeyboardInterrupt, so every `except KeyboardInterrupt` handles both alike.

    `exit_code`: 128 + the signal's number, as a shell reports a process the signal ended
    (130, 143). str(): the one line the command line prints (what was kept, how to go on),
    set by the command that knows it (`tune`, `run_demo`); empty when none did."""

    def __init__(self, signum: int = signal.SIGINT, line: str = ""):
        super().__init__(line)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def by(self) -> str:
        """"" for Ctrl-C, " by SIGTERM" for another signal: "interrupted{by}; ..."."""
        return "" if self.signum == signal.SIGINT else f" by {signal.Signals(self.signum).name}"

    @classmethod
    def of(cls, e: BaseException, line: str) -> Interrupted:
        """`e` (any KeyboardInterrupt) with the command's line."""
        return cls(getattr(e, "signum", signal.SIGINT), line)


_deferred = {"depth": 0, "pending": None}  # see deferred_stop


def stop_once(signum: int, frame: object) -> None:
    """SIGINT / SIGTERM handler: raise Interrupted once; ignore later SIGINTs and SIGTERMs (a
    second Ctrl-C, the parent passing on the first, a group-wide SIGTERM after it) so the
    interrupted trial is failed and re-queued. Inside `deferred_stop`: raised at its end."""
    for s in STOP_SIGNALS:
        if signal.getsignal(s) is stop_once:
            signal.signal(s, signal.SIG_IGN)
    if _deferred["depth"]:
        _deferred["pending"] = signum
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def deferred_stop() -> Iterator[None]:
    """Storage writes that belong together (fail a trial, queue it again): a stop signal that
    comes inside the block is raised when the block has finished."""
    _deferred["depth"] += 1
    try:
        yield
    finally:
        _deferred["depth"] -= 1
    signum = _deferred["pending"]
    if signum is not None and not _deferred["depth"]:
        _deferred["pending"] = None
        raise Interrupted(signum)


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """Handle SIGINT and SIGTERM with `stop_once` in this block, then restore the previous
    handlers. Main thread only; a signal this process ignores stays ignored (nohup, a
    background job); inside another `stop_signals` block, the outer one's handler stays."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for s in STOP_SIGNALS:
        handler = signal.getsignal(s)
        if handler != signal.SIG_IGN and handler is not stop_once:
            previous[s] = signal.signal(s, stop_once)
    if previous:
        _deferred["pending"] = None
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
