"""The NIXL transport's control path without NIXL: a hold leased to the pull that opened it, and the
pool of kept control connections (real loopback sockets)."""

from __future__ import annotations

import socket
import time

import torch

from inferstack.engine.connector.control_pool import ControlPool
from inferstack.engine.connector.transfer import PagedKVSource


def test_an_opened_hold_is_leased_to_its_pull():
    source = PagedKVSource([torch.zeros(2, 4, 16, 1, 8)], hold_s=0.01)
    released: list[str] = []
    source.hold("r", [0, 1], on_release=released.append)
    spec = source.open("r")
    assert spec is not None and list(spec.block_ids or []) == [0, 1]
    assert source.open("r") is None, "a second pull of the same request gets nothing while the first runs"
    source.expire(time.monotonic() + 3600)
    assert source.held() == ["r"] and spec.still_held(), "a leased hold does not expire"
    source.release("r")
    assert released == ["r"] and source.held() == [] and not spec.still_held()
    source.hold("s", [2], on_release=released.append)       # never opened: expires as before
    source.expire(time.monotonic() + 1)
    assert released == ["r", "s"]


def test_kept_connections_are_reused_per_peer_until_too_old():
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    pool = ControlPool(timeout_s=5, max_idle_s=60, per_peer=1)
    try:
        first, kept = pool.take("127.0.0.1", port)
        assert not kept and pool.idle("127.0.0.1", port) == 0
        pool.give_back("127.0.0.1", port, first)
        again, kept = pool.take("127.0.0.1", port)
        assert kept and again is first
        second, kept = pool.take("127.0.0.1", port)       # the first is in use: a new one
        assert not kept and second is not first
        pool.give_back("127.0.0.1", port, first)
        pool.give_back("127.0.0.1", port, second)           # over per_peer: closed, not kept
        assert pool.idle("127.0.0.1", port) == 1 and second.fileno() == -1
        pool.max_idle_s = -1.0                              # kept too long: closed, a new one instead
        third, kept = pool.take("127.0.0.1", port)
        assert not kept and third is not first and first.fileno() == -1
        third.close()
    finally:
        pool.close()
        server.close()
