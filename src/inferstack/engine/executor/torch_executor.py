"""Runs scheduled steps through a torch model on CPU or CUDA over a paged KV cache."""

from __future__ import annotations

import torch

from inferstack.engine.config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig
from inferstack.engine.executor.attention_metadata import AttentionMetadata
from inferstack.engine.executor.base import ExecutorOutput
from inferstack.engine.executor.kv_format import KVFormat
from inferstack.engine.kv.host_memory import huge_page_layers
from inferstack.engine.outputs import TokenLogprob
from inferstack.engine.sampling import SamplingRow, greedy_only, sample
from inferstack.engine.scheduler import SchedulerOutput
from inferstack.engine.structured.manager import GrammarBitmask
from inferstack.engine.weights.loader import LoadedModel


def kv_bytes_per_block(lm: LoadedModel, block_size: int, fmt: KVFormat) -> int:
    arch = lm.arch
    return 2 * arch.num_layers * block_size * arch.num_kv_heads * fmt.bytes_per_row()


class TorchExecutor:
    def __init__(self, lm: LoadedModel, config: EngineConfig, device: torch.device) -> None:
        self.lm = lm
        self.device = device
        self.block_size = config.block_size
        arch = lm.arch
        self.kv_format = KVFormat.resolve(config.kv_cache_dtype, lm.dtype, arch.head_dim, lm.quant is not None)
        self.num_kv_blocks = self._size_kv_cache(config)
        shape = (2, self.num_kv_blocks, self.block_size, arch.num_kv_heads, self.kv_format.row)
        self.kv_caches = (
            huge_page_layers(arch.num_layers, shape, self.kv_format.storage) if device.type == "cpu"
            else [torch.zeros(shape, dtype=self.kv_format.storage, device=device) for _ in range(arch.num_layers)])
        self._generators: dict[str, torch.Generator] = {}

    def _size_kv_cache(self, config: EngineConfig) -> int:
        if config.num_kv_blocks is not None:
            return config.num_kv_blocks
        per_block = kv_bytes_per_block(self.lm, self.block_size, self.kv_format)
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = int(total * config.gpu_memory_utilization) - (total - free)
            if budget <= per_block:
                raise MemoryError(
                    f"gpu_memory_utilization={config.gpu_memory_utilization} leaves no room for the KV cache "
                    f"({free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB after loading the weights)")
        else:
            budget = config.kv_cache_bytes or DEFAULT_CPU_KV_CACHE_BYTES
        return max(1, budget // per_block)

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    @torch.inference_mode()
    def execute(self, batch: SchedulerOutput) -> ExecutorOutput:
        if batch.is_empty:
            return ExecutorOutput()
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        for seq in batch.seqs:
            start, n = seq.start, seq.num_new_tokens
            input_ids.extend(seq.token_ids)
            positions.extend(range(start, start + n))
            table = seq.block_ids
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            query_lens.append(n)
            seq_lens.append(start + n)
            tables.append(table)
        max_blocks = max(len(t) for t in tables)
        dev = self.device
        qsl = [0]
        for q in query_lens:
            qsl.append(qsl[-1] + q)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            query_start_loc=torch.tensor(qsl, dtype=torch.long, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.long, device=dev),
            block_tables=torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.long, device=dev),
            query_lens_list=query_lens,
            seq_lens_list=seq_lens,
            block_size=bs,
            kv_format=self.kv_format,
            wait_for_layer=batch.wait_for_layer,
        )
        hidden = self.lm.model(torch.tensor(input_ids, dtype=torch.long, device=dev),
                               torch.tensor(positions, dtype=torch.long, device=dev), self.kv_caches, meta)
        sample_seqs = [(i, s) for i, s in enumerate(batch.seqs) if s.sample]
        if not sample_seqs:
            return ExecutorOutput()
        if len(sample_seqs) < hidden.shape[0]:
            last_rows = torch.tensor([qsl[i + 1] - 1 for i, _ in sample_seqs], dtype=torch.long, device=dev)
            hidden = hidden.index_select(0, last_rows)
        # else every row is a sampled sequence's last token, in order (a decode step): no gather
        rows = [SamplingRow(s.request.sampling_params, s.request.prompt_token_ids, s.request.output_token_ids,
                            self._generator(s.request.request_id, s.request.sampling_params.seed))
                for _, s in sample_seqs]
        tokens, logprobs = self._sample(hidden, rows, batch.grammar_bitmask)
        out = ExecutorOutput()
        for (_, seq), token, lp in zip(sample_seqs, tokens, logprobs, strict=True):
            out.sampled[seq.request_id] = token
            if lp is not None:
                out.logprobs[seq.request_id] = lp
        return out

    def _sample(self, hidden: torch.Tensor, rows: list[SamplingRow], bitmask: GrammarBitmask | None
                ) -> tuple[list[int], list[TokenLogprob | None]]:
        """One token per row; greedy steps that need nothing but the argmax take it from the model where it has a
        way without the logits (``CausalLM.greedy_tokens``), the same tokens."""
        if greedy_only(rows, bitmask):
            tokens = self.lm.model.greedy_tokens(hidden)
            if tokens is not None:
                return tokens.tolist(), [None] * len(rows)
        return sample(self.lm.model.compute_logits(hidden).float().cpu(), rows, bitmask)

    def _generator(self, request_id: str, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        gen = self._generators.get(request_id)
        if gen is None:
            gen = torch.Generator().manual_seed(seed)
            self._generators[request_id] = gen
        return gen
