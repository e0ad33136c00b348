"""inferstack.yaml: schema, file:line errors, cross references, CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from inferstack.config import ConfigError, load_config, parse_config
from support.procs import inferstack_env

GOOD = """\
gateway:
  port: 0
  redis_url: redis://127.0.0.1:6379/0
pools:
  llama:
    endpoints:
      - http://10.0.0.1:8000
      - url: http://10.0.0.2:8000/v1
        kv_events: tcp://10.0.0.2:5557
    routing: gie
    lora_adapters: [sql-lora]
  llama-v2:
    endpoints: [http://10.0.0.3:8000]
    routing: mine
models:
  llama-3-8b:
    aliases: [llama]
    targets:
      - {pool: llama, weight: 90}
      - {pool: llama-v2, model: llama-3-8b-v2, weight: 10}
objectives:
  batch: {priority: -1}
keys:
  - {sha256: "%s", tenant: acme, objective: batch, models: [llama]}
tenants:
  acme: {rpm: 600, tpm: 100000}
routing:
  profiles:
    mine:
      filters: [healthy]
      scorers: {prefix: 2, in-flight: 1}
      picker: power-of-two
""" % ("a" * 64)


def test_good_config_parses():
    cfg = parse_config(GOOD)
    assert cfg.pools["llama"].endpoints[1].url == "http://10.0.0.2:8000"
    assert cfg.models["llama-3-8b"].targets[1].weight == 10
    assert cfg.routing.profiles["mine"].picker == "power-of-two"
    assert cfg.gateway.flow_control.queue_threshold == 5


@pytest.mark.parametrize(
    ("old", "new", "line", "fragment"),
    [
        ("      - http://10.0.0.1:8000", "      - ftp://x", 7, "must be an http:// URL"),
        ("    routing: gie", "    routing: nope", 10, "unknown routing 'nope'"),
        ("      - {pool: llama, weight: 90}", "      - {pool: ghost, weight: 90}", 19, "unknown pool 'ghost'"),
        ("  acme: {rpm: 600, tpm: 100000}", "  acme: {rpm: -5, tpm: 100000}", 26, "greater than or equal to 1"),
        ("      scorers: {prefix: 2, in-flight: 1}", "      scorers: {prefix: 2, magic: 1}", 31,
         "unknown scorer 'magic'"),
        ("  port: 0", "  port: 0\n  bogus: 1", 3, "Extra inputs are not permitted"),
        ("objective: batch", "objective: fast", 24, "unknown objective 'fast'"),
        ("  llama-v2:\n    endpoints: [http://10.0.0.3:8000]\n    routing: mine", "  llama-v2: 5", 12,
         "valid dictionary"),
        ("  batch: {priority: -1}", "  batch: {priority: [}", 22, "invalid YAML"),
    ],
)
def test_errors_name_file_and_line(tmp_path, old, new, line, fragment):
    text = GOOD.replace(old, new, 1)
    assert text != GOOD
    path = tmp_path / "inferstack.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert f"{path}:{line}:" in msg, msg
    assert fragment in msg, msg


def test_duplicate_keys_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"<string>:3: invalid YAML: duplicate key 'pools'"):
        parse_config("pools: {}\nmodels: {}\npools: {}\n")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        parse_config("- a\n- b\n")


def test_cli_validate_and_schema(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("routing: gie", "routing: nope"))
    run = lambda *a: subprocess.run([sys.executable, "-m", "inferstack", *a], capture_output=True, text=True,  # noqa: E731
                                    env=inferstack_env(), timeout=60)
    r = run("config", "validate", str(good))
    assert r.returncode == 0 and "OK" in r.stdout
    r = run("config", "validate", str(bad))
    assert r.returncode == 1 and f"{bad}:10:" in r.stderr
    r = run("config", "schema")
    schema = json.loads(r.stdout)
    assert {"gateway", "pools", "models", "keys", "tenants", "objectives", "routing"} <= set(schema["properties"])


def test_documented_example_is_valid():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    example = doc.split("```yaml\n", 1)[1].split("```", 1)[0]
    cfg = parse_config(example, "docs/configuration.md")
    assert cfg.models["llama-3-8b"].targets[1].model == "llama-3-8b-v2"
