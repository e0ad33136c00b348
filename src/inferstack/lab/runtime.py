"""What a lab run can start, with the stack's own code, and how it is stopped.

`LabRun.stack()` runs `inferstack up` (the supervisor that users run) on a free port and yields its
URLs; on exit it sends SIGTERM, waits for the supervisor to stop its children, and checks by PID
that none is left. `LabRun.process()` does the same for one other server (a registry), ready when
its probe says so. `LabRun.bench()` runs `inferstack bench run` and returns its summary;
`LabRun.cli()` runs any other `inferstack` command and times it. Nothing is killed by name, and
every child's log stays under the run's `logs/` folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class LabError(RuntimeError):
    """A lab could not run; the message says which step and where its log is."""


@dataclass(frozen=True)
class Stack:
    gateway: str
    engines: list[str]
    pids: list[int]                 # the supervisor's children, checked gone on exit
    log_dir: Path
    prometheus: str | None = None   # with --with-prometheus
    dashboard: str | None = None    # the live dashboard page


@dataclass(frozen=True)
class StackSpec:
    """One `inferstack up` of `LabRun.stacks`: its arguments and the config file made from ``config``."""

    up_args: tuple[str, ...] = ()
    config: dict[str, Any] | None = None


@dataclass(frozen=True)
class Command:
    rc: int
    stdout: str
    stderr: str
    seconds: float


def http_ok(url: str) -> bool:
    """A readiness probe: ``url`` answers 200."""
    import httpx

    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie is gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    return False


class LabRun:
    def __init__(self, out: Path, quick: bool, echo=print):
        self.out = out
        self.quick = quick
        self.echo = echo
        self._stacks = 0
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def step(self, what: str) -> None:
        self.echo(f"  • {what}")

    def _env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONUNBUFFERED": "1"}

    @contextlib.contextmanager
    def stack(self, *up_args: str, config: dict[str, Any] | None = None, timeout_s: float = 300) -> Iterator[Stack]:
        """`inferstack up UP_ARGS` (plus a config file made from ``config``) until the block ends."""
        with self.stacks(StackSpec(up_args, config), timeout_s=timeout_s) as (stack,):
            yield stack

    @contextlib.contextmanager
    def stacks(self, *specs: StackSpec, timeout_s: float = 300) -> Iterator[list[Stack]]:
        """Several `inferstack up` side by side: all start at once (their starts overlap instead of
        adding up), the block runs once every one is ready, and all stop at its end. For labs that
        compare configurations which one emulated fleet cannot carry (engine flags, PD roles)."""
        started: list[tuple[subprocess.Popen, Path]] = []
        try:
            for spec in specs:
                started.append(self._spawn_stack(spec))
            yield [self._wait_stack(proc, log_dir, timeout_s) for proc, log_dir in started]
        finally:
            # SIGTERM every supervisor first, so the stacks drain and stop together, then reap each
            pids = [(proc, log_dir, self._terminate(proc, log_dir)) for proc, log_dir in started]
            errors = []
            for proc, log_dir, children in pids:
                try:
                    self._reap(proc, log_dir, children)
                except LabError as e:
                    errors.append(e)
            if errors:
                raise errors[0]

    def _spawn_stack(self, spec: StackSpec) -> tuple[subprocess.Popen, Path]:
        self._stacks += 1
        log_dir = self.out / "logs" / f"stack-{self._stacks}"
        if log_dir.exists():  # a previous run's ready file would look like this stack being up
            shutil.rmtree(log_dir)
        log_dir.mkdir(parents=True)
        argv = [sys.executable, "-m", "inferstack", "up", "--port", "0", "--ready-file",
                str(log_dir / "up.ready.json"), "--log-dir", str(log_dir), *spec.up_args]
        if spec.config is not None:
            path = log_dir / "inferstack.yaml"
            path.write_text(yaml.safe_dump(spec.config, sort_keys=False))
            argv += ["--config", str(path)]
        self.step("inferstack up " + " ".join(spec.up_args))
        with (log_dir / "up.log").open("wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self._env(),
                                    start_new_session=True)
        return proc, log_dir

    def _wait_stack(self, proc: subprocess.Popen, log_dir: Path, timeout_s: float) -> Stack:
        ready = log_dir / "up.ready.json"
        deadline = time.monotonic() + timeout_s
        while not (ready.exists() and ready.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (log_dir / "up.log").read_text(errors="replace")[-2000:]
                raise LabError(f"inferstack up did not become ready (log {log_dir / 'up.log'}):\n{tail}")
            time.sleep(0.05)
        state = json.loads((log_dir / "state.json").read_text())
        children = state["children"]
        return Stack(state["gateway"], [c["urls"][0] for c in children if c["kind"] == "engine"],
                     [c["pid"] for c in children if c.get("pid")], log_dir, state.get("prometheus"),
                     state.get("dashboard"))

    @staticmethod
    def _terminate(proc: subprocess.Popen, log_dir: Path) -> list[int]:
        """SIGTERM the supervisor (once: a second signal makes it kill its children at once); returns the
        PIDs of the children it reported."""
        state_file = log_dir / "state.json"
        pids = []
        if state_file.exists():
            pids = [c["pid"] for c in json.loads(state_file.read_text())["children"] if c.get("pid")]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        return pids

    @staticmethod
    def _reap(proc: subprocess.Popen, log_dir: Path, pids: list[int]) -> None:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [p for p in pids if _alive(p)]
        if left:
            raise LabError(f"processes left running after the stack stopped: {left} (log {log_dir})")

    @contextlib.contextmanager
    def process(self, name: str, argv: list[str], ready: Callable[[], bool],
                timeout_s: float = 30) -> Iterator[int]:
        """Run ``argv`` (its own session, log in logs/NAME.log) until the block ends; yields its PID once
        ``ready()`` is true. On exit: SIGTERM, then SIGKILL after 10 s, and a check that it is gone."""
        log_path = self.out / "logs" / f"{name}.log"
        self.step(f"start {name}")
        with log_path.open("wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self._env(),
                                    start_new_session=True)
        try:
            deadline = time.monotonic() + timeout_s
            while not ready():
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = log_path.read_text(errors="replace")[-2000:]
                    raise LabError(f"{name} did not become ready (log {log_path}):\n{tail}")
                time.sleep(0.05)
            yield proc.pid
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
            if _alive(proc.pid):
                raise LabError(f"{name} (pid {proc.pid}) still running after it was stopped")

    @contextlib.contextmanager
    def server(self, name: str, *args: str, timeout_s: float = 120) -> Iterator[list[str]]:
        """`inferstack ARGS --port 0 --ready-file F` via `process()`; yields the URLs it reports."""
        ready = self.out / "logs" / f"{name}.ready.json"
        ready.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "inferstack", *args, "--port", "0", "--ready-file", str(ready)]
        with self.process(name, argv, lambda: ready.exists() and bool(ready.read_text().strip()), timeout_s):
            yield json.loads(ready.read_text().splitlines()[0])["urls"]

    def cli(self, *args: str, expect: int | None = 0) -> Command:
        """`inferstack ARGS` in its own process, timed; a LabError unless it exits ``expect`` (None: any)."""
        self.step("inferstack " + " ".join(args))
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "inferstack", *args], capture_output=True, text=True,
                              env=self._env(), timeout=300)
        took = time.perf_counter() - t0
        if expect is not None and done.returncode != expect:
            raise LabError(f"inferstack {' '.join(args)} exited {done.returncode}, expected {expect}:\n"
                           f"{done.stdout[-1500:]}{done.stderr[-1500:]}")
        return Command(done.returncode, done.stdout, done.stderr, took)

    @staticmethod
    def together(*calls: Callable[[], T]) -> list[T]:
        """Run ``calls`` at once (benches against side-by-side stacks) and return their results in order."""
        with ThreadPoolExecutor(max(1, len(calls))) as pool:
            return [f.result() for f in [pool.submit(c) for c in calls]]

    def bench(self, target: str, workload: str, name: str, *, rate: float | None = None,
              duration: float = 10.0, extra: tuple[str, ...] = (), drain_s: float | None = None) -> dict[str, Any]:
        """`inferstack bench run` against ``target``; returns results.json's summary. Requests still running
        ``drain_s`` after sending stops (default: the duration, at least 10 s) count as cancelled."""
        out = self.out / "runs" / name
        if out.exists():  # never read a previous run's results
            shutil.rmtree(out)
        argv = [sys.executable, "-m", "inferstack", "bench", "run", "--target", target, "--workload", workload,
                "--duration", str(duration), "--drain-timeout", str(drain_s or max(10.0, duration)), "--out", str(out),
                "--no-progress", "--no-plots", *extra]
        if rate is not None:
            argv += ["--rate", str(rate)]
        self.step(f"inferstack bench: {name} ({workload}, {duration:g}s" + (f" at {rate:g}/s)" if rate else ")"))
        done = subprocess.run(argv, capture_output=True, text=True, env=self._env())
        results = out / "results.json"
        if not results.exists():
            raise LabError(f"bench {name} failed (exit {done.returncode}):\n{done.stdout[-1500:]}{done.stderr[-1500:]}")
        return json.loads(results.read_text())["summary"]
