"""serve(): bind first, /health at once, /ready after the load, ready file with the real port, drain on
stop, and a client that disconnects aborts its engine request — over real sockets, with a scripted
fake engine (the real-engine versions are in tests/integration/test_engine_server_*.py)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from engine_server_fake import FakeEngine

from inferstack.engine.server import ServeOptions, serve


class Harness:
    """Runs serve() on its own thread and event loop."""

    def __init__(self, tmp_path: Path, engine: FakeEngine) -> None:
        self.engine = engine
        self.ready_file = tmp_path / "ready.json"
        self.release = threading.Event()
        self.listening = threading.Event()
        self.url = ""
        self.code: int | None = None
        self.loop = asyncio.new_event_loop()
        self.stop_event: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _factory(self) -> FakeEngine:
        self.release.wait(10)
        return self.engine

    def _on_listening(self, url: str) -> None:
        self.url = url
        self.listening.set()

    def _run(self) -> None:
        async def main() -> int:
            self.stop_event = asyncio.Event()
            return await serve(self._factory, ServeOptions(port=0, ready_file=str(self.ready_file), drain_timeout=5),
                               stop=self.stop_event, on_listening=self._on_listening)

        self.code = self.loop.run_until_complete(main())

    def __enter__(self) -> Harness:
        self.thread.start()
        assert self.listening.wait(10)
        return self

    def stop(self) -> None:
        self.release.set()
        self.loop.call_soon_threadsafe(self.stop_event.set)  # type: ignore[union-attr]

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.thread.join(20)

    def wait_ready(self, timeout: float = 10) -> dict:
        self.release.set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready_file.exists():
                return json.loads(self.ready_file.read_text())
            time.sleep(0.02)
        raise TimeoutError("no ready file")


def wait_for(cond, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)
    return cond()


def test_health_before_ready_then_ready_file(tmp_path: Path) -> None:
    with Harness(tmp_path, FakeEngine()) as h:
        assert h.url.startswith("http://127.0.0.1:") and not h.url.endswith(":0")
        assert httpx.get(f"{h.url}/health").status_code == 200
        assert httpx.get(f"{h.url}/ready").status_code == 503
        assert not h.ready_file.exists()
        ready = h.wait_ready()
        assert ready["urls"] == [h.url] and isinstance(ready["pid"], int)
        assert httpx.get(f"{h.url}/ready").status_code == 200
    assert h.code == 0


def test_stop_drains_in_flight_request(tmp_path: Path) -> None:
    engine = FakeEngine(step_s=0.02, reply="y" * 30)
    with Harness(tmp_path, engine) as h:
        h.wait_ready()
        result: dict = {}

        def call() -> None:
            result["resp"] = httpx.post(f"{h.url}/v1/completions", json={"prompt": "a", "max_tokens": 30}, timeout=10)

        t = threading.Thread(target=call)
        t.start()
        assert wait_for(lambda: engine.running)
        h.stop()
        t.join(10)
        h.thread.join(10)
    assert result["resp"].status_code == 200 and result["resp"].json()["choices"][0]["text"] == "y" * 30
    assert h.code == 0 and not engine.aborted


def test_disconnect_aborts_engine_request(tmp_path: Path) -> None:
    engine = FakeEngine(step_s=0.05, reply="x" * 1000)
    with Harness(tmp_path, engine) as h:
        h.wait_ready()
        body = {"prompt": "hi", "max_tokens": 500, "stream": True}
        with httpx.Client() as client, client.stream("POST", f"{h.url}/v1/completions", json=body) as resp:
            for _ in resp.iter_bytes():
                break       # the client leaves after the first chunk
        assert wait_for(lambda: len(engine.aborted) == 1 and not engine.running)

        # non-streaming: the client gives up long before the 500 tokens are done
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{h.url}/v1/completions", json={**body, "stream": False}, timeout=0.3)
        assert wait_for(lambda: len(engine.aborted) == 2 and not engine.running)
