"""A NIXL READ's threads run nicer than the engine thread (`nixl_agent.READ_NICE`): the calling thread only,
threads it starts inherit it, and the connector's reader thread runs at its `Stager`'s ``reader_nice``."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
import torch

from inferstack.engine.connector.blocks import LayerProgress, Stager
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


@dataclass
class _RecordingLoad:
    """An asynchronous load that records the nice value of the thread it is copied on."""

    first_block: int = 0
    num_blocks: int = 2
    asynchronous: bool = True
    layers: LayerProgress | None = None
    seen: list[int] = field(default_factory=list)

    def rebase(self, first_block: int) -> _RecordingLoad | None:
        return self if first_block == 0 else None

    def accept(self, block_ids: Sequence[int], num_external_tokens: int, block_size: int) -> None:
        return None

    def copy_into(self, kv_caches: Sequence[torch.Tensor], block_size: int) -> None:
        self.seen.append(nice())

    def discard(self) -> None:
        return None


@pytest.mark.parametrize("by", [0, 5])
def test_the_stager_reads_on_a_thread_nicer_by_reader_nice(by: int) -> None:
    stager = Stager(reader_nice=by)
    load = _RecordingLoad()
    try:
        stager.put("r", load)
        assert stager.accept("r", [3, 4], 32, 16) == 32
        deadline = time.monotonic() + 30
        finished: list = []
        while not finished and time.monotonic() < deadline:
            finished = stager.take_finished_reads()
            time.sleep(0.01)
        assert [rid for rid, seconds in finished if seconds is not None] == ["r"]
        assert load.seen == [min(19, nice() + by)]
    finally:
        stager.shutdown()


def test_engine_config_takes_a_read_nice_from_0_to_19() -> None:
    from inferstack.engine.config import EngineConfig

    assert EngineConfig(model="m").kv_read_nice == 10
    assert EngineConfig(model="m", kv_read_nice=0).kv_read_nice == 0
    for bad in (-1, 20):
        with pytest.raises(ValueError, match="kv_read_nice must be 0 to 19"):
            EngineConfig(model="m", kv_read_nice=bad)
