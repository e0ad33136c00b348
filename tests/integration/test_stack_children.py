"""Supervised children are real processes: ready file, health, bounded stop, and no orphans even when
the supervisor is SIGKILLed (PR_SET_PDEATHSIG)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from tests.support.procs import inferstack_env

from inferstack.stack.children import Child, ChildFailed, ChildSpec, ChildState

# A minimal server honouring the server start-up contract (docs/architecture.md)
# (--port, --ready-file, /health, SIGTERM).
SERVER = textwrap.dedent("""
    import json, signal, sys, time
    from http.server import BaseHTTPRequestHandler, HTTPServer
    args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
    if args.get("--mode") == "crash":
        print("boom: cannot load model"); sys.exit(3)
    if args.get("--mode") == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
        def log_message(self, *a): pass
    srv = HTTPServer(("127.0.0.1", int(args["--port"])), H)
    url = f"http://127.0.0.1:{srv.server_port}"
    open(args["--ready-file"], "w").write(json.dumps({"urls": [url], "pid": __import__("os").getpid()}) + "\\n")
    print("serving", url, flush=True)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)) if args.get("--mode") != "ignore-term" else None
    srv.serve_forever()
""")


def spec(tmp_path: Path, mode: str = "ok") -> ChildSpec:
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    return ChildSpec(name="svc", kind="engine", argv=(sys.executable, str(script), "--mode", mode),
                     port_args=lambda p: ["--port", str(p)])


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


def test_ready_healthy_and_clean_stop(tmp_path: Path) -> None:
    asyncio.run(_test_ready_healthy_and_clean_stop(tmp_path))


async def _test_ready_healthy_and_clean_stop(tmp_path: Path) -> None:
    child = Child(spec(tmp_path), tmp_path, dict(os.environ))
    child.spawn(0)
    async with httpx.AsyncClient() as client:
        urls = await child.wait_ready(20, client)
        assert urls[0].startswith("http://127.0.0.1:") and child.state == ChildState.READY
        assert await child.healthy(client)
    # its own session: Ctrl-C in a terminal reaches only the supervisor
    assert os.getsid(child.pid) == child.pid
    await child.stop(5)
    assert child.proc.returncode == 0 and child.state == ChildState.STOPPED


def test_child_that_ignores_sigterm_is_killed_after_the_bounded_wait(tmp_path: Path) -> None:
    asyncio.run(_test_child_that_ignores_sigterm_is_killed_after_the_bounded_wait(tmp_path))


async def _test_child_that_ignores_sigterm_is_killed_after_the_bounded_wait(tmp_path: Path) -> None:
    child = Child(spec(tmp_path, "ignore-term"), tmp_path, dict(os.environ))
    child.spawn(0)
    async with httpx.AsyncClient() as client:
        await child.wait_ready(20, client)
    t0 = time.monotonic()
    await child.stop(1.0)
    assert child.proc.returncode == -signal.SIGKILL and time.monotonic() - t0 < 5


def test_crash_while_starting_reports_the_log_tail(tmp_path: Path) -> None:
    asyncio.run(_test_crash_while_starting_reports_the_log_tail(tmp_path))


async def _test_crash_while_starting_reports_the_log_tail(tmp_path: Path) -> None:
    child = Child(spec(tmp_path, "crash"), tmp_path, dict(os.environ))
    child.spawn(0)
    async with httpx.AsyncClient() as client:
        with pytest.raises(ChildFailed, match=r"(?s)exited with code 3.*boom: cannot load model"):
            await child.wait_ready(20, client)


def test_children_die_when_the_supervisor_is_sigkilled(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import asyncio, os, sys
        from pathlib import Path
        from inferstack.stack.children import Child, ChildSpec
        spec = ChildSpec(name="svc", kind="engine", argv=(sys.executable, {str(tmp_path / 'server.py')!r}),
                         port_args=lambda p: ["--port", str(p)])
        children = [Child(spec.__class__(**{{**spec.__dict__, "name": f"svc{{i}}"}}), Path({str(tmp_path)!r}),
                          dict(os.environ)) for i in range(2)]
        for c in children:
            c.spawn(0)
        print(" ".join(str(c.pid) for c in children), flush=True)
        asyncio.run(asyncio.sleep(600))
    """))
    (tmp_path / "server.py").write_text(SERVER)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env=inferstack_env())
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2
        deadline = time.monotonic() + 20
        while not all((tmp_path / f"svc{i}.ready.json").exists() for i in range(2)):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert not any(gone(p) for p in pids)
        parent.send_signal(signal.SIGKILL)
        parent.wait(5)
        deadline = time.monotonic() + 10
        while not all(gone(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(gone(p) for p in pids), "children outlived a SIGKILLed supervisor"
    finally:
        if parent.poll() is None:
            parent.kill()
