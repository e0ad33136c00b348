"""An emulated engine starts and serves without importing torch, transformers or nixl.

Dozens of emulated stacks run in the suite and the labs; importing torch cost each one ~2 s of CPU
(docs/testing.md). The real `inferstack engine serve --emulate` process runs under Python's import
profiler, answers one request, and its import log must name none of those packages."""

from __future__ import annotations

import httpx

from support.procs import inferstack_env, start_inferstack

HEAVY = ("torch", "transformers", "nixl_cu12")


def test_emulated_engine_serves_without_torch() -> None:
    server = start_inferstack(["engine", "serve", "--emulate", "cpu:smollm2-135m"],
                              env=inferstack_env(PYTHONPROFILEIMPORTTIME="1"))
    try:
        r = httpx.post(server.url + "/v1/completions", timeout=30,
                       json={"model": "smollm2-135m", "prompt": "Hello", "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 2
    finally:
        assert server.stop() == 0
    imported = server.imported()
    assert {"inferstack", "uvicorn", "tokenizers"} <= imported       # the profiler saw the serving imports
    assert not imported & set(HEAVY), f"an emulated engine imported {sorted(imported & set(HEAVY))}"
