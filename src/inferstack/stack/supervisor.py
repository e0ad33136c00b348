"""The supervisor behind `inferstack up`: start engines then the gateway, watch them, restart, stop.

Lifecycle
1. Preflight (port free, model package present, Prometheus / redis-server installed when needed) →
   precise error, nothing started.
2. With the redis KV tier and no `redis_url`: a private memory-only Redis on a free loopback port.
   Engines start in parallel on `--port 0` with `--ready-file`; progress shows each one's last log line.
3. The gateway starts on the user's port with the engines as backends.
4. Watch: every `health_interval_s` each ready child is checked (process alive, `/health` 200). A dead
   or repeatedly unhealthy engine is taken out of the gateway's pool (`PoolHook`), restarted after an
   exponential backoff on its old port, and put back once ready.
5. SIGINT/SIGTERM: gateway first (it drains in-flight requests while engines still answer), then
   engines, then Prometheus and Redis; each gets SIGTERM and a bounded wait, then SIGKILL. A second signal
   kills at once. Children also die with the supervisor itself (see `children.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

import inferstack
from inferstack.config import load_config
from inferstack.config.schema import InferstackConfig
from inferstack.fileio import atomic_write, write_ready_file
from inferstack.stack import plan
from inferstack.stack import prometheus as prom
from inferstack.stack.autoscaler import LocalAutoscaler, ReplicaHooks
from inferstack.stack.children import Child, ChildFailed, ChildSpec, ChildState
from inferstack.stack.gateway_admin import PoolEndpoint, PoolHook
from inferstack.stack.preflight import Servers, preflight
from inferstack.stack.progress import Reporter
from inferstack.stack.settings import RestartPolicy, UpSettings


def backoff_s(failures: int, policy: RestartPolicy) -> float:
    """Delay before restart number `failures` (1-based): initial, 2×, 4×, … capped at the maximum."""
    return min(policy.max_backoff_s, policy.initial_backoff_s * 2 ** max(0, failures - 1))


def _port_of(url: str) -> int:
    return urlsplit(url).port or 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Supervisor:
    def __init__(self, settings: UpSettings, reporter: Reporter | None = None,
                 ready_file: Path | None = None, python: str = sys.executable,
                 config_file: Path | None = None) -> None:
        self.settings = settings
        self.config_file = str(config_file.resolve()) if config_file else None  # the gateway reads it too
        self.reporter = reporter or Reporter()
        self.ready_file = ready_file
        self.python = python
        self.engines: list[Child] = []
        self.gateway: Child | None = None
        self.prometheus: Child | None = None
        self.redis: Child | None = None           # the shared KV tier, when up starts it
        self.dashboard_url: str | None = None
        self.model_name = settings.model
        self.log_dir = Path(settings.log_dir or tempfile.mkdtemp(prefix="inferstack-up-"))
        self._stop = asyncio.Event()
        self._forced = False
        self._restarts: dict[str, asyncio.Task[None]] = {}
        self._client: httpx.AsyncClient | None = None
        self._pool: PoolHook | None = None
        self._dashboard_server: Any = None
        self.autoscaler: LocalAutoscaler | None = None   # `up --autoscale` (stack/autoscaler.py)
        self._autoscaling: asyncio.Task[None] | None = None
        self._replica_index = 0
        self._env = self._child_env()
        # The gateway's admin API (PoolHook) takes only this stack's secret (docs/security.md).
        self._admin_token = secrets.token_urlsafe(32)
        self._gateway_env = {**self._env, self._admin_token_env(): self._admin_token}

    # ---- entry point -------------------------------------------------------------------------------

    async def run(self) -> int:
        """0 after a clean stop, 1 when the stack could not start. PreflightError propagates."""
        servers = preflight(self.settings)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal)
        started = time.monotonic()
        try:
            async with httpx.AsyncClient() as client:
                self._client = client
                if not await self._start_all(servers):
                    return 0 if self._stop.is_set() else 1
                self._announce(time.monotonic() - started)
                self._start_autoscaler()
                await self._watch()
                return 0
        finally:
            await self._shutdown()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def _on_signal(self) -> None:
        if self._stop.is_set():
            self._forced = True
            for child in self._children():
                child.signal(signal.SIGKILL)
        else:
            self.reporter.event("stopping (press Ctrl-C again to kill at once)…")
        self._stop.set()

    def _children(self) -> list[Child]:
        return [c for c in (self.gateway, *self.engines, self.prometheus, self.redis) if c is not None]

    def _admin_token_env(self) -> str:
        """Where the gateway reads its admin token: `gateway.admin_token_env` of the user's config."""
        cfg = load_config(self.config_file) if self.config_file else InferstackConfig()
        return cfg.gateway.admin_token_env

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        src = str(Path(inferstack.__file__).resolve().parents[1])
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHONUNBUFFERED"] = "1"
        # PD engines sign and check KV transfer locations with it (engine/connector/peers.py); one per
        # stack unless the operator shares one across hosts. Restarted engines keep the same one.
        env.setdefault("INFERSTACK_KV_TRANSFER_SECRET", secrets.token_hex(32))
        return env

    # ---- start -------------------------------------------------------------------------------------

    async def _wait_all(self, children: list[Child]) -> bool:
        """Wait until every child is ready; False on stop. Raises ChildFailed for the first failure."""
        assert self._client is not None
        started = time.monotonic()
        waits = [asyncio.create_task(c.wait_ready(self.settings.ready_timeout_s, self._client))
                 for c in children]
        stop = asyncio.create_task(self._stop.wait())
        try:
            pending = set(waits)
            while pending:
                done, pending = await asyncio.wait(pending | {stop}, timeout=0.5,
                                                   return_when=asyncio.FIRST_COMPLETED)
                pending.discard(stop)
                if stop in done:
                    return False
                for task in done:
                    task.result()  # raises ChildFailed
                self.reporter.waiting(children, started)
            return True
        finally:
            self.reporter.done_waiting()
            stop.cancel()
            for task in waits:
                task.cancel()

    async def _start_all(self, servers: Servers) -> bool:
        s = self.settings
        assert self._client is not None
        if servers.redis and not await self._start_redis(servers.redis):
            return False
        redis_url = f"{self.redis.urls[0]}/0" if self.redis else None
        self.engines = ([self._new_replica() for _ in range(self._initial_replicas())] if s.autoscale else
                        [Child(spec, self.log_dir, self._env)
                         for spec in plan.engine_specs(s, self.python, str(self.log_dir), redis_url)])
        what = (f"{len(self.engines)} engine(s) autoscaled by {s.autoscale.policy} between "
                f"{s.autoscale.min_replicas} and {s.autoscale.max_replicas}" if s.autoscale else
                f"{s.replicas} emulated {s.emulate} engine(s)" if s.emulate else
                f"{s.pd.prefill} prefill + {s.pd.decode} decode engine(s) of {s.model}, "
                f"{s.threads_per_engine()} thread(s) each" if s.pd else
                f"{s.replicas} engine replica(s) of {s.model}, {s.threads_per_engine()} thread(s) each")
        self.reporter.step(f"starting {what}")
        try:
            for e in self.engines:
                e.spawn(0)
            if not await self._wait_all(self.engines):
                return False
            n = sum(len(e.urls) for e in self.engines)
            self.reporter.step(f"starting the gateway on {s.host}:{s.port} with {n} endpoint(s)"
                               + (f" in a PD pool (prefill threshold {s.pd.threshold_tokens} tokens)" if s.pd else ""))
            self.gateway = Child(self._gateway_spec(), self.log_dir, self._gateway_env)
            self.gateway.spawn(s.port)
            if not await self._wait_all([self.gateway]):
                return False
        except ChildFailed as e:
            self.reporter.error(str(e))
            return False
        self._pool = PoolHook(self.gateway.urls[0], self._client, token=self._admin_token)
        self.model_name = await self._served_model()
        await self._update_pool()
        self.dashboard_url = await self._dashboard()
        if servers.prometheus and not await self._start_prometheus(servers.prometheus):
            return False
        self._write_state()
        return True

    def _gateway_spec(self) -> ChildSpec:
        """Plain stacks pass the engines as `--backend`s; a PD stack needs endpoint roles and an autoscaled
        one `scale_from_zero`, which only a config file can carry, so the supervisor writes one (the
        user's config plus pool `default`)."""
        if self.settings.pd is None and self.settings.autoscale is None and not self.settings.kv_reuse:
            backends = [u for e in self.engines for u in e.urls]
            return plan.gateway_spec(self.settings, backends, self.config_file, self.python)
        user = None
        if self.config_file:
            import yaml

            user = yaml.safe_load(Path(self.config_file).read_text()) or {}
        if self.settings.kv_reuse:
            ready = [(name, url, e.ready_info) for e in self.engines for name, url in self._named_urls(e)]
            cfg = plan.reuse_gateway_config(ready, user)
            if not any("kv_transfer" in info for _, _, info in ready):
                self.reporter.event("kv_reuse: no engine serves cross-replica reads (NIXL missing? see the "
                                    "engine logs); the gateway still routes on its KV events")
        elif self.settings.autoscale is not None:
            named = [nu for e in self.engines for nu in self._named_urls(e)]
            cfg = plan.autoscaled_gateway_config(self.settings, named, user)
        else:
            endpoints = [(name, url, e.spec.role or "both") for e in self.engines
                         for name, url in self._named_urls(e)]
            cfg = plan.pd_gateway_config(self.settings, endpoints, user)
        path = self.log_dir / "gateway.yaml"
        path.write_text(json.dumps(cfg, indent=1))  # JSON is YAML
        return plan.gateway_spec(self.settings, [], str(path), self.python)

    # ---- autoscaling (stack/autoscaler.py) ---------------------------------------------------------

    def _initial_replicas(self) -> int:
        """`replicas` within the bounds. Zero only when the model's name is known without a replica
        (`plan.known_model_name`): otherwise the first replica tells the gateway, then idles to zero."""
        a = self.settings.autoscale
        assert a is not None
        wanted = self.settings.replicas if "replicas" in self.settings.model_fields_set else a.min_replicas
        least = 0 if plan.known_model_name(self.settings) else 1
        return min(a.max_replicas, max(least, a.min_replicas, wanted))

    def _new_replica(self) -> Child:
        child = Child(plan.replica_spec(self.settings, self._replica_index, self.python), self.log_dir, self._env)
        self._replica_index += 1
        return child

    def _start_autoscaler(self) -> None:
        if self.settings.autoscale is None or self.gateway is None or self._client is None:
            return
        hooks = ReplicaHooks(self.engines, self._new_replica, self._update_pool, self.reporter.event)
        self.autoscaler = LocalAutoscaler(self.settings.autoscale, hooks, self._client, self.gateway.urls[0],
                                          self._admin_token, self.settings.ready_timeout_s,
                                          self.settings.stop_timeout_s)
        self._autoscaling = asyncio.create_task(self.autoscaler.run(self._stop))

    async def _served_model(self) -> str:
        """The name clients must send (an emulated or file-based model has its own), from /v1/models."""
        assert self._client is not None and self.gateway is not None
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, IndexError):
            r = await self._client.get(self.gateway.urls[0] + "/v1/models", timeout=10.0)
            return str(r.json()["data"][0]["id"])
        return plan.known_model_name(self.settings) or self.settings.model

    async def _dashboard(self) -> str | None:
        """The gateway's /dashboard when it serves one; otherwise the supervisor serves it itself."""
        assert self._client is not None and self.gateway is not None
        url = self.gateway.urls[0] + "/dashboard/"
        with contextlib.suppress(httpx.HTTPError):
            if (await self._client.get(url, timeout=5.0)).status_code == 200:
                return url
        from inferstack.stack.dashboard_host import start_dashboard

        self._dashboard_server, own = await start_dashboard(
            self.gateway.urls[0] + "/metrics", self._endpoint_rows, self.settings.host
        )
        return own

    def _endpoint_rows(self) -> list[dict[str, Any]]:
        rows = []
        model = self.model_name
        for e in self.engines:
            for name, url in self._named_urls(e):
                rows.append({"name": name, "url": url, "model": model, "state": str(e.state),
                             "restarts": e.restarts, **({"role": e.spec.role} if e.spec.role else {})})
        return rows

    @staticmethod
    def _named_urls(child: Child) -> list[tuple[str, str]]:
        if len(child.urls) == 1:
            return [(child.spec.name, child.urls[0])]
        return [(f"{child.spec.name}-{i}", u) for i, u in enumerate(child.urls)]

    async def _start_server(self, child: Child, what: str) -> bool:
        """Start a third-party server on a free port and wait until it answers."""
        self.reporter.step(f"starting {what}")
        try:
            child.spawn(free_port())
            return await self._wait_all([child])
        except ChildFailed as e:
            self.reporter.error(str(e))
            return False

    async def _start_redis(self, binary: str) -> bool:
        self.redis = Child(plan.redis_spec(binary), self.log_dir, self._env)
        return await self._start_server(self.redis, "Redis for the shared KV tier")

    async def _start_prometheus(self, binary: str) -> bool:
        targets = self.log_dir / "prometheus" / "targets"
        rules = self.log_dir / "prometheus" / "rules"
        targets.mkdir(parents=True, exist_ok=True)
        prom.install_rules(rules)
        self._write_prometheus_targets()
        config = self.log_dir / "prometheus" / "prometheus.yml"
        config.write_text(prom.render_config(str(targets), str(rules), self.settings.scrape_interval_s))
        self.prometheus = Child(plan.prometheus_spec(binary, str(config), str(self.log_dir / "prometheus" / "data")),
                                self.log_dir, self._env)
        return await self._start_server(self.prometheus, "Prometheus")

    def _write_prometheus_targets(self) -> None:
        if self.gateway is None:
            return
        targets = self.log_dir / "prometheus" / "targets"   # also for a Prometheus the user runs
        targets.mkdir(parents=True, exist_ok=True)
        gw = {"gateway": self.gateway.urls} if self.gateway.state == ChildState.READY else {}
        engines = {name: [url] for e in self.engines if e.state == ChildState.READY
                   for name, url in self._named_urls(e)}
        prom.write_targets(targets, prom.GATEWAY_JOB, prom.target_groups(gw, {"component": "gateway"}))
        prom.write_targets(targets, prom.ENGINE_JOB, prom.target_groups(engines, {"component": "engine"}))

    # ---- announce and state ------------------------------------------------------------------------

    def _announce(self, took_s: float) -> None:
        assert self.gateway is not None
        prom_url = self.prometheus.urls[0] if self.prometheus else None
        endpoints = [(name, url, e.pid) for e in self.engines for name, url in self._named_urls(e)]
        self.reporter.banner(self.gateway.urls[0], self.model_name, self.dashboard_url, endpoints, prom_url,
                             str(self.log_dir), took_s)
        ready = {"urls": self.gateway.urls, "pid": os.getpid(), "dashboard": self.dashboard_url,
                 "prometheus": prom_url, "state_file": str(self.log_dir / "state.json"),
                 "log_dir": str(self.log_dir)}
        write_ready_file(self.ready_file, ready)

    def _write_state(self) -> None:
        state = {
            "pid": os.getpid(),
            "gateway": self.gateway.urls[0] if self.gateway and self.gateway.urls else None,
            "dashboard": self.dashboard_url,
            "prometheus": self.prometheus.urls[0] if self.prometheus and self.prometheus.urls else None,
            "children": [{"name": c.spec.name, "kind": c.spec.kind, "pid": c.pid, "urls": c.urls,
                          "state": str(c.state), "restarts": c.restarts,
                          **({"role": c.spec.role} if c.spec.role else {})} for c in self._children()],
        }
        atomic_write(self.log_dir / "state.json", json.dumps(state, indent=1))

    async def _update_pool(self) -> None:
        if self._pool is None:
            return
        ready = [PoolEndpoint(url=url, name=name, kv_events=e.ready_info.get("kv_events"),
                              kv_transfer=e.ready_info.get("kv_transfer")) for e in self.engines
                 if e.state == ChildState.READY for name, url in self._named_urls(e)]
        await self._pool.set_endpoints(ready)
        self._write_prometheus_targets()
        self._write_state()  # replicas come and go with autoscaling: state.json lists the current ones

    # ---- watch and restart -------------------------------------------------------------------------

    async def _watch(self) -> None:
        assert self._client is not None
        policy = self.settings.restart
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=policy.health_interval_s)
            if self._stop.is_set():
                return
            ready = [c for c in self._children() if c.state == ChildState.READY]
            health = await asyncio.gather(*(c.healthy(self._client, policy.health_timeout_s) for c in ready))
            for child, ok in zip(ready, health, strict=True):
                if not child.alive():
                    code = child.proc.returncode if child.proc else None
                    await self._crashed(child, f"exited with code {code}")
                elif not ok:
                    child.health_misses += 1
                    if child.health_misses >= policy.health_failures:
                        child.signal(signal.SIGKILL)
                        await child.wait_exit(5.0)
                        await self._crashed(child, f"failed {child.health_misses} health checks")
                else:
                    child.health_misses = 0
                    if child.ready_since and time.monotonic() - child.ready_since > policy.stable_after_s:
                        child.failures = 0

    async def _crashed(self, child: Child, why: str) -> None:
        child.state = ChildState.RESTARTING
        child.failures += 1
        child.restarts += 1
        self.reporter.event(f"{child.spec.name} (pid {child.pid}) {why}; last log lines:\n{child.log_tail(8)}")
        if child.spec.kind == "engine":
            await self._update_pool()
        self._write_state()
        self._restarts[child.spec.name] = asyncio.create_task(self._restart(child))

    async def _restart(self, child: Child) -> None:
        assert self._client is not None
        old_urls = list(child.urls)
        port = _port_of(child.urls[0]) if len(child.urls) == 1 else child.port
        while not self._stop.is_set():
            delay = backoff_s(child.failures, self.settings.restart)
            self.reporter.event(f"restarting {child.spec.name} in {delay:.1f}s (restart #{child.restarts})")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=delay)
            if self._stop.is_set():
                return
            child.spawn(port)
            try:
                await child.wait_ready(self.settings.ready_timeout_s, self._client)
            except ChildFailed as e:
                self.reporter.event(str(e))
                child.signal(signal.SIGKILL)
                await child.wait_exit(5.0)
                child.failures += 1
                # An engine may move: the old port may have been taken meanwhile, and the pool learns the
                # new URL. Clients know the gateway's port and engines know Redis's: keep trying those.
                if child.spec.kind == "engine":
                    port = 0
                continue
            self.reporter.event(f"{child.spec.name} is back (pid {child.pid}, {' '.join(child.urls)})")
            await self._update_pool()  # a restarted gateway starts from its static list: resend the pool
            if child.spec.kind == "engine" and child.urls != old_urls and self._pool and not self._pool.supported:
                await self._restart_gateway_with_new_backends()
            self._write_state()
            return

    async def _restart_gateway_with_new_backends(self) -> None:
        """The replica came back on another URL and the gateway cannot be told: restart it (drains first)."""
        assert self.gateway is not None and self._client is not None
        self.reporter.event("restarting the gateway with the new endpoint list")
        port = _port_of(self.gateway.urls[0])
        await self.gateway.stop(self.settings.stop_timeout_s)
        self.gateway = Child(self._gateway_spec(), self.log_dir, self._gateway_env)
        self.gateway.spawn(port)
        try:
            await self.gateway.wait_ready(self.settings.ready_timeout_s, self._client)
        except ChildFailed as e:
            await self._crashed(self.gateway, str(e))

    # ---- stop --------------------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        if self._autoscaling is not None:
            self._autoscaling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._autoscaling
        if self.autoscaler is not None:
            await self.autoscaler.aclose()
        for task in self._restarts.values():
            task.cancel()
        for task in self._restarts.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._dashboard_server is not None:
            self._dashboard_server.should_exit = True
        timeout = 0.5 if self._forced else self.settings.stop_timeout_s
        if self.gateway is not None:
            await self.gateway.stop(timeout)
        await asyncio.gather(*(e.stop(timeout) for e in self.engines))
        for server in (self.prometheus, self.redis):    # after the engines that write to Redis
            if server is not None:
                await server.stop(timeout)
        if self._children():
            self._write_state()
            self.reporter.step("stopped all children")
