import subprocess
import sys

from hypothesis import given
from hypothesis import strategies as st

from inferstack.engine.kv.block_pool import BlockPool
from inferstack.engine.kv.hashing import (
    DIGESTS,
    KVKeySpace,
    block_hash,
    block_hashes,
    chunk_keys,
    model_digest_from_file_digests,
)
from inferstack.engine.kv.manager import KVCacheManager
from inferstack.engine.request import Request
from inferstack.engine.sampling_params import SamplingParams

SPACE = KVKeySpace(model_digest="0" * 64, dtype="float32", kv_layout="paged")


def test_design_test_vector():
    assert SPACE.root.hex() == "c4541d9ae9ffd4a898a2324cc553916144a7421b767f057b3164b6b37901967a"
    hashes = SPACE.hashes(list(range(33)))
    assert [h.hex() for h in hashes] == [
        "e9a51bd9a764c0efbe0caa7cd7500ab36b2be3eb7f6edd4d31fc95eff6412d94",
        "720e122f77705c4aea718a73f3794f01b5dc0fd30c149dcaa0aaeb8ae5ec43bd",
    ]
    salted = SPACE.hashes(list(range(33)), cache_salt="tenant-a")
    assert salted[0].hex() == "660ca84baa86b928afc9899bee741211ad3fe89bcc6f962ff7b97678016bf83a"


def test_same_hashes_in_another_process():
    code = (
        "from inferstack.engine.kv.hashing import KVKeySpace;"
        "s=KVKeySpace('ab'*32,'bfloat16');"
        "print(','.join(h.hex() for h in s.hashes(list(range(1000, 1100)), cache_salt='t')))"
    )
    outs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={"PYTHONHASHSEED": seed, "PYTHONPATH": "src"}).stdout.strip()
        for seed in ("1", "2")
    }
    assert len(outs) == 1
    here = ",".join(h.hex() for h in KVKeySpace("ab" * 32, "bfloat16").hashes(list(range(1000, 1100)), "t"))
    assert outs == {here}


@given(st.lists(st.integers(0, 2**32 - 1), max_size=200), st.integers(0, 12))
def test_incremental_chain_equals_full_chain(tokens, split_block):
    seed = SPACE.seed()
    full = block_hashes(seed, tokens)
    split = min(split_block, len(full))
    head = full[:split]
    tail = block_hashes(seed, tokens, start=split, parent=head[-1] if head else None)
    assert head + tail == full


@given(st.lists(st.integers(0, 2**32 - 1), max_size=200), st.integers(0, 12))
def test_the_in_process_digest_chains_like_sha256(tokens, split_block):
    """`xxh3-128` (the simulator's) extends a chain as SHA-256 does, and only the digest differs."""
    space = KVKeySpace("0" * 64, "float32", digest="xxh3-128")
    seed, digest = space.seed(), DIGESTS["xxh3-128"]
    full = space.hashes(tokens)
    assert full == block_hashes(seed, tokens, digest=digest)
    assert len(full) == len(SPACE.hashes(tokens)) == len(tokens) // 16
    assert all(len(h) == 16 for h in full) and not set(full) & set(SPACE.hashes(tokens))
    split = min(split_block, len(full))
    tail = block_hashes(seed, tokens, start=split, parent=full[split - 1] if split else None, digest=digest)
    assert full[:split] + tail == full


@given(st.lists(st.integers(0, 50_000), min_size=16, max_size=100))
def test_salt_and_dtype_separate_key_spaces(tokens):
    assert SPACE.hashes(tokens, "a")[0] != SPACE.hashes(tokens, "b")[0]
    assert SPACE.hashes(tokens)[0] != KVKeySpace("0" * 64, "bfloat16").hashes(tokens)[0]


def test_chunk_key_is_last_block_hash():
    hashes = SPACE.hashes(list(range(16 * 40)))
    assert chunk_keys(hashes) == [hashes[15], hashes[31]]


def test_model_digest_is_order_independent():
    a = model_digest_from_file_digests({"b.safetensors": "1" * 64, "a.safetensors": "2" * 64})
    b = model_digest_from_file_digests({"a.safetensors": "2" * 64, "b.safetensors": "1" * 64})
    assert a == b and len(a) == 64


@given(st.lists(st.integers(0, 2**32 - 1), min_size=16, max_size=120))
def test_block_at_a_time_chain_is_the_numpy_chain(tokens):
    """Extending a chain one block at a time (a decode's path) gives `block_hash`'s own (numpy) bytes."""
    chain: list[bytes] = []
    for end in range(16, len(tokens) + 1, 16):
        chain += block_hashes(SPACE.seed(), tokens[:end], start=len(chain), parent=chain[-1] if chain else None)
    prev, want = SPACE.seed(), []
    for i in range(0, len(tokens) // 16 * 16, 16):
        prev = block_hash(prev, tokens[i:i + 16])
        want.append(prev)
    assert chain == want


@given(st.lists(st.integers(0, 2**32 - 1), min_size=0, max_size=120), st.lists(st.integers(1, 40), max_size=8),
       st.sampled_from(sorted(DIGESTS)))
def test_a_request_chain_grown_token_by_token_is_the_whole_chain(tokens, growth, digest):
    """`KVCacheManager.update_block_hashes` extends a request's chain as tokens arrive (one block at a time on its
    own path, several through `block_hashes`) to exactly the chain of all its tokens at once, for both digests."""
    space = KVKeySpace(model_digest="0" * 64, dtype="float32", kv_layout="paged", digest=digest)
    kv = KVCacheManager(BlockPool(4, 16), space)
    request = Request("r", tokens[:10], SamplingParams(max_tokens=1), 0.0, cache_salt="s")
    kv.update_block_hashes(request)
    pos = 10
    for n in [*growth, len(tokens)]:
        request.all_token_ids += tokens[pos:pos + n]
        pos += n
        kv.update_block_hashes(request)
    assert request.block_hashes == space.hashes(request.all_token_ids, "s")
