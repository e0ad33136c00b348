"""The live dashboard: a Starlette router any server mounts, e.g. `Mount("/dashboard", dashboard_app(p))`.

`p` is a *state provider*: an async callable returning the current raw metrics as a JSON-able dict

    {"gateway":   {"metrics": "<Prometheus text of the gateway's own /metrics>"} | None,
     "endpoints": [{"name": "engine-0", "url": "http://127.0.0.1:41234", "model": "smollm2-135m",
                    "healthy": true, "state": "ready", "restarts": 0,
                    "metrics": "<Prometheus text of its /metrics>" | None}, ...]}

While the page is open the router samples the provider once per `interval_s` (a background task that
stops after `idle_stop_s` without viewers), keeps a ring buffer (`DashboardHistory`) and serves:
`/` the page, `/static/*` its assets (shipped in the package, no CDN), `/api/state[?since=T]` the
chart points. `scraping_state_provider` builds a provider that fetches `/metrics` over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route, Router
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp

from inferstack.telemetry.dashboard_state import DashboardHistory

StateProvider = Callable[[], Awaitable[dict[str, Any]]]
EndpointLister = Callable[[], Sequence[dict[str, Any]]]

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "dashboard"


class DashboardSampler:
    """Polls a state provider on a fixed tick while someone is watching."""

    def __init__(
        self,
        provider: StateProvider,
        interval_s: float = 1.0,
        window_s: float = 10.0,
        history_s: float = 300.0,
        idle_stop_s: float = 300.0,
    ) -> None:
        self.provider = provider
        self.interval_s = interval_s
        self.idle_stop_s = idle_stop_s
        self.history = DashboardHistory(window_s=window_s, history_s=history_s)
        self._task: asyncio.Task[None] | None = None
        self._last_view = 0.0
        self.last_error: str | None = None

    async def tick(self) -> None:
        try:
            state = await asyncio.wait_for(self.provider(), timeout=max(0.5, self.interval_s * 2))
        except Exception as e:  # a broken provider must not kill the page; show why instead
            self.last_error = f"state provider failed: {type(e).__name__}: {e}"
            return
        self.last_error = None
        self.history.ingest(state, time.time())

    def touch(self) -> None:
        """Called on every page poll: starts sampling (again) on the caller's event loop."""
        self._last_view = time.monotonic()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="dashboard-sampler")

    async def _loop(self) -> None:
        next_tick = time.monotonic() + self.interval_s
        while time.monotonic() - self._last_view < self.idle_stop_s:
            await asyncio.sleep(max(0.0, next_tick - time.monotonic()))
            await self.tick()
            next_tick = max(next_tick + self.interval_s, time.monotonic())  # no catch-up bursts

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def dashboard_app(
    state_provider: StateProvider,
    *,
    interval_s: float = 1.0,
    window_s: float = 10.0,
    history_s: float = 300.0,
    title: str = "inferstack",
) -> Router:
    """A router serving the dashboard; mount it anywhere (relative links follow the mount point)."""
    sampler = DashboardSampler(state_provider, interval_s=interval_s, window_s=window_s, history_s=history_s)
    page = (ASSETS / "index.html").read_text()

    async def index(request: Request) -> Response:
        base = request.scope.get("root_path", "").rstrip("/") + "/"
        sampler.touch()
        html = page.replace("{{base}}", base).replace("{{title}}", title)
        return HTMLResponse(html, headers={"cache-control": "no-store"})

    async def state(request: Request) -> Response:
        since_raw = request.query_params.get("since")
        try:
            since = float(since_raw) if since_raw else None
        except ValueError:
            return JSONResponse(
                {"error": {"message": f"since must be a number (seconds since epoch), got {since_raw!r}",
                           "type": "invalid_request_error", "param": "since", "code": None}},
                status_code=400,
            )
        if sampler.history.render()["t"] is None:
            await sampler.tick()  # first viewer: answer with data, not an empty page
        sampler.touch()
        body = sampler.history.render(since)
        body["interval_s"] = sampler.interval_s
        body["provider_error"] = sampler.last_error
        return JSONResponse(body, headers={"cache-control": "no-store"})

    router = Router(
        routes=[
            Route("/", index),
            Route("/api/state", state),
            Mount("/static", app=StaticFiles(directory=ASSETS), name="dashboard-static"),
        ]
    )
    router.sampler = sampler  # type: ignore[attr-defined]  # lets the owner close it on shutdown
    return router


def dashboard_asgi(prefix: str, state_provider: StateProvider, **options: Any) -> ASGIApp:
    """An ASGI app serving the dashboard under `prefix` (e.g. "/dashboard"), for servers that dispatch
    paths themselves: hand it every request whose path is `prefix` or starts with `prefix + "/"`."""
    return Starlette(routes=[Mount(prefix, app=dashboard_app(state_provider, **options))])


def scraping_state_provider(
    gateway_metrics: str | Callable[[], str] | None,
    endpoints: EndpointLister,
    timeout_s: float = 0.8,
) -> StateProvider:
    """A provider that reads the gateway's metrics and GETs every endpoint's `/metrics` concurrently.

    `gateway_metrics` is the gateway's `/metrics` URL, or (inside the gateway) a callable returning its
    exposition text, e.g. `lambda: generate_latest(registry).decode()`. `endpoints()` returns dicts with
    at least `url` (base URL) and optionally `name`, `model`, `state` (e.g. "ready", "restarting") and
    `restarts`; an endpoint whose scrape fails is unhealthy.
    """
    clients: list[httpx.AsyncClient] = []   # made on first use, inside the server's event loop
    gateway_url = gateway_metrics if isinstance(gateway_metrics, str) else None

    async def fetch(url: str) -> str | None:
        if not clients:
            clients.append(httpx.AsyncClient(timeout=timeout_s))
        try:
            r = await clients[0].get(url)
        except httpx.HTTPError:
            return None
        return r.text if r.status_code == 200 else None

    async def provider() -> dict[str, Any]:
        eps = [dict(e) for e in endpoints()]
        urls = [f"{e['url'].rstrip('/')}/metrics" for e in eps]
        if gateway_url:
            urls.append(gateway_url)
        texts = await asyncio.gather(*(fetch(u) for u in urls))
        for e, text in zip(eps, texts, strict=False):
            e.setdefault("name", e["url"])
            e["metrics"] = text
            e["healthy"] = text is not None and e.get("state", "ready") == "ready"
            if text is None and e.get("state", "ready") == "ready":
                e["state"] = "unreachable"
        if gateway_url:
            gateway = {"metrics": texts[-1]}
        elif gateway_metrics is not None and not isinstance(gateway_metrics, str):
            gateway = {"metrics": gateway_metrics()}
        else:
            gateway = None
        return {"gateway": gateway, "endpoints": eps}

    return provider
