"""``--kv-read-nice``: UCX's copy threads run nicer than the engine thread. Lowering changes the calling thread
only, and threads it starts inherit it (how the copy threads get it)."""

from __future__ import annotations

import os
import threading

import pytest

from inferstack.engine.connector.nixl_agent import lower_thread_priority, on_nicer_thread

pytestmark = pytest.mark.skipif(not hasattr(os, "setpriority"), reason="per-thread nice values are Linux's")


def nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def in_thread(fn) -> list:
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()
    return out


def test_lower_thread_priority_changes_the_calling_thread_only() -> None:
    base = nice()

    def lowered() -> int:
        lower_thread_priority(3)
        return nice()

    assert in_thread(lowered) == [min(19, base + 3)]
    assert nice() == base
    assert in_thread(lambda: (lower_thread_priority(0), nice())[1]) == [base]


def test_threads_started_under_on_nicer_thread_inherit_it_and_errors_reach_the_caller() -> None:
    base = nice()

    def start_one() -> int:
        return in_thread(nice)[0]          # a thread started here, as UCX starts its copy threads

    assert on_nicer_thread(start_one, 4) == min(19, base + 4)
    assert nice() == base
    assert on_nicer_thread(nice, 0) == base    # 0: runs on the caller's thread, unchanged

    def fails() -> None:
        raise RuntimeError("no UCX")

    with pytest.raises(RuntimeError, match="no UCX"):
        on_nicer_thread(fails, 4)


def test_engine_config_takes_a_read_nice_from_0_to_19() -> None:
    from inferstack.engine.config import EngineConfig

    assert EngineConfig(model="m").kv_read_nice == 0
    assert EngineConfig(model="m", kv_read_nice=10).kv_read_nice == 10
    for bad in (-1, 20):
        with pytest.raises(ValueError, match="kv_read_nice must be 0 to 19"):
            EngineConfig(model="m", kv_read_nice=bad)
