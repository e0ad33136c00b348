"""`pools.X.kubernetes` in inferstack.yaml: accepted shapes and file:line errors."""

from __future__ import annotations

import pytest

from inferstack.config import ConfigError, parse_config


def _pool(body: str) -> str:
    return "pools:\n  llama:\n" + body


def test_selector_and_inference_pool_forms_load():
    cfg = parse_config(_pool("    kubernetes:\n      namespace: serving\n      selector: {app: vllm}\n"
                             "      target_port: 8000\n    pd: {enabled: true}\n"))
    k = cfg.pools["llama"].kubernetes
    assert ((k.namespace, k.selector, k.target_port, cfg.pools["llama"].endpoints)
            == ("serving", {"app": "vllm"}, 8000, []))
    cfg = parse_config(_pool("    kubernetes: {inference_pool: llama-pool}\n"))
    assert cfg.pools["llama"].kubernetes.inference_pool == "llama-pool"


@pytest.mark.parametrize(("body", "line", "message"), [
    ("    models: [m]\n", 3, "pools.llama: Value error, a pool needs `endpoints` (at least one URL) or `kubernetes`"),
    ("    endpoints: [http://a:1]\n    kubernetes: {inference_pool: p}\n", 3,
     "pools.llama: Value error, set either `endpoints` or `kubernetes`, not both"),
    ("    kubernetes:\n      selector: {app: x}\n", 4,
     "pools.llama.kubernetes: Value error, `selector` needs `target_port`"),
    ("    kubernetes:\n      selector: {app: x}\n      target_port: 8000\n      inference_pool: p\n", 4,
     "pools.llama.kubernetes: Value error, set either `selector` or `inference_pool`"),
    ("    kubernetes:\n      selector: {app: 5}\n      target_port: 8000\n", 4,
     "pools.llama.kubernetes.selector.app: Input should be a valid string"),
    ("    kubernetes:\n      selector: {'bad key!': x}\n      target_port: 8000\n", 4,
     "pools.llama.kubernetes.selector: Value error, 'bad key!' is not a valid label key"),
    ("    kubernetes:\n      selector: {app: x}\n      target_port: 70000\n", 5,
     "pools.llama.kubernetes.target_port: Input should be less than or equal to 65535"),
    ("    kubernetes:\n      inference_pool: p\n      namespace: Bad_NS\n", 5,
     "pools.llama.kubernetes.namespace: String should match pattern"),
])
def test_errors_name_file_and_line(body, line, message):
    with pytest.raises(ConfigError) as exc:
        parse_config(_pool(body), "inferstack.yaml")
    text = str(exc.value)
    assert text.startswith(f"inferstack.yaml:{line}: {message}"), text
