"""`inferstack engine inference-sim`: the emulated engine behind llm-d-inference-sim's command line, so
Gateway API Inference Extension / llm-d recipes that start that simulator can start ours unchanged
(docs/simulator.md, "llm-d-inference-sim flags"). Each flag maps onto the emulated engine; the ones with
no counterpart here are refused with a clear error rather than ignored."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import typer

DEFAULT_EMULATE = "h100:llama-3-8b"


class FlagError(ValueError):
    pass


@dataclass
class InferenceSimFlags:
    model: str
    port: int = 8000
    served_model_name: list[str] | None = None
    max_num_seqs: int = 5
    max_model_len: int = 1024
    mode: str = "random"
    latency_calculator: str = ""
    time_to_first_token: float = 0.0       # milliseconds, as llm-d-inference-sim
    inter_token_latency: float = 0.0
    prefill_overhead: float = 0.0
    prefill_time_per_token: float = 0.0
    time_factor_under_load: float = 1.0
    enable_kvcache: bool = False
    kv_cache_size: int = 1024               # blocks
    block_size: int = 16
    zmq_endpoint: str | None = None
    data_parallel_size: int = 1
    failure_injection_rate: int = 0
    max_loras: int = 0
    lora_modules: list[str] | None = None


def engine_settings(f: InferenceSimFlags):  # -> tuple[EngineConfig, FixedLatency, int]
    """(engine config, step timing, engine count) for the flags; FlagError names a flag we cannot honour."""
    from inferstack.cli.engine import build_engine_config
    from inferstack.engine.executor.fixed_latency import FixedLatency

    if f.mode != "random":
        raise FlagError(f"--mode {f.mode}: only random is emulated (the engine streams its own deterministic "
                        "text; echo would need the prompt back)")
    if f.block_size != 16:
        raise FlagError(f"--block-size {f.block_size}: the engine's KV blocks are 16 tokens")
    if f.failure_injection_rate:
        raise FlagError("--failure-injection-rate: failure injection is not emulated")
    if f.max_loras or f.lora_modules:
        raise FlagError("--max-loras/--lora-modules: LoRA adapters are not emulated")
    names = f.served_model_name or [f.model]
    if len(names) > 1:
        raise FlagError(f"--served-model-name: one name is served here, got {len(names)}")
    if f.latency_calculator not in ("", "constant", "per-token"):
        raise FlagError(f"--latency-calculator must be constant or per-token, got {f.latency_calculator!r}")
    if f.data_parallel_size < 1:
        raise FlagError("--data-parallel-size must be >= 1")
    per_token = f.latency_calculator == "per-token"
    timer = FixedLatency(ttft_s=f.time_to_first_token / 1e3, itl_s=f.inter_token_latency / 1e3,
                         prefill_overhead_s=f.prefill_overhead / 1e3,
                         prefill_per_token_s=f.prefill_time_per_token / 1e3, per_token=per_token,
                         load_factor=f.time_factor_under_load, max_num_seqs=f.max_num_seqs)
    config = build_engine_config(DEFAULT_EMULATE.split(":")[1], served_model_name=names[0],
                                 max_num_seqs=f.max_num_seqs, max_model_len=f.max_model_len,
                                 num_kv_blocks=f.kv_cache_size, enable_prefix_caching=f.enable_kvcache,
                                 kv_events_endpoint=f.zmq_endpoint if f.enable_kvcache else None)
    return config, timer, f.data_parallel_size


def inference_sim(
    model: Annotated[str, typer.Option(help="Model name clients send (llm-d-inference-sim --model).")],
    port: Annotated[int, typer.Option(help="TCP port; 0 lets the OS pick (see --ready-file).")] = 8000,
    served_model_name: Annotated[list[str] | None, typer.Option(help="Name served instead of --model.")] = None,
    max_num_seqs: Annotated[int, typer.Option(help="Most requests running at once.")] = 5,
    max_model_len: Annotated[int, typer.Option(help="Longest prompt + completion in tokens.")] = 1024,
    mode: Annotated[str, typer.Option(help="random (deterministic text here); echo is refused.")] = "random",
    latency_calculator: Annotated[str, typer.Option(
        help="constant: TTFT = --time-to-first-token; per-token: TTFT = --prefill-overhead + uncached "
             "prompt tokens x --prefill-time-per-token.")] = "",
    time_to_first_token: Annotated[float, typer.Option(help="Milliseconds to the first token.")] = 0.0,
    inter_token_latency: Annotated[float, typer.Option(help="Milliseconds between tokens.")] = 0.0,
    prefill_overhead: Annotated[float, typer.Option(help="per-token calculator: fixed ms per prompt.")] = 0.0,
    prefill_time_per_token: Annotated[float, typer.Option(help="per-token calculator: ms per uncached "
                                                               "prompt token.")] = 0.0,
    time_factor_under_load: Annotated[float, typer.Option(
        help="Latencies x this when --max-num-seqs requests run (linear from 1 at one).")] = 1.0,
    enable_kvcache: Annotated[bool, typer.Option(help="Prefix caching, and KV events on --zmq-endpoint.")] = False,
    kv_cache_size: Annotated[int, typer.Option(help="KV cache size in blocks.")] = 1024,
    block_size: Annotated[int, typer.Option(help="KV block size in tokens (16 only).")] = 16,
    zmq_endpoint: Annotated[str | None, typer.Option(help="ZMQ endpoint KV events are published on.")] = None,
    data_parallel_size: Annotated[int, typer.Option(
        help="Engines to serve (the first on --port, the others on OS-chosen ports listed in --ready-file).")] = 1,
    seed: Annotated[int | None, typer.Option(help="Accepted; the output here is deterministic anyway.")] = None,
    tokenizers_cache_dir: Annotated[str | None, typer.Option(help="Accepted; the bundled tokenizer is used.")]
    = None,
    failure_injection_rate: Annotated[int, typer.Option(help="Refused unless 0 (not emulated).")] = 0,
    max_loras: Annotated[int, typer.Option(help="Refused unless 0 (LoRA is not emulated).")] = 0,
    lora_modules: Annotated[list[str] | None, typer.Option(help="Refused (LoRA is not emulated).")] = None,
    ready_file: Annotated[str | None, typer.Option(help="Write {\"urls\": [...]} here once listening.")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
) -> None:
    """Serve emulated engines with llm-d-inference-sim's flags (the real scheduler and KV cache; step times
    from its fixed latencies). Example: inferstack engine inference-sim --model food-review --port 8000
    --time-to-first-token 200 --inter-token-latency 50 --max-num-seqs 5 --enable-kvcache"""
    from inferstack.engine.executor.emulated_fleet import serve_fleet
    from inferstack.engine.server import ServeOptions
    from inferstack.sim.profile import parse_profile

    flags = InferenceSimFlags(model, port, served_model_name, max_num_seqs, max_model_len, mode, latency_calculator,
                              time_to_first_token, inter_token_latency, prefill_overhead, prefill_time_per_token,
                              time_factor_under_load, enable_kvcache, kv_cache_size, block_size, zmq_endpoint,
                              data_parallel_size, failure_injection_rate, max_loras, lora_modules)
    try:
        config, timer, count = engine_settings(flags)
        code = serve_fleet(config, parse_profile(DEFAULT_EMULATE), count,
                           ServeOptions(host=host, port=port, ready_file=ready_file), timer=timer.step_time)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except OSError as exc:
        typer.echo(f"error: cannot listen on {host}:{port}: {exc.strerror or exc}", err=True)
        raise typer.Exit(1) from None
    raise typer.Exit(code)
