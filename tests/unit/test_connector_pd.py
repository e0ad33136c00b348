"""Prefill/decode disaggregation between two engines (paged toy model, real scheduler, real TCP/shm
and real NIXL/UCX): the same suite for every transport."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from inferstack.engine.connector.kvstore_connector import KVStoreConnector
from inferstack.engine.connector.nixl_agent import nixl_missing
from inferstack.engine.connector.pd_connector import MultiConnector, PDConnector
from inferstack.engine.connector.peers import TransferTrust
from inferstack.engine.connector.transfer import LinkModel, TransferSpec
from inferstack.engine.outputs import FinishReason
from inferstack.engine.request import RequestStatus
from inferstack.kvstore import KVStoreConfig, TieredKVStore
from inferstack.kvstore.tiers import DiskTier
from inferstack.telemetry.promtext import parse
from support.kv_toy import BS, DIM, HEADS, LAYERS, LAYOUT, PROMPT, SPACE, ToyEngine, baseline

PREFILL_PARAMS = {"do_remote_decode": True}
TRUST = TransferTrust(secret=b"stack-secret")



TRANSPORTS = ["tcp", "shm", pytest.param("nixl", marks=pytest.mark.skipif(
    nixl_missing() is not None, reason=f"nixl does not import: {nixl_missing()}"))]


@pytest.fixture(params=TRANSPORTS)
def transport(request) -> str:
    return request.param


@pytest.fixture
def prefill(transport):
    engine = ToyEngine(PDConnector("prefill", trust=TRUST, block_size=BS, hold_s=30, transport=transport))
    yield engine
    engine.connector.shutdown()


def decode_engine(trust: TransferTrust = TRUST, **kw) -> ToyEngine:
    return ToyEngine(PDConnector("decode", trust=trust, block_size=BS, **kw))


def run_prefill(prefill: ToyEngine, prompt=PROMPT, rid="p1", salt=None) -> dict:
    prefill.generate(prompt, max_tokens=1, rid=rid, salt=salt, kv_transfer_params=dict(PREFILL_PARAMS))
    params = prefill.last.kv_transfer_params
    assert params is not None and params["do_remote_prefill"] and params["remote_num_blocks"] == len(prompt) // BS
    return params


def test_decode_engine_continues_from_pulled_kv(prefill, transport):
    params = run_prefill(prefill)
    held = prefill.sched.kv.pool.usage
    assert held > 0, "the prefill engine keeps the prompt's blocks for the decode engine"
    d = decode_engine(transport=transport)
    assert d.connector.transport_name == transport
    out = d.generate(PROMPT, kv_transfer_params=params)
    assert out == baseline()
    assert d.ex.computed_prompt_tokens == len(PROMPT) - 512 <= BS
    assert d.sched.counters.external_prefix_cache_hits == 512
    assert d.last.num_external_cached_tokens == 512
    stats = d.connector.transport.stats
    assert stats.bytes[("recv", transport)] == 512 * LAYERS * 2 * HEADS * DIM * 8
    assert stats.transfers[("recv", transport)] == 1
    deadline = time.monotonic() + 5     # the prefill engine frees the blocks on a step after the DONE
    while prefill.sched.kv.pool.usage > 0 and time.monotonic() < deadline:
        prefill.sched.schedule()
        time.sleep(0.005)
    assert prefill.sched.kv.pool.usage == 0
    assert prefill.connector.server.stats.transfers[("send", transport)] == 1
    d.connector.shutdown()


def test_dead_prefill_engine_falls_back_to_recompute(prefill, transport):
    params = run_prefill(prefill)
    prefill.connector.shutdown()
    d = decode_engine(timeout_s=5, transport=transport)
    assert d.generate(PROMPT, kv_transfer_params=params) == baseline()
    assert d.connector.stats.load_failures == 1
    assert d.sched.counters.external_prefix_cache_hits == 0
    assert d.ex.computed_prompt_tokens == len(PROMPT)


@pytest.mark.parametrize("transport", ["tcp"])
def test_failure_mid_transfer_keeps_the_intact_prefix_and_recomputes_the_rest(prefill):
    source = prefill.connector.source
    original_open = source.open

    def failing_open(request_id: str) -> TransferSpec | None:
        spec = original_open(request_id)
        inner = spec.read

        def read(first: int, n: int, out) -> None:
            if first >= 16:
                raise OSError("device fault while reading chunk 2")
            inner(first, n, out)

        spec.read = read
        return spec

    source.open = failing_open
    params = run_prefill(prefill)
    d = decode_engine(timeout_s=5, transport="tcp")
    assert d.generate(PROMPT, kv_transfer_params=params) == baseline()
    assert d.connector.stats.load_failures == 1
    assert d.last.num_external_cached_tokens == 256
    assert d.ex.computed_prompt_tokens == len(PROMPT) - 256


def test_kv_from_another_tenant_is_refused(prefill, transport):
    params = run_prefill(prefill, salt="tenant-a")
    d = decode_engine(transport=transport)
    assert d.generate(PROMPT, salt="tenant-b", kv_transfer_params=params) == baseline(salt="tenant-b")
    assert d.sched.counters.external_prefix_cache_hits == 0
    assert d.connector.stats.load_failures == 1


def test_decider_skips_the_pull_when_few_tokens_would_come(prefill, transport):
    params = run_prefill(prefill, prompt=PROMPT[:40])
    d = decode_engine(min_remote_tokens=64, transport=transport)
    assert d.generate(PROMPT[:40], kv_transfer_params=params) == baseline(PROMPT[:40])
    assert d.connector.transport.stats.transfers == {} and d.sched.counters.external_prefix_cache_hits == 0


def test_decode_engine_saves_pulled_kv_to_its_tiers_for_other_replicas(prefill, transport, tmp_path):
    params = run_prefill(prefill)
    store = TieredKVStore([DiskTier(tmp_path, 1 << 30)], LAYOUT, SPACE.root)
    d = ToyEngine(MultiConnector([PDConnector("decode", trust=TRUST, block_size=BS, transport=transport),
                                  KVStoreConnector(store, block_size=BS)]))
    assert d.generate(PROMPT, kv_transfer_params=params) == baseline()
    store.flush()
    store.close()
    store2 = TieredKVStore([DiskTier(tmp_path, 1 << 30)], LAYOUT, SPACE.root)
    other = ToyEngine(KVStoreConnector(store2, block_size=BS))
    assert other.generate(PROMPT) == baseline()
    assert other.last.num_external_cached_tokens == 512
    store2.close()


@pytest.mark.parametrize("transport", ["shm"])
def test_factory_builds_pd_plus_tiers_and_exposes_metrics(prefill):
    """The default (auto) decode engine pulls from a prefill engine without NIXL over shm."""
    import torch
    from prometheus_client import CollectorRegistry, generate_latest

    from inferstack.engine.config import EngineConfig
    from inferstack.engine.connector.factory import build_connector, connector_collectors

    caches = [torch.zeros(2, 128, BS, 2, 4, dtype=torch.float64) for _ in range(2)]
    cfg = EngineConfig(model="unused", kv_role="decode", kv_store=KVStoreConfig(tiers="host", host_bytes=1 << 26),
                       kv_transfer_secret="stack-secret")
    connector = build_connector(cfg, caches, SPACE)
    assert isinstance(connector, MultiConnector)
    d = ToyEngine(connector)
    params = run_prefill(prefill)
    assert d.generate(PROMPT, kv_transfer_params=params) == baseline()
    registry = CollectorRegistry()
    for c in connector_collectors(connector, "toy"):
        registry.register(c)
    connector.connectors[1].store.flush()      # the pulled chunks reach the host tier through write-back
    scrape = parse(generate_latest(registry).decode(), t=0.0)
    assert scrape.select("inferstack_kv_transfers_total", direction="recv", transport="shm") == {
        (("direction", "recv"), ("model_name", "toy"), ("path", "pd"), ("transport", "shm")): 1.0}
    assert sum(scrape.select("inferstack_kv_connector_loaded_tokens_total", connector="pd").values()) == 512
    assert sum(scrape.select("inferstack_kv_tier_writes_total", tier="host").values()) == 512 // 256
    assert sum(scrape.select("inferstack_kv_connector_fetch_seconds_count").values()) == 1
    connector.shutdown()
    with pytest.raises(ValueError, match="kv_role"):
        EngineConfig(model="m", kv_role="middle")
    with pytest.raises(ValueError, match="--kv-transfer-peers"):
        EngineConfig(model="m", kv_role="decode")


def _listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    sock.setblocking(False)
    return sock


@pytest.mark.parametrize("transport", ["shm"])
@pytest.mark.parametrize("how", ["unsigned", "forged_signature", "resigned_elsewhere", "peer_not_listed"])
def test_decode_never_connects_where_unvetted_params_point(prefill, how):
    """SSRF guard: params a client could write (no or wrong signature, unlisted peer) open no connection."""
    trap = _listener()
    params = {**run_prefill(prefill), "remote_host": "127.0.0.1", "remote_port": trap.getsockname()[1]}
    trust = TRUST
    if how == "unsigned":
        params.pop("transfer_sig")
    elif how == "forged_signature":
        params["transfer_sig"] = "0" * 64
    elif how == "resigned_elsewhere":
        params = TransferTrust(secret=b"attacker").sign(params)
    else:
        trust = TransferTrust(peers=frozenset({"10.0.0.9"}))
    d = decode_engine(trust=trust)
    assert d.generate(PROMPT, kv_transfer_params=params) == baseline()
    assert d.connector.stats.peers_refused == 1 and d.sched.counters.external_prefix_cache_hits == 0
    with pytest.raises(BlockingIOError):
        trap.accept()
    trap.close()


def test_a_listed_peer_is_pulled_from_without_a_secret(prefill, transport):
    """Without the secret a decode engine gets no NIXL metadata: it pulls over TCP/shm instead."""
    params = run_prefill(prefill)
    d = decode_engine(trust=TransferTrust(peers=frozenset({"127.0.0.1"})), transport=transport)
    assert d.generate(PROMPT, kv_transfer_params=params) == baseline()
    assert d.sched.counters.external_prefix_cache_hits == 512 and d.connector.stats.peers_refused == 0
    if transport == "nixl":
        assert d.connector.transport.fallback.stats.transfers[("recv", "shm")] == 1
        assert d.connector.transport.stats.transfers == {}


def test_link_model_paces_a_pull_and_counts_the_modelled_bytes():
    """Emulated engines move a shadow cache; their `LinkModel` makes the pull last as long as the
    modelled network needs for the real bytes, and both sides' transfer metrics count those bytes."""
    asked: list[int] = []

    def seconds(tokens: int) -> float:
        asked.append(tokens)
        return 0.3

    link = LinkModel(seconds, bytes_per_token=131072.0)
    p = ToyEngine(PDConnector("prefill", trust=TRUST, block_size=BS, hold_s=30, link=link))
    try:
        params = run_prefill(p)
        d = decode_engine(link=link, transport="tcp")
        assert d.generate(PROMPT, kv_transfer_params=params) == baseline()
        assert asked == [512]
        assert d.connector.stats.fetch_seconds.total >= 0.3
        deadline = time.monotonic() + 5    # the prefill side records once it has read the DONE
        while ("send", "tcp") not in p.connector.server.stats.bytes and time.monotonic() < deadline:
            time.sleep(0.01)
        # the sender starts its clock a moment after the receiver, then waits for the paced DONE
        for stats, direction, least in ((d.connector.transport.stats, "recv", 0.3),
                                        (p.connector.server.stats, "send", 0.25)):
            assert stats.bytes[(direction, "tcp")] == 512 * 131072
            assert stats.seconds[(direction, "tcp")] >= least
    finally:
        p.connector.shutdown()


@pytest.mark.parametrize("transport", TRANSPORTS[2:])
def test_nixl_read_that_fails_after_the_offer_is_recomputed(prefill):
    """The prefill engine lets the blocks go (hold expired) between the offer (blocks counted as
    external) and the direct READ into the decode engine's blocks: it refuses to confirm the READ,
    the scheduler drops the blocks it filled and recomputes. (A peer killed there: test_pd_nixl.py.)"""
    params = run_prefill(prefill)
    d = decode_engine(timeout_s=5, transport="nixl")
    nixl = d.connector.transport
    real_read = nixl.read

    def read_after_the_hold_expired(load) -> None:
        prefill.connector.source.release("p1")
        real_read(load)

    nixl.read = read_after_the_hold_expired
    assert d.generate(PROMPT, kv_transfer_params=params) == baseline()
    assert d.connector.stats.load_failures == 1 and nixl.stats.failures == {"recv": 1}
    # the whole prompt was recomputed; a step that ran during the READ (its layers landed before the
    # refused END) also computed the last 8 tokens over them and was discarded
    assert d.ex.computed_prompt_tokens in (len(PROMPT), len(PROMPT) + 8)
    assert d.sched.kv.pool.get_cached_block(d.last.block_hashes[0]) is not None   # recomputed blocks cached
    assert d.generate(PROMPT, rid="again") == baseline()      # and they hold the right KV


@pytest.mark.parametrize("transport", TRANSPORTS[2:])
def test_nixl_reads_straight_from_the_params_once_the_peer_is_known(prefill):
    """The first pull from a prefill engine asks for an offer (its metadata); later ones READ at once from
    the signed params and claim the hold after: the colocated answer. A direct READ of a hold let go
    before it (expired) and of blocks freed meanwhile: the claim is refused, the prompt recomputed."""
    d = decode_engine(timeout_s=5, transport="nixl")
    nixl = d.connector.transport
    real_ask, real_read, asks = nixl._ask, nixl.read, []
    nixl._ask = lambda pull: (asks.append(pull.request_id), real_ask(pull))[1]
    assert d.generate(PROMPT, kv_transfer_params=run_prefill(prefill, rid="p1")) == baseline()
    params = run_prefill(prefill, rid="p2", salt="two")      # another salt: not in the decode prefix cache
    assert {"remote_agent", "remote_hold", "remote_block_ids", "remote_block_hash"} <= set(params)
    assert d.generate(PROMPT, salt="two", rid="d2", kv_transfer_params=params) == baseline(salt="two")
    assert asks == ["p1"] and d.last.num_external_cached_tokens == 512 and d.connector.stats.load_failures == 0

    def read_after_the_hold_expired(load) -> None:
        prefill.connector.source.release("p3")
        step_until(prefill, lambda: prefill.sched.kv.pool.usage == 0, "the prefill engine freeing p3's blocks")
        for cache in prefill.ex.kv_caches:      # the freed blocks reused: a READ now gets other bytes
            cache.zero_()
        real_read(load)

    params = run_prefill(prefill, rid="p3", salt="three")
    nixl.read = read_after_the_hold_expired
    assert d.generate(PROMPT, salt="three", rid="d3", kv_transfer_params=params) == baseline(salt="three")
    assert asks == ["p1"] and d.connector.stats.load_failures == 1 and nixl.stats.failures == {"recv": 1}
    d.connector.shutdown()


@pytest.mark.parametrize("transport", TRANSPORTS[2:])
def test_a_direct_read_starts_in_the_step_that_first_sees_its_request(prefill):
    """Once the peer's agent is known, a direct READ needs no round trip before it: the first step that
    considers the request allocates its blocks and starts the READ (no hop through the fetch thread and a
    second step), and the answer is the colocated one."""
    d = decode_engine(transport="nixl")
    assert d.generate(PROMPT, kv_transfer_params=run_prefill(prefill, rid="p1")) == baseline()   # the offer
    params = run_prefill(prefill, rid="p2", salt="two")
    started, go = gated_reads(d)
    pulling = d.submit(PROMPT, salt="two", rid="d2", kv_transfer_params=params)
    d.sched.schedule()
    assert pulling.status is RequestStatus.WAITING_FOR_REMOTE_KVS and len(d.sched.kv.block_ids("d2")) == 33
    assert started.wait(10), "the READ was handed to the reader in that step"
    go.set()
    step_until(d, lambda: pulling.is_finished, "the pulled request")
    assert pulling.output_token_ids == baseline(salt="two") and d.last.num_external_cached_tokens == 512
    assert d.connector.stats.fetch_seconds.n == 2 and d.connector.stats.load_failures == 0
    d.connector.shutdown()


def gated_reads(d: ToyEngine) -> tuple[threading.Event, threading.Event]:
    """Hold the decode engine's NIXL READs until ``go`` is set; ``started`` once one began."""
    nixl = d.connector.transport
    real_read, started, go = nixl.read, threading.Event(), threading.Event()

    def read(load) -> None:
        started.set()
        assert go.wait(10), "the test never let the READ go"
        real_read(load)

    nixl.read = read
    return started, go


def step_until(d: ToyEngine, done, what: str) -> None:
    deadline = time.monotonic() + 10
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        d.step()
        time.sleep(0.001)


@pytest.mark.parametrize("transport", TRANSPORTS[2:])
def test_engine_keeps_stepping_while_a_nixl_read_fills_a_requests_blocks(prefill):
    """The READ runs off the engine thread: the pulling request waits for remote KV (blocks allocated,
    not in the prefix cache, not scheduled) while another request generates; then it gives the
    colocated answer, and its blocks are cached only once their bytes are in."""
    params = run_prefill(prefill)
    d = decode_engine(transport="nixl")
    started, go = gated_reads(d)
    pulling = d.submit(PROMPT, kv_transfer_params=params, rid="pd")
    step_until(d, started.is_set, "the READ to start")
    assert pulling.status is RequestStatus.WAITING_FOR_REMOTE_KVS and d.sched.num_waiting == 1
    # 32 blocks READ + the last 8 prompt tokens' block, allocated up front; none cached while the READ runs
    assert len(d.sched.kv.block_ids("pd")) == 33 and d.sched.kv.pool.get_cached_block(pulling.block_hashes[0]) is None
    other_prompt = [(i * 7 + 3) % 500 for i in range(40)]
    other = d.submit(other_prompt, rid="other")
    step_until(d, lambda: other.is_finished, "the other request")
    assert other.output_token_ids == baseline(other_prompt) and pulling.num_output_tokens == 0
    go.set()
    step_until(d, lambda: pulling.is_finished, "the pulled request")
    assert pulling.output_token_ids == baseline() and d.ex.computed_prompt_tokens == 40 + len(PROMPT) - 512
    assert d.sched.kv.pool.get_cached_block(pulling.block_hashes[31]) is not None
    assert d.connector.stats.load_seconds.n == 1 and d.connector.stats.load_failures == 0
    d.connector.shutdown()


@pytest.mark.parametrize("transport", TRANSPORTS[2:])
def test_abort_during_a_nixl_read_frees_the_blocks_once_the_read_ended(prefill):
    params = run_prefill(prefill)
    d = decode_engine(transport="nixl")
    started, go = gated_reads(d)
    pulling = d.submit(PROMPT, kv_transfer_params=params, rid="pd")
    step_until(d, started.is_set, "the READ to start")
    d.sched.finish_request("pd", FinishReason.ABORT)
    assert pulling.is_finished and d.sched.kv.pool.num_free_blocks == 128 - 33, \
        "blocks a READ is writing into are not handed out again"
    go.set()
    step_until(d, lambda: not d.sched.has_unfinished(), "the aborted READ to end")
    assert d.sched.kv.pool.num_free_blocks == 128 and d.sched.kv.pool.get_cached_block(pulling.block_hashes[0]) is None
    assert d.generate(PROMPT, rid="again") == baseline(), "nothing of the aborted request leaked into the cache"
    d.connector.shutdown()


@pytest.mark.parametrize("transport", TRANSPORTS[2:])
def test_two_reads_that_fill_the_pool_between_them_both_finish(prefill):
    """Two pulling requests whose READ blocks alone take the whole pool: each gets its last prompt block
    with its READ blocks, so one runs while the other waits for blocks, instead of both parked forever."""
    second = [(i * 17 + 11) % 500 for i in range(520)]
    params = [run_prefill(prefill), run_prefill(prefill, second, rid="p2")]
    d = ToyEngine(PDConnector("decode", trust=TRUST, block_size=BS, transport="nixl"), num_blocks=64)
    a = d.submit(PROMPT, kv_transfer_params=params[0], rid="a")
    b = d.submit(second, kv_transfer_params=params[1], rid="b")
    step_until(d, lambda: a.is_finished and b.is_finished, "both pulled requests")
    assert a.output_token_ids == baseline() and b.output_token_ids == baseline(second)
    assert d.sched.counters.external_prefix_cache_hits == 2 * 512, "both READs were used, neither recomputed"
    d.connector.shutdown()


def gated_after_first_layer(d: ToyEngine, between=lambda: None) -> tuple[threading.Event, threading.Event]:
    """Hold the decode engine's NIXL READs after their first layer landed until ``go`` is set
    (``between()`` runs there first); ``first_in`` once layer 0 is in."""
    agent = d.connector.transport.agent
    agent.min_read_bytes = 0      # one READ per layer even for the toy model's few kilobytes
    real_read, first_in, go = agent.read, threading.Event(), threading.Event()

    def read(peer, remote, local_ids, remote_ids, timeout_s, on_layer=None):
        def landed(layer: int) -> None:
            on_layer(layer)
            if layer == 0:
                first_in.set()
                between()
                assert go.wait(10), "the test never let the READ go on"
        return real_read(peer, remote, local_ids, remote_ids, timeout_s, landed)

    agent.read = read
    return first_in, go


def step_until_layer_0_ran(d: ToyEngine, rid: str) -> threading.Thread:
    """Run a step on a thread until it wrote layer 0 of the KV of ``rid``'s last prompt tokens."""
    t = threading.Thread(target=d.step, daemon=True)
    t.start()
    tail_block = d.sched.kv.block_ids(rid)[32]
    deadline = time.monotonic() + 10
    while float(d.ex.kv_caches[0][0, tail_block, 0, 0, 0]) == 0.0:
        assert time.monotonic() < deadline, "the request did not run while its READ was landing"
        time.sleep(0.001)
    assert t.is_alive()
    return t


@pytest.mark.parametrize("transport", TRANSPORTS[2:])
def test_a_request_computes_layer_by_layer_while_its_read_still_lands(prefill):
    """Once the first layer is in, the request runs: the forward pass computes layer 0 of the last 8
    prompt tokens while layer 1 is still being READ, waits for it, and the answer is the colocated one
    (only those 8 tokens computed here). The engine was woken when the first layer landed."""
    params = run_prefill(prefill)
    d = decode_engine(transport="nixl")
    woken = threading.Event()
    d.connector.set_waker(woken.set)
    first_in, go = gated_after_first_layer(d)
    pulling = d.submit(PROMPT, kv_transfer_params=params, rid="pd")
    step_until(d, first_in.is_set, "the first layer to land")
    assert woken.is_set() and pulling.status is RequestStatus.WAITING_FOR_REMOTE_KVS
    stepping = step_until_layer_0_ran(d, "pd")
    assert float(d.ex.kv_caches[1][0, d.sched.kv.block_ids("pd")[32], 0, 0, 0]) == 0.0   # ...and waits for layer 1
    go.set()
    stepping.join(10)
    assert not stepping.is_alive() and pulling.num_output_tokens == 1
    step_until(d, lambda: pulling.is_finished, "the pulled request")
    assert pulling.output_token_ids == baseline() and d.ex.computed_prompt_tokens == len(PROMPT) - 512
    assert d.sched.kv.pool.get_cached_block(pulling.block_hashes[31]) is not None
    stats = d.connector.stats
    assert stats.load_seconds.n == 1 and stats.wait_seconds.n == 1 and stats.load_failures == 0
    d.connector.shutdown()


@pytest.mark.parametrize("transport", TRANSPORTS[2:])
def test_a_read_that_fails_after_its_request_ran_discards_the_step_and_recomputes(prefill):
    """The prefill engine lets the blocks go while the READ lands (no END): the step that already ran
    the request over them drops its token, the blocks are never cached, the prompt is recomputed."""
    params = run_prefill(prefill)
    d = decode_engine(transport="nixl", timeout_s=5)
    first_in, go = gated_after_first_layer(d, between=lambda: prefill.connector.source.release("p1"))
    pulling = d.submit(PROMPT, kv_transfer_params=params, rid="pd")
    step_until(d, first_in.is_set, "the first layer to land")
    stepping = step_until_layer_0_ran(d, "pd")
    go.set()
    stepping.join(10)
    assert not stepping.is_alive() and pulling.num_output_tokens == 0, "no token from a step over bad KV"
    assert pulling.status is RequestStatus.PREEMPTED and pulling.num_external_cached_tokens == 0
    step_until(d, lambda: pulling.is_finished, "the recomputed request")
    assert pulling.output_token_ids == baseline()
    assert d.ex.computed_prompt_tokens == len(PROMPT) + 8, "8 tokens over the bad READ, then all recomputed"
    assert d.connector.stats.load_failures == 1 and d.sched.counters.external_prefix_cache_hits == 0
    d.connector.shutdown()


@pytest.mark.parametrize("transport", TRANSPORTS[2:])
def test_a_read_still_landing_waits_while_other_requests_run(prefill):
    """With another request running, a request whose READ is still landing is not run: that step's
    forward pass would wait on the peer, and the running request's next token must not. It runs once
    its READ ended, and answers as colocated."""
    params = run_prefill(prefill)
    d = decode_engine(transport="nixl")
    first_in, go = gated_after_first_layer(d)
    other = d.submit([(i * 7 + 3) % 500 for i in range(40)], max_tokens=3000, rid="other")   # runs throughout
    d.step()
    pulling = d.submit(PROMPT, kv_transfer_params=params, rid="pd")
    step_until(d, first_in.is_set, "the first layer to land")
    made = other.num_output_tokens
    step_until(d, lambda: other.num_output_tokens >= made + 3, "the running request")   # never blocks
    assert pulling.status is RequestStatus.WAITING_FOR_REMOTE_KVS and not d.sched.streaming_ids
    go.set()
    step_until(d, lambda: pulling.is_finished, "the pulled request")
    assert not other.is_finished, "the other request ran all along"
    assert pulling.output_token_ids == baseline() and d.connector.stats.load_failures == 0
    assert d.ex.computed_prompt_tokens == 40 + len(PROMPT) - 512
    d.connector.shutdown()
