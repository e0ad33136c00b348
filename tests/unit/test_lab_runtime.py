"""LabRun.process: a server is ready when its probe says so, stopped by PID and checked gone; one that
dies before it is ready is a LabError naming its log. LabRun.cli: exit codes are checked."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from inferstack.lab.runtime import LabError, LabRun, http_ok
from inferstack.stack.supervisor import free_port


def test_process_ready_then_stopped_by_pid(tmp_path: Path) -> None:
    lab = LabRun(tmp_path, quick=True, echo=lambda _: None)
    port = free_port()
    argv = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tmp_path)]
    with lab.process("http", argv, ready=lambda: http_ok(f"http://127.0.0.1:{port}/")) as pid:
        assert http_ok(f"http://127.0.0.1:{port}/")
        assert os.getsid(pid) == pid  # its own session: signals to the lab do not reach it
    assert not Path(f"/proc/{pid}").exists()  # stopped and reaped


def test_process_that_exits_is_a_clear_error(tmp_path: Path) -> None:
    lab = LabRun(tmp_path, quick=True, echo=lambda _: None)
    argv = [sys.executable, "-c", "import sys; print('bad config'); sys.exit(3)"]
    with pytest.raises(LabError, match=r"(?s)did not become ready.*http\.log.*bad config"), \
            lab.process("http", argv, ready=lambda: False):
        pass


def test_cli_checks_the_exit_code(tmp_path: Path) -> None:
    lab = LabRun(tmp_path, quick=True, echo=lambda _: None)
    assert lab.cli("lab", "list").rc == 0
    with pytest.raises(LabError, match="exited 2, expected 0"):
        lab.cli("lab", "run", "nosuch")
    assert lab.cli("lab", "run", "nosuch", expect=None).rc == 2
