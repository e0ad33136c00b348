"""A paged toy model for connector tests: K/V depend on (token, position, layer) and every sampled
token reads all K/V of its context back through the block table, so a load into wrong blocks, a
stale chunk or another tenant's chunk changes the output."""

from __future__ import annotations

import time

import torch

from inferstack.engine.connector.base import KVConnectorBase
from inferstack.engine.executor.base import ExecutorOutput
from inferstack.engine.kv.block_pool import BlockPool
from inferstack.engine.kv.hashing import KVKeySpace
from inferstack.engine.kv.manager import KVCacheManager
from inferstack.engine.request import Request
from inferstack.engine.sampling_params import SamplingParams
from inferstack.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from inferstack.kvstore import ChunkLayout

SPACE = KVKeySpace("7" * 64, "float64")
BS, LAYERS, HEADS, DIM = 16, 2, 2, 4
LAYOUT = ChunkLayout(LAYERS, HEADS, DIM, torch.float64, tokens=256)


class PagedToyExecutor:
    def __init__(self, num_blocks: int = 128) -> None:
        self.num_kv_blocks, self.block_size = num_blocks, BS
        self.kv_caches = [torch.zeros(2, num_blocks, BS, HEADS, DIM, dtype=torch.float64) for _ in range(LAYERS)]
        self.computed_prompt_tokens = 0

    def release(self, request_id: str) -> None:
        """Greedy and stateless: nothing is kept per request."""

    def execute(self, batch: SchedulerOutput) -> ExecutorOutput:
        out = ExecutorOutput()
        for layer, cache in enumerate(self.kv_caches):
            if batch.wait_for_layer is not None:      # as the real model: before a layer touches its cache
                batch.wait_for_layer(layer)
            for seq in batch.seqs:
                toks = seq.request.all_token_ids
                for p in range(seq.start, seq.start + seq.num_new_tokens):
                    b, o = seq.block_ids[p // BS], p % BS
                    v = float((toks[p] * 31 + p * 7 + layer) % 1009)
                    cache[0, b, o] = v
                    cache[1, b, o] = -2 * v
        for seq in batch.seqs:
            end = seq.start + seq.num_new_tokens
            self.computed_prompt_tokens += max(0, min(end, seq.request.num_prompt_tokens) - seq.start)
            if seq.sample:
                ids = torch.tensor(seq.block_ids[: -(-end // BS)])
                weights = torch.arange(1, end + 1, dtype=torch.float64)
                acc = 0.0
                for cache in self.kv_caches:
                    kv = cache[:, ids].reshape(2, -1, HEADS, DIM)[:, :end, 0, 0]
                    acc += float((kv[0] * weights).sum() - (kv[1] * weights).sum())
                out.sampled[seq.request_id] = int(acc) % 997
        return out


class ToyEngine:
    """Scheduler + KV manager + pool + connector, stepped the way EngineCore.step does;
    ``connector=None`` is the plain colocated engine."""

    def __init__(self, connector: KVConnectorBase | None = None, num_blocks: int = 128) -> None:
        self.ex = PagedToyExecutor(num_blocks)
        self.connector = connector
        if connector is not None:
            connector.register_kv_caches(self.ex.kv_caches)
        self.sched = Scheduler(SchedulerConfig(max_num_batched_tokens=256, max_model_len=4096),
                               KVCacheManager(BlockPool(num_blocks, BS, True), SPACE), self.connector)

    def generate(self, prompt: list[int], max_tokens: int = 6, salt: str | None = None, rid: str = "r",
                 kv_transfer_params: dict | None = None) -> list[int]:
        request = self.submit(prompt, max_tokens, salt, rid, kv_transfer_params)
        self.run()
        return request.output_token_ids

    def submit(self, prompt: list[int], max_tokens: int = 6, salt: str | None = None, rid: str = "r",
               kv_transfer_params: dict | None = None) -> Request:
        request = Request(rid, prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                          time.monotonic(), cache_salt=salt, kv_transfer_params=kv_transfer_params)
        self.sched.add_request(request)
        self.last = request
        return request

    def run(self) -> None:
        while self.sched.has_unfinished():
            self.step()

    def step(self) -> SchedulerOutput:
        batch = self.sched.schedule()
        if self.connector is not None:
            self.connector.start_load_kv()
            failed = self.connector.take_failed_loads()
            if failed:
                self.sched.recompute(batch, failed)
        streaming = self.sched.streaming_ids
        landing = self.connector.layer_loads(streaming) if self.connector is not None and streaming else None
        if landing is not None:
            batch.wait_for_layer = landing.wait_for_layer
        result = self.ex.execute(batch)
        if landing is not None:
            self.sched.end_layer_loads(batch, landing.finish())
        if self.connector is not None:
            for seq in batch.seqs:
                self.sched.kv.update_block_hashes(seq.request)
            self.connector.save_kv(batch.seqs)
        self.sched.update_from_output(batch, result.sampled)
        return batch


PROMPT = [(i * 13 + 5) % 500 for i in range(520)]      # 32 full blocks + 8 tokens: two full chunks


def baseline(prompt=PROMPT, **kw) -> list[int]:
    e = ToyEngine()
    out = e.generate(prompt, **kw)
    assert e.ex.computed_prompt_tokens == len(prompt)
    return out
