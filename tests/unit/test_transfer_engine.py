import socket
import threading
import time

import pytest
import torch

from inferstack.engine.connector.transfer import (
    KVLayout,
    KVTransferClient,
    KVTransferServer,
    PagedKVSource,
)
from inferstack.engine.connector.wire import (
    HEADER,
    Frame,
    FrameType,
    TransferError,
    checksum,
    read_frame_header,
)
from inferstack.engine.kv.hashing import KVKeySpace

L, H, D, BS, NB = 3, 2, 8, 16, 64
SPACE = KVKeySpace("0" * 64, "float32")


@pytest.fixture
def engine_kv():
    torch.manual_seed(0)
    caches = [torch.randn(2, NB, BS, H, D) for _ in range(L)]
    source = PagedKVSource(caches, hold_s=30)
    server = KVTransferServer(source, chunk_blocks=4)
    yield caches, source, server
    server.close()


def expected_chunk(caches, block_ids):
    ids = torch.tensor(block_ids)
    return torch.stack([c[:, ids].reshape(2, len(block_ids) * BS, H, D) for c in caches])


@pytest.mark.parametrize("shm", [False, True])
def test_pull_delivers_every_block_in_order_and_releases_the_hold(engine_kv, shm):
    caches, source, server = engine_kv
    tokens = list(range(10 * BS + 5))
    hashes = SPACE.hashes(tokens)
    blocks = [7, 3, 50, 51, 9, 10, 11, 12, 40, 2]
    released = []
    source.hold("req-1", blocks, hashes, on_release=released.append)
    client = KVTransferClient(source.layout, allow_shm=shm)
    pull = client.pull(*server.address, "req-1", expected_hashes=hashes)
    got = [(c.first_block, c.num_blocks, c.tensor.clone()) for c in pull]
    assert [(f, n) for f, n, _ in got] == [(0, 4), (4, 4), (8, 2)]
    for first, n, tensor in got:
        assert torch.equal(tensor, expected_chunk(caches, blocks[first:first + n]))
    assert pull.result.complete and pull.result.transport == ("shm" if shm else "tcp")
    assert pull.result.bytes == 10 * source.layout.chunk_bytes(1) > 0
    deadline = time.monotonic() + 5
    while not released and time.monotonic() < deadline:
        time.sleep(0.01)
    assert released == ["req-1"] and source.held() == []
    assert client.stats.bytes[("recv", pull.result.transport)] == pull.result.bytes


def test_unknown_request_is_a_clear_transfer_error(engine_kv):
    _, source, server = engine_kv
    client = KVTransferClient(source.layout)
    with pytest.raises(TransferError, match="no KV held for request 'nope'"):
        list(client.pull(*server.address, "nope"))
    assert client.stats.failures["recv"] == 1


def test_a_second_pull_of_a_request_being_pulled_gets_nothing_and_frees_nothing(engine_kv):
    _, source, server = engine_kv
    released: list[str] = []
    source.hold("busy", [1, 2], on_release=released.append)
    assert source.open("busy") is not None             # a first pull is in flight: the hold is leased to it
    client = KVTransferClient(source.layout)
    with pytest.raises(TransferError, match="already being pulled"):
        list(client.pull(*server.address, "busy"))
    assert source.held() == ["busy"] and released == [], "the first pull's blocks stay held"
    source.release("busy")
    assert released == ["busy"]


def test_kv_of_another_prompt_or_salt_is_refused(engine_kv):
    _, source, server = engine_kv
    tokens = list(range(4 * BS))
    source.hold("r", [1, 2, 3, 4], SPACE.hashes(tokens))
    client = KVTransferClient(source.layout)
    with pytest.raises(TransferError, match="hash differs"):
        list(client.pull(*server.address, "r", expected_hashes=SPACE.hashes(tokens, cache_salt="tenant-b")))


def test_layout_mismatch_is_refused(engine_kv):
    _, source, server = engine_kv
    source.hold("r", [1, 2])
    client = KVTransferClient(KVLayout(L, H, D, BS, torch.float16))
    with pytest.raises(TransferError, match="layout"):
        list(client.pull(*server.address, "r"))


def test_unreachable_peer_is_a_transfer_error():
    client = KVTransferClient(KVLayout(L, H, D, BS, torch.float32), timeout_s=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TransferError, match="cannot reach"):
        client.pull("127.0.0.1", port, "r")


def test_holds_nobody_pulls_expire(engine_kv):
    _, source, _ = engine_kv
    released = []
    source.hold("r", [1], on_release=released.append)
    source.expire(time.monotonic() + 31)
    assert released == ["r"]


def _fake_server(frames: list[bytes]) -> tuple[tuple[str, int], threading.Thread]:
    srv = socket.create_server(("127.0.0.1", 0))

    def run():
        conn, _ = srv.accept()
        read_frame_header(conn)
        for f in frames:
            conn.sendall(f)
        time.sleep(0.5)
        conn.close()
        srv.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return srv.getsockname()[:2], t


def _chunk_frame(layout: KVLayout, payload: bytes, csum: bytes, index=0, total=1) -> bytes:
    f = Frame(FrameType.CHUNK, "r", dtype=1, num_layers=layout.num_layers, num_kv_heads=layout.num_kv_heads,
              head_dim=layout.head_dim, block_size=layout.block_size, chunk_index=index, num_chunks=total,
              first_block=index, num_blocks=1, payload_len=len(payload), checksum=csum)
    return f.pack_header() + payload


def test_corrupted_payload_on_the_wire_is_detected():
    layout = KVLayout(L, H, D, BS, torch.float32)
    payload = bytes(layout.chunk_bytes(1))
    bad = bytearray(payload)
    bad[5] = 1
    addr, t = _fake_server([_chunk_frame(layout, bytes(bad), checksum(payload))])
    with pytest.raises(TransferError, match="checksum"):
        list(KVTransferClient(layout, allow_shm=False, timeout_s=5).pull(*addr, "r"))
    t.join(5)


def test_peer_that_stops_early_is_detected():
    layout = KVLayout(L, H, D, BS, torch.float32)
    payload = bytes(layout.chunk_bytes(1))
    frames = [_chunk_frame(layout, payload, checksum(payload), 0, 3),
              Frame(FrameType.END, "r", num_chunks=3).pack_header()]
    addr, t = _fake_server(frames)
    received = []
    with pytest.raises(TransferError, match="ended after 1 of 3"):
        for c in KVTransferClient(layout, allow_shm=False, timeout_s=5).pull(*addr, "r"):
            received.append(c.index)
    assert received == [0]
    t.join(5)


def test_wire_header_is_112_bytes_and_versioned():
    assert HEADER.size == 112
    raw = bytearray(Frame(FrameType.END, "abc").pack_header())
    raw[4] = 9   # version 9
    a, b = socket.socketpair()
    a.sendall(raw)
    with pytest.raises(TransferError, match="version 9"):
        read_frame_header(b)
    a.close()
    b.close()


def test_shm_segments_are_reused_and_removed_on_close():
    from inferstack.engine.connector.shm import SHM_DIR

    caches = [torch.randn(2, NB, BS, H, D) for _ in range(L)]
    source = PagedKVSource(caches)
    server = KVTransferServer(source, chunk_blocks=4)
    client = KVTransferClient(source.layout, allow_shm=True)
    mine = f"inferstack-kvt-{__import__('os').getpid()}-*"
    for i in range(3):
        source.hold(f"r{i}", list(range(8)))
        assert [c.index for c in client.pull(*server.address, f"r{i}")] == [0, 1]
        deadline = time.monotonic() + 5
        while server.stats.transfers.get(("send", "shm"), 0) < i + 1 and time.monotonic() < deadline:
            time.sleep(0.01)      # the server returns the segment to its pool once it has DONE
    assert len(list(SHM_DIR.glob(mine))) == 1, "one pooled segment serves consecutive transfers"
    server.close()
    client.close()
    assert list(SHM_DIR.glob(mine)) == []


def test_a_second_hold_of_a_held_id_is_refused_and_the_first_stays_whole(engine_kv):
    _, source, _ = engine_kv
    released = []
    assert source.hold("dup", [1, 2], on_release=released.append)
    assert not source.hold("dup", [3, 4], on_release=released.append)  # the caller keeps blocks 3 and 4
    spec = source.open("dup")
    assert spec is not None and spec.block_ids == [1, 2]
    source.release("dup")
    assert released == ["dup"]  # once: blocks 1 and 2, nothing freed twice
    assert source.hold("dup", [3, 4])  # free again once released
    source.release("dup")
