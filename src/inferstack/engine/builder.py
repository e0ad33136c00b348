"""Turns an EngineConfig into a ready EngineCore: load weights, size the KV cache, wire the scheduler."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from inferstack.engine.config import EngineConfig
from inferstack.engine.core import EngineCore
from inferstack.engine.kv.hashing import KVKeySpace
from inferstack.engine.tokenizer import Tokenizer
from inferstack.engine.tools.formats import FORMATS, ToolFormat, detect_format
from inferstack.protocol.strict_schema import StrictLimits

# torch, the weight loaders and the connectors are imported where a real engine is built, not here:
# the emulated engine shares BuiltEngine and output_settings and starts without torch (~2 s CPU).
if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass
class BuiltEngine:
    core: EngineCore
    tokenizer: Tokenizer
    model_name: str
    max_model_len: int
    model_digest: str
    eos_token_ids: frozenset[int]
    tool_format: ToolFormat = FORMATS["hermes"]
    strict_limits: StrictLimits = field(default_factory=StrictLimits)


def output_settings(config: EngineConfig, tokenizer: Tokenizer, model_name: str) -> dict:
    """BuiltEngine's tool-call family and strict-schema limits, from the config."""
    return {"tool_format": detect_format(config.tool_call_parser, tokenizer.chat_template, model_name),
            "strict_limits": StrictLimits(config.strict_max_properties, config.strict_max_nesting,
                                          config.strict_max_enum_values)}


def resolve_device(device: str) -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but no CUDA device is available")
    return torch.device(device)


def configure_threads(config: EngineConfig) -> None:
    threads = config.num_threads or int(os.environ.get("INFERSTACK_THREADS", "0")) or None
    if threads:
        import torch

        torch.set_num_threads(threads)


def build_engine(config: EngineConfig) -> BuiltEngine:
    import torch

    from inferstack.engine.connector.factory import build_connector
    from inferstack.engine.cpu_malloc import keep_step_buffers
    from inferstack.engine.executor.torch_executor import TorchExecutor
    from inferstack.engine.weights.loader import load_model
    from inferstack.engine.weights.quant_loader import QuantOptions

    configure_threads(config)
    device = resolve_device(config.device)
    if device.type == "cpu":
        config = config.on_cpu(torch.get_num_threads())
        keep_step_buffers()
        log.info("running batch capped at %d sequences (--max-num-seqs to change)", config.seq_limit)
    quant = QuantOptions(config.quantization, config.quant_group_size, config.dense_prefill,
                         config.quant_crossover_rows, config.quant_large_kernel)
    lm = load_model(config.model, dtype=config.dtype, device=device, quant=quant)
    model_max = lm.arch.max_position_embeddings
    if config.max_model_len is not None and config.max_model_len > model_max:
        raise ValueError(f"--max-model-len {config.max_model_len} exceeds the model's context length {model_max}")
    max_model_len = config.max_model_len or model_max
    executor = TorchExecutor(lm, config, device)
    capacity = executor.num_kv_blocks * config.block_size
    if capacity < max_model_len:
        # A request must always fit the cache alone, or preemption could never make room for it.
        log.warning("the KV cache holds %d tokens: capping max_model_len from %d to that", capacity, max_model_len)
        max_model_len = capacity
    # The KV dtype is part of the key: int8/fp8 blocks must never be served to an engine storing bf16.
    key_space = KVKeySpace(model_digest=lm.model_digest, dtype=lm.kv_key_dtype + executor.kv_format.key_suffix(),
                           block_size=config.block_size)
    connector = build_connector(config, executor.kv_caches, key_space)
    core = EngineCore.build(config, executor, lm.tokenizer, key_space, max_model_len, connector,
                            vocab_size=lm.arch.vocab_size)
    return BuiltEngine(core=core, tokenizer=lm.tokenizer, model_name=config.served_model_name or lm.name,
                       max_model_len=max_model_len, model_digest=lm.model_digest,
                       eos_token_ids=frozenset(lm.tokenizer.eos_token_ids),
                       **output_settings(config, lm.tokenizer, lm.name))
