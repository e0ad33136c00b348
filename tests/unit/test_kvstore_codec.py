import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from inferstack.engine.kv.hashing import KVKeySpace, chunk_keys
from inferstack.kvstore.codec import (
    HEADER_SIZE,
    ChunkBuffer,
    ChunkLayout,
    CorruptChunk,
    decode_chunk,
    encode_chunk,
)

SPACE = KVKeySpace("0" * 64, "float32")
KEY = chunk_keys(SPACE.hashes(list(range(256))))[0]


@settings(max_examples=25, deadline=None)
@given(layers=st.integers(1, 4), heads=st.integers(1, 3), dim=st.sampled_from([1, 4, 8]),
       tokens=st.sampled_from([16, 256]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int8]))
def test_roundtrip_is_exact_for_every_dtype_and_shape(layers, heads, dim, tokens, dtype):
    layout = ChunkLayout(layers, heads, dim, dtype, tokens=tokens)
    src = (torch.randn(layout.shape) * 50).to(dtype)
    buf = encode_chunk(KEY, SPACE.root, src)
    assert len(buf) == layout.encoded_bytes == HEADER_SIZE + layout.payload_bytes
    out = decode_chunk(bytes(buf), key=KEY, root=SPACE.root, layout=layout)
    assert out.dtype == dtype and out.shape == layout.shape
    assert torch.equal(out, src)


def _sealed(layout: ChunkLayout) -> bytearray:
    b = ChunkBuffer(layout)
    b.tensor.normal_()
    return b.seal(KEY, SPACE.root)


LAYOUT = ChunkLayout(2, 3, 8, torch.float32, tokens=32)


@pytest.mark.parametrize("offset", [0, 6, 30, 40, 80, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 777, -1])
def test_any_flipped_byte_is_detected(offset):
    buf = _sealed(LAYOUT)
    buf[offset] ^= 0x40
    with pytest.raises(CorruptChunk):
        decode_chunk(buf, key=KEY, root=SPACE.root, layout=LAYOUT)


def test_truncated_chunk_is_detected():
    buf = _sealed(LAYOUT)
    for cut in (10, HEADER_SIZE, len(buf) - 1):
        with pytest.raises(CorruptChunk):
            decode_chunk(buf[:cut], key=KEY, root=SPACE.root, layout=LAYOUT)


def test_chunk_under_the_wrong_key_or_model_or_shape_is_refused():
    buf = _sealed(LAYOUT)
    other_key = chunk_keys(SPACE.hashes(list(range(1, 257))))[0]
    with pytest.raises(CorruptChunk, match="header says"):
        decode_chunk(buf, key=other_key, root=SPACE.root, layout=LAYOUT)
    with pytest.raises(CorruptChunk, match="key space"):
        decode_chunk(buf, key=KEY, root=KVKeySpace("1" * 64, "float32").root, layout=LAYOUT)
    with pytest.raises(CorruptChunk, match="shape"):
        decode_chunk(buf, key=KEY, root=SPACE.root, layout=ChunkLayout(2, 3, 8, torch.float16, tokens=64))


def test_unsupported_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="unsupported KV dtype"):
        ChunkLayout(1, 1, 1, torch.complex64)
