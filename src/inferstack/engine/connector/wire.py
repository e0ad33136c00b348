"""Wire format of the KV transfer engine (prefill → decode), version 1.

A transfer is one TCP connection. The decode side (client) sends one PULL frame; the prefill side
(server) answers with CHUNK frames for chunk 0..n-1 back to back (no per-chunk acknowledgement, so
the sender never waits a round trip), then one END frame, or an ERROR frame at any point. After
END the client sends DONE so the server can free what it held for the transfer.

Every frame is a fixed 112-byte little-endian header, then ``req_id_len`` bytes of request id
(UTF-8), then ``aux_len`` auxiliary bytes, then ``payload_len`` payload bytes unless the SHM flag
says the payload is in shared memory:

| offset | size | field                                                                   |
|-------:|-----:|-------------------------------------------------------------------------|
|      0 |    4 | magic ``b"ISKT"``                                                         |
|      4 |    2 | version (1)                                                             |
|      6 |    1 | frame type: 1 PULL, 2 CHUNK, 3 END, 4 ERROR, 5 DONE, 6 NIXL_PULL, 7 NIXL_OFFER, 8 NIXL_CLAIM |
|      7 |    1 | flags: bit 0 SHM (payload in shared memory), bit 1 SHM_OK (PULL: client can read shared memory) |
|      8 |    1 | dtype code (the KV store codec's: 1 f32, 2 f16, 3 bf16, 4 f64, 5 i8, 6 u8) |
|      9 |    1 | reserved (0)                                                            |
|     10 |    2 | request id length                                                       |
|     12 |    4 | num_layers                                                              |
|     16 |    4 | num_kv_heads                                                            |
|     20 |    4 | head_dim                                                                |
|     24 |    4 | block_size (tokens per block)                                           |
|     28 |    4 | chunk index                                                             |
|     32 |    4 | number of chunks in the transfer                                        |
|     36 |    4 | first block of this chunk (index into the request's blocks)             |
|     40 |    4 | blocks in this chunk                                                    |
|     44 |    2 | aux length                                                              |
|     46 |    2 | reserved (0)                                                            |
|     48 |    8 | payload length in bytes                                                 |
|     56 |    8 | SHM: byte offset of the payload in the shared-memory file              |
|     64 |   16 | xxh3-128 of the payload                                                 |
|     80 |   32 | hash of the chunk's last block (docs/architecture.md), zeros if unknown |

CHUNK payload: the chunk's K and V for all layers, ``[num_layers, 2, num_blocks * block_size,
num_kv_heads, head_dim]`` in C order — the KV store's chunk layout, so a 16-block chunk can be
written to a KV tier as is. The receiver compares the block hash with its own hash of the same
prompt block, so KV of another model, dtype, salt or prompt is refused, never loaded.
PULL aux: the client's host identity (``boot_id/hostname``); the server uses the SHM path only
when it is equal to its own and the client set SHM_OK. CHUNK aux with SHM: the path of the
shared-memory file (under ``/dev/shm``). ERROR payload: a UTF-8 message.

NIXL transport (``nixl_transport.py``): the same connection carries only control. The client sends
NIXL_PULL (msgpack payload: its agent name, the peer agent name it has cached, an HMAC proof); the
server answers NIXL_OFFER (msgpack payload: its agent name, its NIXL agent metadata unless the
client has it cached, the KV layout, per-layer base addresses and block counts, the held block ids
and their block hashes) or ERROR. The client READs the blocks with NIXL and sends DONE (the
server frees them) or closes the connection (the server frees them too). After DONE the connection
may carry the client's next NIXL_PULL (the server answers pulls on it until it closes or idles past
the server's I/O timeout). A client that already READ the blocks named by signed ``kv_transfer_params``
(no NIXL_PULL: ``nixl_transport.py``, "direct READ") sends NIXL_CLAIM instead (msgpack payload: its agent
name, HMAC proof, the hold's token, the first block and the peer's block ids it read, the hash of the last
one); the server answers END when that hold was in place all along (it frees it then) or ERROR.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import xxhash

MAGIC = b"ISKT"
VERSION = 1
HEADER = struct.Struct("<4sHBBBxH8IHxxQQ16s32s")
ZERO_HASH = bytes(32)


class FrameType(IntEnum):
    PULL = 1
    CHUNK = 2
    END = 3
    ERROR = 4
    DONE = 5
    NIXL_PULL = 6
    NIXL_OFFER = 7
    NIXL_CLAIM = 8


NO_NIXL = "no NIXL transfer for this peer"   # ERROR prefix to a NIXL_PULL: pull over TCP instead

FLAG_SHM = 1
FLAG_SHM_OK = 2


class TransferError(RuntimeError):
    """The transfer failed (peer gone, timeout, bad frame, checksum or hash mismatch)."""


@dataclass
class Frame:
    type: FrameType
    request_id: str
    flags: int = 0
    dtype: int = 0
    num_layers: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    block_size: int = 0
    chunk_index: int = 0
    num_chunks: int = 0
    first_block: int = 0
    num_blocks: int = 0
    payload_len: int = 0
    shm_offset: int = 0
    checksum: bytes = bytes(16)
    block_hash: bytes = ZERO_HASH
    aux: bytes = b""

    def pack_header(self) -> bytes:
        rid = self.request_id.encode()
        head = HEADER.pack(MAGIC, VERSION, int(self.type), self.flags, self.dtype, len(rid),
                           self.num_layers, self.num_kv_heads, self.head_dim, self.block_size,
                           self.chunk_index, self.num_chunks, self.first_block, self.num_blocks,
                           len(self.aux), self.payload_len, self.shm_offset, self.checksum, self.block_hash)
        return head + rid + self.aux


def checksum(payload: memoryview | bytes | bytearray) -> bytes:
    return xxhash.xxh3_128_digest(payload)


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    while view:
        n = sock.recv_into(view)
        if n == 0:
            raise TransferError("peer closed the connection mid-frame")
        view = view[n:]


def read_frame_header(sock: socket.socket) -> Frame:
    raw = bytearray(HEADER.size)
    recv_exact(sock, memoryview(raw))
    (magic, version, ftype, flags, dtype, rid_len, layers, heads, dim, bs, idx, n, first, nblocks,
     aux_len, plen, off, csum, bhash) = HEADER.unpack(raw)
    if magic != MAGIC:
        raise TransferError(f"not a KV transfer peer (magic {magic!r})")
    if version != VERSION:
        raise TransferError(f"peer speaks KV transfer version {version}, this side {VERSION}")
    try:
        frame_type = FrameType(ftype)
    except ValueError:
        raise TransferError(f"unknown frame type {ftype}") from None
    tail = bytearray(rid_len + aux_len)
    recv_exact(sock, memoryview(tail))
    return Frame(frame_type, tail[:rid_len].decode(), flags, dtype, layers, heads, dim, bs, idx, n, first,
                 nblocks, plen, off, csum, bhash, bytes(tail[rid_len:]))


def host_identity() -> bytes:
    """Same kernel boot and same hostname ⇒ same host and (normally) the same /dev/shm."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return b""
    return f"{boot}/{socket.gethostname()}".encode()


def send_payload(sock: socket.socket, frame: Frame, payload: bytes) -> None:
    """One frame followed by its payload (NIXL control messages, ERROR)."""
    frame.payload_len = len(payload)
    sock.sendall(frame.pack_header() + payload)


def read_payload(sock: socket.socket, frame: Frame, limit: int = 64 << 20) -> bytes:
    if frame.payload_len > limit:
        raise TransferError(f"{frame.type.name} payload of {frame.payload_len} bytes is over {limit}")
    buf = bytearray(frame.payload_len)
    recv_exact(sock, memoryview(buf))
    return bytes(buf)
