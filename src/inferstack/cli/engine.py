"""`inferstack engine serve`: run the built-in engine behind an OpenAI-compatible HTTP server."""

from __future__ import annotations

import dataclasses
from enum import Enum, StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn, get_args

import typer

from inferstack.engine import config
from inferstack.protocol.http_limits import BODY_TIMEOUT_S, HEADER_TIMEOUT_S
from inferstack.sizes import parse_size

app = typer.Typer(
    help="The built-in inference engine (paged KV cache, continuous batching, prefix caching).",
    no_args_is_help=True,
)


def _check_step_log(path: str) -> None:
    """Fail at once, naming the option, when the step log cannot be written (not as a failed model load later)."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a"):
            pass
    except OSError as exc:
        typer.echo(f"error: --step-log {path}: cannot write: {exc.strerror or exc}", err=True)
        raise typer.Exit(2) from None


def _size_option(value: str | None) -> int | None:
    try:
        return None if value is None else parse_size(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _choices(name: str, literal: Any) -> type[StrEnum]:
    """An option's choices for typer, from the engine config's Literal (their one source of truth)."""
    return StrEnum(name, [(v, v) for v in get_args(literal)])


Dtype = _choices("Dtype", config.Dtype)
Quantization = _choices("Quantization", config.Quantization)
KVTransport = _choices("KVTransport", config.KVTransport)
KVCacheDtype = _choices("KVCacheDtype", config.KVCacheDtype)
Device = _choices("Device", config.Device)
Policy = _choices("Policy", config.SchedulingPolicy)
Role = _choices("Role", config.KVRole)


class LogFormat(StrEnum):
    text = "text"
    json = "json"


def build_engine_config(model: str, **options: Any) -> config.EngineConfig:
    """The one place CLI options become an EngineConfig (flags added later, e.g. --emulate, go here).

    ``options`` are the CLI's keyword values; None means "engine default". Raises ValueError with a
    message naming the bad value.
    """
    from inferstack.kvstore.settings import KVStoreConfig

    kv_cache_bytes = options.pop("kv_cache_bytes", None)
    # KV tiers (docs/kv-cache.md): --kv-* flags become the store's one settings object
    tier_flags = {name: options.pop(f"kv_{name}", None) for name in ("host_bytes", "disk_path", "disk_bytes",
                                                                       "redis_url")}
    tiers = options.pop("kv_tiers", None)
    if tiers:
        options["kv_store"] = KVStoreConfig(tiers=tiers, **{k: v for k, v in tier_flags.items() if v is not None})
    if "role" in options:
        options["kv_role"] = options.pop("role")
    fields: dict[str, Any] = {k: (v.value if isinstance(v, Enum) else v) for k, v in options.items() if v is not None}
    if "threads" in fields:
        fields["num_threads"] = fields.pop("threads")
    if kv_cache_bytes is not None:
        fields["kv_cache_bytes"] = parse_size(kv_cache_bytes) if isinstance(kv_cache_bytes, str) else kv_cache_bytes
    return config.EngineConfig(model=model, **fields)


def _emulation(emulate: str | None, model: str | None, link_gbps: float | None, count: int,
               role: Role | None) -> tuple[Any, str | None]:
    """The profile `--emulate` names (None without it) and the model to serve; exits 2 on a bad combination."""
    def fail(message: str) -> NoReturn:
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(2)

    if emulate is None:
        if link_gbps is not None:
            fail("--emulate-kv-link-gbps needs --emulate")
        if count != 1:
            fail("--emulate-count needs --emulate and a count >= 1")
        return None, model
    from inferstack.sim.profile import ProfileError, parse_profile

    try:
        profile = parse_profile(emulate)
    except ProfileError as exc:
        fail(str(exc))
    if model is not None:
        fail("--emulate names its model (HARDWARE:MODEL); drop --model")
    if count < 1:
        fail("--emulate-count needs --emulate and a count >= 1")
    if link_gbps is not None:
        if link_gbps <= 0:
            fail("--emulate-kv-link-gbps must be > 0")
        if role in (None, Role.both):
            fail("--emulate-kv-link-gbps models KV transfer between engines: it needs --role prefill or "
                 "--role decode")
        profile = dataclasses.replace(profile, hardware=dataclasses.replace(
            profile.hardware, net_bandwidth=link_gbps * 1e9 / 8))
    return profile, profile.model.name


@app.command()
def serve(
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="What to serve: a bundled alias (smollm2-135m), a .gguf file, a Hugging Face "
                              "directory (safetensors + tokenizer) or an oci:// reference. Not used with "
                              "--emulate.")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on. Keep 127.0.0.1 unless other machines must "
                                           "reach this server.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port; 0 lets the OS pick a free one (see --ready-file).")] = 8000,
    ready_file: Annotated[str | None, typer.Option(
        help="Once the model is loaded, write one JSON line {\"urls\": [...], \"pid\": N} here (also printed "
             "to stdout): how scripts learn the real port when --port is 0.")] = None,
    served_model_name: Annotated[str | None, typer.Option(
        help="Name clients put in the `model` field (default: the model's own name).")] = None,
    dtype: Annotated[Dtype, typer.Option(help="Activation precision, and the weights' unless --quantization; "
                                              "auto picks float32 on CPU (also with --quantization: only the "
                                              "matmul inputs go to bf16), bfloat16 on CUDA.")] = Dtype.auto,
    kv_cache_dtype: Annotated[KVCacheDtype, typer.Option(
        help="KV cache precision: auto (the activations' dtype; bfloat16 with --quantization), float32, "
             "bfloat16, float16, or int8 / fp8_e4m3 (about half of bf16's memory, a scale per token and KV "
             "head); see docs/engine.md, 'KV cache precision'.")] = KVCacheDtype.auto,
    quantization: Annotated[Quantization, typer.Option(
        help="CPU weight format: none (weights in --dtype), int8 (min/max per group of --quant-group-size), "
             "int4 (groups of --quant-group-size) or gguf (keep a .gguf file's own Q8_0/Q4_* precision). "
             "int4/gguf decode "
             "fastest; see docs/engine.md, 'Weight formats'.")] = Quantization.none,
    quant_group_size: Annotated[int | None, typer.Option(help="int8/int4: columns per scale (32, 64 or 128; "
                                                              "smaller is more accurate).")] = None,
    dense_prefill: Annotated[bool, typer.Option(
        "--dense-prefill/--no-dense-prefill",
        help="With --quantization: also keep a copy of the weights for prefill chunks and large batches "
             "(faster there; 1, 2 or 4 bytes per parameter more memory, see --quant-large-kernel).")] = True,
    quant_crossover_rows: Annotated[int | None, typer.Option(
        help="With --quantization and --dense-prefill: steps of this many tokens or more use the large-step "
             "copy (default: measured at start-up).")] = None,
    quant_large_kernel: Annotated[str | None, typer.Option(
        help="With --quantization and --dense-prefill: the large-step copy, bfloat16 (2 bytes per parameter), "
             "float32 (4), int8 (1 byte, int8 x int8 GEMMs with per-row activation scales: fast, less "
             "accurate) or int8blk (1 byte: the file's own block codes in a VNNI int8 x int8 kernel, activation "
             "scales per 32 columns; AVX-512 VNNI CPUs, else float32); auto: the fastest of bfloat16, float32 "
             "and, for a 4-bit GGUF only, int8blk, measured at start-up (docs/engine.md, 'Kernel choice per "
             "step').")] = None,
    device: Annotated[Device, typer.Option(help="Where to run; auto uses CUDA when available.")] = Device.auto,
    max_model_len: Annotated[int | None, typer.Option(
        help="Longest prompt + completion in tokens (default: the model's context length, capped by the "
             "KV cache).")] = None,
    kv_cache_bytes: Annotated[str | None, typer.Option(
        callback=_size_option, help="CPU memory for the paged KV cache, e.g. 1GiB or 512MiB.")] = None,
    gpu_memory_utilization: Annotated[float | None, typer.Option(
        help="CUDA: share of GPU memory for weights + KV cache (0-1].")] = None,
    num_kv_blocks: Annotated[int | None, typer.Option(
        help="Exact number of 16-token KV blocks (overrides the memory budgets; for experiments).")] = None,
    max_num_seqs: Annotated[int | None, typer.Option(
        help="Most requests in one running batch (default: 256 on a GPU; 8 per torch thread on CPU, where a "
             "bigger batch adds little throughput and slows every request: docs/engine.md).")] = None,
    max_num_batched_tokens: Annotated[int | None, typer.Option(
        help="Token budget of one engine step (prefill chunks + decodes).")] = None,
    scheduling_policy: Annotated[Policy | None, typer.Option(
        help="fcfs: arrival order; priority: lower `priority` values in requests go first.")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch (default: torch's choice).")] = None,
    kv_events_endpoint: Annotated[str | None, typer.Option(
        help="Publish vLLM-style KV cache events on this ZMQ PUB endpoint, e.g. tcp://127.0.0.1:5557.")] = None,
    step_log: Annotated[str | None, typer.Option(
        help="Append one JSON line per engine step (batch shape, forward and step seconds) to this file: what "
             "`benchmarks/sim_fidelity.py` calibrates the simulator on (docs/simulator.md). With --emulate-count N, "
             "engine n > 0 writes FILE.n.")] = None,
    enable_prefix_caching: Annotated[bool, typer.Option(
        "--enable-prefix-caching/--no-enable-prefix-caching",
        help="Reuse KV blocks of identical prompt prefixes across requests.")] = True,
    api_key: Annotated[str | None, typer.Option(
        envvar="INFERSTACK_API_KEY",
        help="Require 'Authorization: Bearer KEY' on /v1/*, /tokenize and /detokenize (also read from "
             "$INFERSTACK_API_KEY).")] = None,
    log_format: Annotated[LogFormat, typer.Option(help="text for people, json for log pipelines (one object "
                                                       "per line, with request_id).")] = LogFormat.text,
    drain_timeout: Annotated[float, typer.Option(
        help="On SIGTERM, seconds to let in-flight requests finish before cutting them off.")] = 30.0,
    header_timeout: Annotated[float, typer.Option(
        min=0.1, help="Seconds a client has to send a request's headers (slowloris guard); 408 after.",
    )] = HEADER_TIMEOUT_S,
    body_timeout: Annotated[float, typer.Option(
        min=0.1, help="Seconds a client has to send a request's body once its headers arrived; 408 after.",
    )] = BODY_TIMEOUT_S,
    grammar_timeout: Annotated[float | None, typer.Option(
        help="Structured outputs: seconds a grammar (JSON schema, regex, choice, grammar, tool_choice) may "
             "take to compile; a slower one is a 400 (default 10).")] = None,
    grammar_workers: Annotated[int | None, typer.Option(
        help="Threads compiling grammars off the engine loop (default 2).")] = None,
    tool_call_parser: Annotated[str | None, typer.Option(
        help="Tool-call format of the model: hermes (Qwen, Hermes), llama3_json, mistral, smollm2, or auto "
             "(from the chat template and model name; the default).")] = None,
    strict_max_properties: Annotated[int | None, typer.Option(
        help="Strict json_schema: most object properties in one schema (default 5000).")] = None,
    strict_max_nesting: Annotated[int | None, typer.Option(
        help="Strict json_schema: most levels of nesting (default 10).")] = None,
    strict_max_enum_values: Annotated[int | None, typer.Option(
        help="Strict json_schema: most enum values in one schema (default 1000).")] = None,
    emulate: Annotated[str | None, typer.Option(
        help="Emulate HARDWARE:MODEL instead of running a model, e.g. h100:llama-3-8b, h100x4:llama-3-70b, "
             "cpu:smollm2-135m: the real scheduler, KV cache and prefix cache, with step times from a "
             "performance model (docs/benchmarking.md). Hardware: h100, h200, a100, l4, cpu.")] = None,
    emulate_count: Annotated[int, typer.Option(
        help="With --emulate: host this many engines in one process, each on its own OS-chosen port "
             "(--port applies to the first); the ready file lists all URLs.")] = 1,
    emulate_kv_link_gbps: Annotated[float | None, typer.Option(
        help="With --emulate and --role prefill|decode: network line rate per device for KV transfer, in "
             "Gbit/s (default: the hardware's NIC, e.g. 400 for h100).")] = None,
    trust_policy: Annotated[str | None, typer.Option(
        help="Trust policy YAML (see docs/supply-chain.md): the model is verified against it before loading "
             "and refused if it is unsigned, altered or from a registry not allowed.")] = None,
    allow_unverified: Annotated[bool, typer.Option(
        help="Serve an oci:// model without a trust policy (no signature check).")] = False,
    kv_tiers: Annotated[str | None, typer.Option(
        help="Keep KV of 256-token prompt chunks outside the engine for reuse across requests and replicas: "
             "any of host,disk,redis, fastest first (docs/kv-cache.md).")] = None,
    kv_host_bytes: Annotated[str | None, typer.Option(help="host tier: RAM budget, e.g. 4GiB.")] = None,
    kv_disk_path: Annotated[str | None, typer.Option(help="disk tier: directory (may be shared by engines "
                                                          "on one host).")] = None,
    kv_disk_bytes: Annotated[str | None, typer.Option(help="disk tier: budget, e.g. 50GiB.")] = None,
    kv_redis_url: Annotated[str | None, typer.Option(help="redis tier: e.g. redis://127.0.0.1:6379/0.")] = None,
    role: Annotated[Role | None, typer.Option(
        help="both: prefill and decode here; prefill: hold each prompt's KV for a decode engine to pull; "
             "decode: pull it (docs/disaggregation.md).")] = None,
    kv_transfer_port: Annotated[int | None, typer.Option(
        help="--role prefill or --kv-reuse: TCP port of the KV transfer server (0: the OS picks).")] = None,
    kv_reuse: Annotated[bool | None, typer.Option(
        "--kv-reuse/--no-kv-reuse",
        help="Cross-replica KV reuse over NIXL: when the gateway names another replica holding a prompt's "
             "prefix, READ its blocks directly instead of recomputing or loading them from the KV tiers; "
             "and serve this engine's cached blocks to the other replicas (needs the transfer secret; "
             "docs/disaggregation.md).")] = None,
    kv_transport: Annotated[KVTransport | None, typer.Option(
        help="--role prefill/decode: how KV moves between engines. nixl: NIXL over UCX (what vLLM's "
             "NixlConnector uses; RDMA when the NICs have it); shm: shared memory on one host, TCP otherwise; "
             "tcp: TCP only; auto (default): nixl when it imports and UCX starts, else shm.")] = None,
    kv_transfer_peers: Annotated[str | None, typer.Option(
        help="--role decode: prefill engines this engine may pull KV from, HOST or HOST:PORT, comma-separated. "
             "A decode engine never connects elsewhere, whatever a request names.")] = None,
    kv_transfer_secret: Annotated[str | None, typer.Option(
        envvar="INFERSTACK_KV_TRANSFER_SECRET", show_default=False,
        help="Secret shared by a stack's prefill and decode engines (read from $INFERSTACK_KV_TRANSFER_SECRET; "
             "inferstack up sets it): prefill signs where its KV is held, decode pulls only signed locations.")] = None,
) -> None:
    """Serve a model over an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models),
    with /tokenize, /detokenize, /health, /ready and Prometheus /metrics (vLLM metric names).

    Example: inferstack engine serve --model smollm2-135m --port 8000
    """
    from inferstack.telemetry.logs import configure_logging

    configure_logging(log_format.value)
    profile, model = _emulation(emulate, model, emulate_kv_link_gbps, emulate_count, role)
    if model is None:
        typer.echo("error: --model is required (or --emulate HARDWARE:MODEL)", err=True)
        raise typer.Exit(2)
    if model.startswith("oci://") or trust_policy:
        model, served_model_name = _verified_model(model, served_model_name, trust_policy, allow_unverified)
    if step_log:
        _check_step_log(step_log)
    try:
        config = build_engine_config(
            model, served_model_name=served_model_name, dtype=dtype, kv_cache_dtype=kv_cache_dtype,
            quantization=quantization,
            quant_group_size=quant_group_size, dense_prefill=dense_prefill,
            quant_crossover_rows=quant_crossover_rows, quant_large_kernel=quant_large_kernel, device=device,
            max_model_len=max_model_len,
            kv_cache_bytes=kv_cache_bytes, gpu_memory_utilization=gpu_memory_utilization,
            num_kv_blocks=num_kv_blocks, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            scheduling_policy=scheduling_policy, threads=threads, kv_events_endpoint=kv_events_endpoint,
            step_log=step_log,
            enable_prefix_caching=enable_prefix_caching, kv_tiers=kv_tiers, kv_host_bytes=kv_host_bytes,
            kv_disk_path=kv_disk_path, kv_disk_bytes=kv_disk_bytes, kv_redis_url=kv_redis_url, role=role,
            kv_transfer_port=kv_transfer_port, kv_transfer_secret=kv_transfer_secret, kv_transport=kv_transport,
            kv_reuse=kv_reuse,
            kv_transfer_peers=tuple(kv_transfer_peers.split(",")) if kv_transfer_peers else None,
            grammar_timeout_s=grammar_timeout, grammar_workers=grammar_workers,
            tool_call_parser=tool_call_parser, strict_max_properties=strict_max_properties,
            strict_max_nesting=strict_max_nesting, strict_max_enum_values=strict_max_enum_values)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None

    from inferstack.engine.server import ServeOptions, run

    def load() -> Any:
        from inferstack.engine.async_engine import AsyncEngine

        return AsyncEngine.from_config(config)

    options = ServeOptions(host=host, port=port, ready_file=ready_file, api_key=api_key,
                           drain_timeout=drain_timeout, header_timeout_s=header_timeout, body_timeout_s=body_timeout)
    try:
        if profile is not None:
            from inferstack.engine.executor.emulated_fleet import serve_fleet

            try:
                code = serve_fleet(config, profile, emulate_count, options)
            except ValueError as exc:       # e.g. the model's weights exceed the emulated memory
                typer.echo(f"error: --emulate {emulate}: {exc}", err=True)
                raise typer.Exit(2) from None
        else:
            code = run(load, options)
    except OSError as exc:       # e.g. the port is taken
        typer.echo(f"error: cannot listen on {host}:{port}: {exc.strerror or exc}", err=True)
        raise typer.Exit(1) from None
    raise typer.Exit(code)


@app.command()
def calibrate(
    model: Annotated[str, typer.Option("--model", "-m", help="Model to measure (a catalog name the emulator "
                                                             "knows, e.g. smollm2-135m).")] = "smollm2-135m",
    threads: Annotated[int | None, typer.Option(help="torch threads, as you will serve with.")] = 1,
    out: Annotated[str | None, typer.Option(help="Where to write the fitted profile (default: the cache file "
                                                 "that --emulate cpu:... reads).")] = None,
    samples_out: Annotated[str | None, typer.Option(help="Also write every measured step (batch shape and "
                                                         "seconds) to this JSON-lines file.")] = None,
    served_steps: Annotated[list[str] | None, typer.Option(
        help="Fit on these step logs of serving engines (`engine serve --step-log`; repeat for several) instead "
             "of measuring bare steps: each step priced start to next start, as the fleet served it; logs of "
             "engines that served side by side (overlapping in time) also fit the co-location slowdown.")] = None,
) -> None:
    """Fit the `cpu` hardware profile of the emulator to real engine steps on this machine (a few minutes).

    Example: inferstack engine calibrate --model smollm2-135m
    """

    from inferstack.engine.executor.emulated import calibrate_cpu
    from inferstack.sim.calibrate import fit_served_steps
    from inferstack.sim.hardware import save_hardware_file
    from inferstack.sim.profile import calibration_path

    try:
        if served_steps:
            hw, report = fit_served_steps(model, [Path(p) for p in served_steps])
        else:
            hw, report = calibrate_cpu(model, threads, progress=lambda msg: typer.echo(f"measuring {msg}", err=True),
                                       samples_out=Path(samples_out) if samples_out else None)
    except (KeyError, ValueError) as exc:
        typer.echo(f"error: {exc.args[0] if exc.args else exc}", err=True)
        raise typer.Exit(2) from None
    path = Path(out) if out else calibration_path()
    save_hardware_file(hw, path)
    typer.echo(f"wrote {path}: {report['steps']} steps, median step-time error {report['median_rel_error']:.1%} "
               f"(p90 {report['p90_rel_error']:.1%})" + (f", co-location slowdown {hw.colocation_slowdown:.3f}"
                                                         if report.get("shared_share") else "")
               + (f", host speed drift sigma {hw.speed_jitter:.3f} per {hw.speed_jitter_s:.0f} s"
                  if report.get("speed_jitter") else ""))


def _verified_model(model: str, served_name: str | None, policy_file: str | None,
                    allow_unverified: bool) -> tuple[str, str | None]:
    """oci:// -> pulled local path; with a policy, verified before anything loads (fail closed)."""
    from inferstack.engine.weights.location import resolve_model_path
    from inferstack.modelhub.errors import ModelHubError
    from inferstack.modelhub.policy import load_trust_policy
    from inferstack.modelhub.reference import is_oci, parse_reference
    from inferstack.modelhub.resolve import resolve_model_ref

    if is_oci(model) and policy_file is None and not allow_unverified:
        typer.echo("error: serving an oci:// model needs --trust-policy FILE (or --allow-unverified)", err=True)
        raise typer.Exit(2)
    try:
        policy = load_trust_policy(Path(policy_file)) if policy_file else None
        target = model if is_oci(model) else str(resolve_model_path(model))
        path = resolve_model_ref(target, policy)
    except (ModelHubError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if served_name is None and is_oci(model):
        served_name = parse_reference(model).repository.rsplit("/", 1)[-1]
    return str(path), served_name


# llm-d-inference-sim's command line over the emulated engine (its own module: a flag-for-flag mapping)
from inferstack.cli.inference_sim import inference_sim  # noqa: E402

app.command("inference-sim")(inference_sim)
