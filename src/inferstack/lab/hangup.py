"""A lab run stops everything it started when nobody is listening any more.

A lab's stacks run in their own sessions (a Ctrl-C in the terminal must not tear them down under the
lab), so the lab itself has to stop them. Python's default for SIGHUP and SIGTERM ends the process
without running `finally` blocks, which would leave a running `inferstack up` behind; and when the
reader of stdout goes away (`inferstack lab run X | head`, a closed SSH session) the lab would only
notice at its next line of output, possibly minutes later. Inside `stop_on_hangup()` SIGHUP and
SIGTERM raise `Hangup` in the main thread, and so does stdout's reader closing its end of a pipe or
socket (watched by a thread), so the stacks' `finally` blocks stop them by PID at once.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import stat
import threading
from collections.abc import Iterator
from types import FrameType

_SIGNALS = (signal.SIGHUP, signal.SIGTERM)


class Hangup(BaseException):
    """The terminal or the reader of stdout went away, or SIGTERM arrived; ``signum`` says which.

    A BaseException, like KeyboardInterrupt, so that no lab's ``except Exception`` swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signal.Signals(signum).name}")
        self.signum = signum


def _raise_once(signum: int, frame: FrameType | None) -> None:
    for sig in _SIGNALS:            # cleanup is under way: a second signal must not interrupt it
        signal.signal(sig, signal.SIG_IGN)
    raise Hangup(signum)


def _watch_reader(fd: int, done: threading.Event) -> None:
    """Until ``done``: when the other end of ``fd`` (a pipe or socket we write to) is closed, send SIGHUP
    to the main thread (a real signal, so a blocking wait there returns at once). With no events asked
    for, poll() wakes only for POLLERR/POLLHUP/POLLNVAL."""
    poller = select.poll()
    poller.register(fd, 0)
    while not done.is_set():
        if poller.poll(200):
            signal.pthread_kill(threading.main_thread().ident, signal.SIGHUP)  # type: ignore[arg-type]
            return


def _is_pipe_or_socket(fd: int) -> bool:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


@contextlib.contextmanager
def stop_on_hangup(stdout_fd: int = 1) -> Iterator[None]:
    """Turn SIGHUP, SIGTERM and a closed stdout reader into `Hangup` in the main thread while inside."""
    previous = {sig: signal.signal(sig, _raise_once) for sig in _SIGNALS}
    done = threading.Event()
    watcher = threading.Thread(target=_watch_reader, args=(stdout_fd, done), name="stdout-reader", daemon=True)
    if _is_pipe_or_socket(stdout_fd):
        watcher.start()
    try:
        yield
    finally:
        done.set()
        for sig in _SIGNALS:       # a SIGHUP the watcher sends while it stops is dropped, not fatal
            signal.signal(sig, signal.SIG_IGN)
        if watcher.is_alive():
            watcher.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
