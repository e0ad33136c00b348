"""KV tiers and prefill/decode disaggregation with the real SmolLM2 engine, in two processes.

Process P (a subprocess) is a prefill engine with host+disk+Redis tiers: it computes every prompt
(its greedy output is the plain colocated output) and holds each prompt's blocks for transfer.
Process D (this one) is a decode engine with host+Redis tiers that reuses P's work — through the
transfer engine, through Redis, through P's disk directory — and must produce the same tokens
while computing at most one block of each prompt.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from inferstack.engine.connector.kvstore_connector import KVStoreConnector
from inferstack.engine.connector.pd_connector import MultiConnector, PDConnector
from inferstack.engine.llm import LLM
from inferstack.kvstore import KVStoreConfig, TieredKVStore
from inferstack.kvstore.tiers import DiskTier
from support.kv_engine import prompts, run_request
from support.kv_redis import redis_server
from support.procs import inferstack_env

pytestmark = pytest.mark.slow

PROMPT_LEN, NEW_TOKENS = 520, 6     # 32 full blocks + 8 tokens: two reusable chunks

PREFILL = """
import json, sys
from inferstack.engine.llm import LLM
from inferstack.kvstore import KVStoreConfig
from support.kv_engine import prompts, run_request
cfg = json.loads(sys.argv[1])
llm = LLM("smollm2-135m", dtype="float32", num_threads=1, kv_role="prefill",
          kv_store=KVStoreConfig(tiers="host,disk,redis", disk_path=cfg["disk"], redis_url=cfg["redis"]))
core = llm.engine.core
results = []
for ids in prompts(llm.tokenizer, 4, cfg["len"]):
    tokens, params = run_request(core, ids, cfg["new"], kv_transfer_params={"do_remote_decode": True})
    results.append({"tokens": tokens, "params": params})
store = core.scheduler.connector.connectors[1].store
assert store.flush(60)
print(json.dumps(results), flush=True)
sys.stdin.read()          # keep serving transfers until the test closes stdin or kills us
"""


@pytest.fixture(scope="module")
def redis_url():
    with redis_server() as url:
        yield url


@pytest.fixture(scope="module")
def prefill_started(redis_url, tmp_path_factory):
    disk = tmp_path_factory.mktemp("kv-disk")
    tests_dir = str(__import__("pathlib").Path(__file__).resolve().parents[1])
    env = inferstack_env(PYTHONPATH=f"{inferstack_env()['PYTHONPATH']}:{tests_dir}")
    cfg = {"disk": str(disk), "redis": redis_url, "len": PROMPT_LEN, "new": NEW_TOKENS}
    proc = subprocess.Popen([sys.executable, "-c", PREFILL, json.dumps(cfg)], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    yield proc, disk
    proc.kill()
    proc.wait(10)


@pytest.fixture(scope="module")
def prefill_proc(prefill_started, decode_llm):
    """P's results; D (``decode_llm``) loads its model while P loads and computes (one core each)."""
    proc, disk = prefill_started
    line = proc.stdout.readline()
    assert line, f"prefill engine exited with {proc.wait()}"
    return proc, json.loads(line), disk


@pytest.fixture(scope="module")
def decode_llm(redis_url, prefill_started):
    return LLM("smollm2-135m", dtype="float32", num_threads=1, kv_role="decode", kv_transfer_peers=("127.0.0.1",),
               kv_store=KVStoreConfig(tiers="host,redis", redis_url=redis_url))


def _parts(llm: LLM) -> tuple[PDConnector, KVStoreConnector]:
    multi = llm.engine.core.scheduler.connector
    assert isinstance(multi, MultiConnector)
    pd, tiers = multi.connectors
    return pd, tiers


def _computed_prompt_tokens(llm: LLM, fn):
    """Run ``fn`` and count the prompt tokens the executor really computed (not what stats claim)."""
    core = llm.engine.core
    executor = core.executor
    computed = 0
    inner = executor.execute

    def counting_execute(batch):
        nonlocal computed
        for seq in batch.seqs:
            computed += max(0, min(seq.start + seq.num_new_tokens, seq.request.num_prompt_tokens) - seq.start)
        return inner(batch)

    executor.execute = counting_execute
    before = core.stats()
    try:
        out = fn()
    finally:
        del executor.execute
    after = core.stats()
    return out, computed, after.external_prefix_cache_hits - before.external_prefix_cache_hits


def test_decode_engine_continues_from_the_prefill_engines_kv(prefill_proc, decode_llm):
    _, results, _ = prefill_proc
    ids = prompts(decode_llm.tokenizer, 4, PROMPT_LEN)
    pd, _ = _parts(decode_llm)
    (tokens, _), computed, hits = _computed_prompt_tokens(
        decode_llm, lambda: run_request(decode_llm.engine.core, ids[0], NEW_TOKENS, results[0]["params"]))
    assert tokens == results[0]["tokens"]
    assert computed <= 16 and hits == 512
    assert sum(pd.transport.stats.bytes.values()) > 0


def test_replica_reuses_a_prefix_through_redis(prefill_proc, decode_llm):
    _, results, _ = prefill_proc
    ids = prompts(decode_llm.tokenizer, 4, PROMPT_LEN)
    _, tiers = _parts(decode_llm)
    (tokens, _), computed, hits = _computed_prompt_tokens(
        decode_llm, lambda: run_request(decode_llm.engine.core, ids[1], NEW_TOKENS))
    assert tokens == results[1]["tokens"]
    assert computed <= 16 and hits == 512
    assert tiers.store.tiers[1].stats.hits == 2


def test_replica_reuses_a_prefix_through_a_shared_disk_directory(prefill_proc, decode_llm):
    _, results, disk = prefill_proc
    ids = prompts(decode_llm.tokenizer, 4, PROMPT_LEN)
    _, tiers = _parts(decode_llm)
    redis_store = tiers.store
    tiers.store = TieredKVStore([DiskTier(disk, 1 << 30)], redis_store.layout, redis_store.root)
    try:
        (tokens, _), computed, hits = _computed_prompt_tokens(
            decode_llm, lambda: run_request(decode_llm.engine.core, ids[2], NEW_TOKENS))
        assert tokens == results[2]["tokens"]
        assert computed <= 16 and hits == 512
        assert tiers.store.tiers[0].stats.hits == 2
    finally:
        tiers.store.close()
        tiers.store = redis_store


def test_prefill_engine_killed_before_the_pull_still_completes_correctly(prefill_proc, decode_llm, redis_url):
    proc, results, _ = prefill_proc
    ids = prompts(decode_llm.tokenizer, 4, PROMPT_LEN)
    pd, _ = _parts(decode_llm)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    import redis

    redis.Redis.from_url(redis_url).flushall()      # no tier may rescue it either
    failures = pd.stats.load_failures
    (tokens, _), computed, hits = _computed_prompt_tokens(
        decode_llm, lambda: run_request(decode_llm.engine.core, ids[3], NEW_TOKENS, results[3]["params"]))
    assert tokens == results[3]["tokens"]
    assert computed == PROMPT_LEN and hits == 0
    assert pd.stats.load_failures == failures + 1
