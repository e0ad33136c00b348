"""The NIXL transport's control path without NIXL: a hold leased to the pull that opened it, the claim
of a direct READ, its signed params, and the pool of kept control connections (real loopback sockets)."""

from __future__ import annotations

import socket
import time

import torch

from inferstack.engine.connector.control_pool import ControlPool
from inferstack.engine.connector.peers import TransferTrust
from inferstack.engine.connector.transfer import PagedKVSource
from inferstack.engine.connector.transports import DirectRead


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


def test_a_claim_frees_only_the_hold_it_names():
    """A direct READ's claim (`PagedKVSource.claim`): the hold's own token, blocks and last hash, and no pull
    serving it; anything else leaves the hold as it was. A new hold of the same id has a new token."""
    source = PagedKVSource([torch.zeros(2, 8, 16, 1, 8)], hold_s=60)
    released: list[str] = []
    hashes = [bytes([i]) * 32 for i in range(4)]
    source.hold("r", [7, 5, 3, 1], hashes, on_release=released.append)
    token = source.token("r")
    assert token is not None and source.token("other") is None
    assert not source.claim("r", "0" * 16, 1, [5, 3], hashes[2]), "another token"
    assert not source.claim("r", token, 1, [5, 4], hashes[2]), "other blocks"
    assert not source.claim("r", token, 1, [5, 3], hashes[3]), "another last hash"
    assert not source.claim("r", token, 3, [1, 0], hashes[3]), "past the held blocks"
    assert not source.claim("r", token, 0, [], hashes[0]), "no blocks"
    assert source.held() == ["r"] and released == []
    assert source.claim("r", token, 1, [5, 3], hashes[2])
    assert released == ["r"] and source.held() == []
    assert not source.claim("r", token, 1, [5, 3], hashes[2]), "claimed once: gone"

    source.hold("r", [7, 5, 3, 1], hashes, on_release=released.append)
    assert source.token("r") != token and not source.claim("r", token, 0, [7], hashes[0]), "a new hold, a new token"
    assert source.open("r") is not None
    assert not source.claim("r", source.token("r") or "", 0, [7], hashes[0]), "leased to a pull: only it releases"
    assert source.held() == ["r"]


def test_direct_read_params_are_signed():
    trust = TransferTrust(secret=b"s")
    direct = DirectRead("agent", "ab" * 8, (4, 5, 6), b"h" * 32)
    params = trust.sign({"do_remote_prefill": True, "remote_host": "127.0.0.1", "remote_port": 1,
                         "remote_request_id": "r", "remote_num_blocks": 3, **direct.params()})
    assert trust.refusal(params) is None and DirectRead.from_params(params) == direct
    for field, value in (("remote_block_ids", [4, 5, 7]), ("remote_agent", "other"), ("remote_hold", "cd" * 8),
                         ("remote_block_hash", (b"x" * 32).hex())):
        assert trust.refusal({**params, field: value}) is not None, f"{field} is covered by the signature"
    assert DirectRead.from_params({"remote_block_ids": [1]}) is None
    assert DirectRead.from_params({**params, "remote_block_hash": "not hex"}) is None
