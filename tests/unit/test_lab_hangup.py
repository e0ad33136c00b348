"""stop_on_hangup: SIGHUP, SIGTERM and a closed stdout reader become `Hangup` in the main thread, even
while it is blocked (a lab waiting out a long benchmark), and leave the old handlers in place after."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from inferstack.lab.hangup import Hangup, stop_on_hangup


def _running_watcher() -> threading.Thread:
    deadline = time.monotonic() + 10
    while not (found := [t for t in threading.enumerate() if t.name == "stdout-reader" and t.is_alive()]):
        assert time.monotonic() < deadline, "the stdout watcher never started"
        time.sleep(0.01)
    return found[0]


def _blocked_until_hangup(budget_s: float = 30.0) -> float:
    """Sleep (as a lab does while its benchmark runs) until Hangup, which must come well before the
    sleep ends; returns its signal."""
    t0 = time.monotonic()
    with pytest.raises(Hangup) as caught:
        time.sleep(budget_s)
    assert time.monotonic() - t0 < budget_s / 2
    return caught.value.signum


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM])
def test_signals_raise_hangup_and_handlers_come_back(sig: signal.Signals) -> None:
    before = signal.getsignal(sig)
    with stop_on_hangup(stdout_fd=-1):
        threading.Timer(0.2, os.kill, (os.getpid(), sig)).start()
        assert _blocked_until_hangup() == sig
    assert signal.getsignal(sig) is before


def test_closed_stdout_reader_raises_hangup_at_once() -> None:
    read_end, write_end = os.pipe()
    try:
        with stop_on_hangup(stdout_fd=write_end):
            threading.Timer(0.2, os.close, (read_end,)).start()     # the reader (`| head`) goes away
            assert _blocked_until_hangup() == signal.SIGHUP
    finally:
        os.close(write_end)


def test_an_open_reader_raises_nothing() -> None:
    read_end, write_end = os.pipe()
    try:
        with stop_on_hangup(stdout_fd=write_end):
            watcher = _running_watcher()
            os.write(write_end, b"line\n")
            assert os.read(read_end, 100) == b"line\n"
            assert watcher.is_alive()     # it returns only after signalling a hang-up
        assert not watcher.is_alive()
    finally:
        os.close(read_end)
        os.close(write_end)
