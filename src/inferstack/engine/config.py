"""Engine configuration: what a user sets on `inferstack engine serve` or `LLM(...)`."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, get_args

from inferstack.kvstore.settings import KVStoreConfig

# The one list of each choice: the CLI's options (cli/engine.py) and `up`'s settings (stack/settings.py)
# are made from these. This module imports no torch, so `inferstack ... --help` and an emulated engine
# start without it.
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Quantization = Literal["none", "int8", "int4", "gguf"]
LargeKernel = Literal["auto", "bfloat16", "float32", "int8", "int8blk"]
KVCacheDtype = Literal["auto", "float32", "bfloat16", "float16", "fp8_e4m3", "int8"]
Device = Literal["auto", "cpu", "cuda"]
SchedulingPolicy = Literal["fcfs", "priority"]
KVRole = Literal["both", "prefill", "decode"]
KVTransport = Literal["auto", "nixl", "tcp", "shm"]
KV_CACHE_DTYPES: tuple[str, ...] = get_args(KVCacheDtype)

DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30     # 1 GiB: two replicas of the bundled model fit in 24 GiB easily
ACCELERATOR_MAX_NUM_SEQS = 256           # vLLM's default running batch on a GPU
CPU_MAX_NUM_SEQS_PER_THREAD = 8          # see `cpu_max_num_seqs`


def cpu_max_num_seqs(threads: int) -> int:
    """The running-batch cap of a CPU engine that the user did not set.

    NOTE (why a CPU engine gets a small batch): on a GPU the KV cache bounds the running batch and
    the rest waits in the engine's queue, where the gateway sees it and its flow control queues and
    sheds. A CPU engine has room in its KV cache for dozens of short requests that share a cached
    prefix, but its decode step costs about the same per sequence once a few are running (attention
    over long contexts and weight reads do not batch much on 1-2 cores): measured on the bundled
    model with a 2,000-token shared prefix, decode throughput stops growing at 4-8 sequences per
    thread while every sequence slows down in proportion. Admitting everything made all requests slow
    together under overload, so none finished (issue 21); capping the batch keeps throughput and lets
    the excess wait where the gateway can see it (docs/gateway.md, "When flow control queues")."""
    return max(1, CPU_MAX_NUM_SEQS_PER_THREAD * threads)


@dataclass
class EngineConfig:
    model: str
    served_model_name: str | None = None
    dtype: Dtype = "auto"
    # Weight formats (docs/engine.md, "Weight formats"): int8/int4 kernels for small steps, a bf16
    # copy of the weights for steps of quant_crossover_rows rows or more (None: measured at start-up).
    quantization: Quantization = "none"
    quant_group_size: int = 32
    dense_prefill: bool = True
    quant_crossover_rows: int | None = None
    # The large-step copy: bf16 or fp32 (F.linear), or int8 per channel (int8 × int8 GEMM, less accurate);
    # auto: the faster of bf16 and fp32 here.
    quant_large_kernel: LargeKernel = "auto"
    # KV cache precision (docs/engine.md, "KV cache precision"): auto is the activations' dtype, or
    # bfloat16 with int8/int4 weights; int8 and fp8_e4m3 keep a scale per (token, KV head) in the block.
    kv_cache_dtype: KVCacheDtype = "auto"
    device: Device = "auto"
    block_size: int = 16
    max_model_len: int | None = None            # default: the model's context length
    kv_cache_bytes: int | None = None           # CPU budget for the paged KV cache
    gpu_memory_utilization: float = 0.9         # CUDA: share of device memory for weights + KV
    num_kv_blocks: int | None = None            # overrides both budgets (tests, preemption studies)
    max_num_seqs: int | None = None             # None: ACCELERATOR_MAX_NUM_SEQS, or cpu_max_num_seqs on CPU
    max_num_batched_tokens: int = 2048
    long_prefill_token_threshold: int = 0        # 0: no cap per request per step beyond the budget
    enable_prefix_caching: bool = True
    scheduling_policy: SchedulingPolicy = "fcfs"
    num_threads: int | None = None              # torch intra-op threads on CPU
    seed: int = 0
    kv_events_endpoint: str | None = None
    kv_events_topic: str = "kv"
    step_log: str | None = None                 # JSON lines, one per step (engine/steplog.py); None: off
    # External KV (docs/kv-cache.md, docs/disaggregation.md): tiers fastest first; no tiers = no store.
    kv_store: KVStoreConfig = field(default_factory=KVStoreConfig)
    kv_role: KVRole = "both"
    kv_transfer_host: str = "127.0.0.1"         # prefill role: where the KV transfer server listens
    kv_transfer_port: int = 0
    # How PD KV moves (docs/disaggregation.md): auto = NIXL when it imports and UCX starts, else shm.
    kv_transport: KVTransport = "auto"
    # PD SSRF guard (engine/connector/peers.py): a decode engine pulls only from listed peers and/or
    # params signed with the shared secret; a prefill engine signs what it returns with the secret.
    kv_transfer_peers: tuple[str, ...] = ()
    kv_transfer_secret: str | None = field(default=None, repr=False)
    # Cross-replica KV reuse (docs/disaggregation.md): READ a prefix another replica holds over NIXL when
    # the gateway names it; serve this engine's cached blocks to the others. Needs the transfer secret.
    kv_reuse: bool = False
    # Structured outputs and tool calling (docs/structured-outputs.md)
    grammar_workers: int = 2                    # threads compiling grammars off the step loop
    grammar_timeout_s: float = 10.0             # deadline for every grammar kind; past it: HTTP 400
    tool_call_parser: str = "auto"              # hermes | llama3_json | mistral | smollm2 | auto
    strict_max_properties: int = 5000           # OpenAI strict json_schema limits
    strict_max_nesting: int = 10
    strict_max_enum_values: int = 1000

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}")
        if self.kv_role not in get_args(KVRole):
            raise ValueError(f"kv_role must be both, prefill or decode, got {self.kv_role!r}")
        if self.kv_role == "decode" and not (self.kv_transfer_peers or self.kv_transfer_secret):
            raise ValueError("--role decode pulls KV from the peers named in each request: allow them with "
                             "--kv-transfer-peers HOST[:PORT],... or share a secret with the prefill engines "
                             "in $INFERSTACK_KV_TRANSFER_SECRET (inferstack up does this for you)")
        if self.kv_reuse and not self.kv_transfer_secret:
            raise ValueError("--kv-reuse lets replicas read each other's KV cache: it needs the stack's secret in "
                             "$INFERSTACK_KV_TRANSFER_SECRET (inferstack up sets it)")
        if self.kv_transport not in get_args(KVTransport):
            raise ValueError(f"kv_transport must be auto, nixl, tcp or shm, got {self.kv_transport!r}")
        if self.grammar_workers < 1 or self.grammar_timeout_s <= 0:
            raise ValueError("grammar_workers must be at least 1 and grammar_timeout_s positive")
        if self.quantization not in get_args(Quantization):
            raise ValueError(f"quantization must be none, int8, int4 or gguf, got {self.quantization!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.quant_group_size not in (32, 64, 128):
            raise ValueError(f"quant_group_size must be 32, 64 or 128, got {self.quant_group_size}")
        if self.quant_large_kernel not in get_args(LargeKernel):
            raise ValueError("quant_large_kernel must be auto, bfloat16, float32, int8 or int8blk, "
                             f"got {self.quant_large_kernel!r}")
        if self.quant_crossover_rows is not None and self.quant_crossover_rows < 1:
            raise ValueError(f"quant_crossover_rows must be at least 1, got {self.quant_crossover_rows}")
        if self.tool_call_parser not in ("auto", "hermes", "llama3_json", "mistral", "smollm2"):
            raise ValueError("tool_call_parser must be auto, hermes, llama3_json, mistral or smollm2, "
                             f"got {self.tool_call_parser!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")

    def on_cpu(self, threads: int) -> EngineConfig:
        """This configuration for a CPU engine (real, or emulated on the `cpu` profile) with ``threads``
        torch threads: an unset running-batch cap becomes `cpu_max_num_seqs`."""
        return self if self.max_num_seqs is not None else replace(self, max_num_seqs=cpu_max_num_seqs(threads))

    @property
    def seq_limit(self) -> int:
        """The running-batch cap in force: the user's, else the accelerator default (a CPU engine's
        builder replaces None with `cpu_max_num_seqs` before anything reads this)."""
        return self.max_num_seqs if self.max_num_seqs is not None else ACCELERATOR_MAX_NUM_SEQS
