"""A point-in-time snapshot of engine state and cumulative counters, read by /metrics."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    max_num_seqs: int = 0                     # the running batch's cap: beyond it requests wait
    kv_cache_usage: float = 0.0               # used blocks / total blocks, 0..1
    num_kv_blocks: int = 0
    block_size: int = 16
    prompt_tokens: int = 0                    # counters below are cumulative since start
    generation_tokens: int = 0
    prefix_cache_queries: int = 0             # tokens looked up in the device prefix cache
    prefix_cache_hits: int = 0                # tokens found there
    external_prefix_cache_queries: int = 0    # tokens looked up in KV tiers / peers
    external_prefix_cache_hits: int = 0
    num_preemptions: int = 0
    busy_seconds: float = 0.0                 # wall time spent running steps (duty cycle = its rate)
    request_success: dict[str, int] = field(default_factory=dict)   # finished_reason -> count
