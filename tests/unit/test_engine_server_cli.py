import pytest
from typer.testing import CliRunner

from inferstack.cli.engine import build_engine_config
from inferstack.cli.main import app
from inferstack.sizes import parse_size


@pytest.mark.parametrize(("text", "expected"), [
    ("1GiB", 1 << 30), ("512MiB", 512 << 20), ("2G", 2 * 10**9), ("1.5gib", 3 << 29), ("1073741824", 1 << 30),
    ("64 KiB", 64 << 10), ("1e9", 10**9),
])
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "12XB", "-1GiB", "1..2G", "0"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="byte size"):
        parse_size(text)


def test_build_engine_config_maps_options() -> None:
    cfg = build_engine_config("smollm2-135m", served_model_name="s", dtype=None, threads=3, kv_cache_bytes="1GiB",
                              max_num_seqs=8, enable_prefix_caching=False, scheduling_policy=None)
    assert (cfg.model, cfg.served_model_name, cfg.num_threads, cfg.kv_cache_bytes, cfg.max_num_seqs) == (
        "smollm2-135m", "s", 3, 1 << 30, 8)
    assert cfg.enable_prefix_caching is False and cfg.dtype == "auto" and cfg.scheduling_policy == "fcfs"


def test_cli_reports_bad_values_with_exit_2() -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["engine", "serve", "--model", "x", "--kv-cache-bytes", "12XB"])
    assert res.exit_code == 2 and "--kv-cache-bytes" in res.output
    res = runner.invoke(app, ["engine", "serve", "--model", "x", "--gpu-memory-utilization", "2"])
    assert res.exit_code == 2 and "gpu_memory_utilization" in res.output
    res = runner.invoke(app, ["engine", "serve", "--model", "x", "--dtype", "int3"])
    assert res.exit_code == 2


def test_help_explains_the_server() -> None:
    res = CliRunner().invoke(app, ["engine", "serve", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    for words in ("OpenAI-compatible", "--ready-file", "--port", "--api-key", "--kv-cache-bytes", "--log-format"):
        assert words in res.output


@pytest.mark.parametrize(("args", "message"), [
    (["--emulate", "tpu:llama-3-8b"], "unknown hardware"),
    (["--emulate", "h100:llama-3-70b"], "does not fit"),
    (["--emulate", "h100:llama-3-8b", "--kv-tiers", "host"], "--kv-tiers needs a real engine"),
    (["--model", "smollm2-135m", "--emulate-kv-link-gbps", "25"], "--emulate-kv-link-gbps needs --emulate"),
    (["--emulate", "h100:llama-3-8b", "--emulate-kv-link-gbps", "25"], "needs --role prefill or --role decode"),
])
def test_bad_emulation_settings_exit_2_before_serving(args: list[str], message: str) -> None:
    """Refused with exit 2 and a message naming the fix, before any port is bound or model loaded."""
    res = CliRunner().invoke(app, ["engine", "serve", *args, "--port", "0"])
    assert res.exit_code == 2 and message in res.output, res.output
