"""A Kubernetes API for discovery tests: kmock's KubernetesEmulator over real HTTP, plus the two
things it lacks and real API servers do: a watch that expires with 410 Gone (an ERROR event carrying
a Status, as kube-apiserver sends when the watch cache compacted the version), and RBAC denial (403).

Objects change through the emulator's HTTP API (POST/PATCH/DELETE), so watchers see real events.
`KubeApi` can run in the test's event loop (`async with`) or on a background thread (`threaded()`,
for a gateway in another process). The API can go down and come back on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import httpx
import kmock

POD_RESOURCE = kmock.resource("v1/pods")
POOL_RESOURCE = kmock.resource("inference.networking.k8s.io/v1/inferencepools")
LEASE_RESOURCE = kmock.resource("coordination.k8s.io/v1/leases")


def pod(name: str, ip: str, ready: bool = True, labels: dict[str, str] | None = None,
        namespace: str = "ns") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels or {"app": "m"}},
            "spec": {"containers": [{"name": "engine", "image": "engine"}]},
            "status": {"phase": "Running", "podIP": ip,
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def inference_pool(name: str, labels: dict[str, str], ports: list[int], namespace: str = "ns") -> dict[str, Any]:
    return {"apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"selector": {"matchLabels": labels}, "targetPorts": [{"number": p} for p in ports],
                     "endpointPickerRef": {"name": "epp", "port": {"number": 9002}}}}


class Deployments:
    """The `scale` subresource of Deployments (kmock has none), as kube-apiserver serves it: GET the
    autoscaling/v1 Scale, PUT it back with the resourceVersion it was read at (else 409 Conflict).
    Failures to inject: ``forbidden`` (403, RBAC), ``conflicts`` (the next N writes lose a race with
    another writer), ``unavailable`` (the next N calls get 503). ``writes`` records (name, replicas)."""

    def __init__(self) -> None:
        self.replicas: dict[str, int] = {}
        self.versions: dict[str, int] = {}
        self.forbidden = False
        self.conflicts = 0
        self.unavailable = 0
        self.writes: list[tuple[str, int]] = []

    def add(self, name: str, replicas: int) -> None:
        self.replicas[name], self.versions[name] = replicas, 1

    def _scale(self, name: str, namespace: str) -> dict[str, Any]:
        return {"apiVersion": "autoscaling/v1", "kind": "Scale",
                "metadata": {"name": name, "namespace": namespace, "resourceVersion": str(self.versions[name])},
                "spec": {"replicas": self.replicas[name]},
                "status": {"replicas": self.replicas[name], "selector": "app=m"}}

    def __call__(self, req: Any) -> Any:
        verb = "get" if req.method == kmock.method.GET else "update"
        if self.unavailable:
            self.unavailable -= 1
            return kmock.KubernetesError(status=503, reason="ServiceUnavailable", message="etcdserver: leader changed")
        if self.forbidden:
            return kmock.KubernetesError(
                status=403, reason="Forbidden",
                message=f'deployments.apps "{req.name}" is forbidden: User "system:serviceaccount:ns:epp" cannot '
                        f'{verb} resource "deployments/scale" in API group "apps" in the namespace "{req.namespace}"')
        if req.name not in self.replicas:
            return kmock.KubernetesError(status=404, reason="NotFound",
                                         message=f'deployments.apps "{req.name}" not found')
        if verb == "get":
            return self._scale(req.name, req.namespace)
        if self.conflicts:   # another writer got there first
            self.conflicts -= 1
            self.versions[req.name] += 1
        if req.data["metadata"].get("resourceVersion") != str(self.versions[req.name]):
            return kmock.KubernetesError(
                status=409, reason="Conflict",
                message=f'Operation cannot be fulfilled on deployments.apps "{req.name}": the object has been '
                        "modified; please apply your changes to the latest version and try again")
        self.replicas[req.name] = int(req.data["spec"]["replicas"])
        self.versions[req.name] += 1
        self.writes.append((req.name, self.replicas[req.name]))
        return self._scale(req.name, req.namespace)


class KubeApi:
    """The emulator, its HTTP server (restartable on its port) and a side server for the test's writes."""

    def __init__(self) -> None:
        self.deployments = Deployments()
        self.forbidden = False
        self.leases: dict[tuple[str, str], dict[str, Any]] = {}  # kmock keeps no resourceVersion: see _lease
        self.gone_once = False  # answer the next watch request with HTTP 410 (a version too old to resume)
        self._ends: list[asyncio.Future[str]] = []  # one per open watch: resolve to end it
        self.emulator: kmock.KubernetesEmulator | None = None
        self._server: kmock.Server | None = None
        self._side: kmock.Server | None = None
        self.port = 0
        self._stack = contextlib.AsyncExitStack()

    # ---- lifecycle --------------------------------------------------------------------------------
    async def __aenter__(self) -> KubeApi:
        self.emulator = await self._stack.enter_async_context(kmock.KubernetesEmulator())
        self.emulator.resources["v1/pods"] = kmock.ResourceInfo(kind="Pod", namespaced=True)
        self.emulator.resources["inference.networking.k8s.io/v1/inferencepools"] = kmock.ResourceInfo(
            kind="InferencePool", namespaced=True)
        self.emulator.resources["coordination.k8s.io/v1/leases"] = kmock.ResourceInfo(kind="Lease", namespaced=True)
        emu = self.emulator
        emu[lambda req: req.resource == LEASE_RESOURCE and not self.forbidden] << self._lease
        emu[lambda req: self.forbidden] << (lambda req: kmock.KubernetesError(
            status=403, reason="Forbidden",
            message=f'pods is forbidden: User "system:serviceaccount:ns:gw" '
                    f'cannot {"watch" if req.params.get("watch") else "list"} resource '
                    f'"pods" in API group "" in the namespace "ns"'))
        emu[lambda req: self.gone_once and req.params.get("watch") == "true"] << self._gone
        emu[lambda req: req.subresource == "scale"] << self.deployments
        emu[kmock.action.WATCH] << self._watch
        self._side = await self._stack.enter_async_context(kmock.Server(emu))
        await self.up()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.down()
        await self._stack.aclose()

    async def up(self) -> None:
        self._server = kmock.Server(self.emulator, port=self.port or None)
        await self._server.__aenter__()
        self.port = self._server.url.port

    async def down(self) -> None:
        """Stop serving on the watched port (the API server is unreachable; open watches break)."""
        if self._server is not None:
            server, self._server = self._server, None
            self._end_watches("drop")
            await server.__aexit__(None, None, None)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kubeconfig(self, path: Path, namespace: str = "ns") -> Path:
        path.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: t\n"
            f"clusters: [{{name: t, cluster: {{server: '{self.url}'}}}}]\n"
            f"contexts: [{{name: t, context: {{cluster: t, user: t, namespace: {namespace}}}}}]\n"
            "users: [{name: t, user: {token: test}}]\n")
        return path

    # ---- leases with optimistic concurrency ----------------------------------------------------------
    def _lease(self, request: Any) -> Any:
        """Leases as the API server keeps them: create fails with 409 when one exists, and a write that
        carries a resourceVersion other than the current one fails with 409 (kmock has neither)."""
        key = (request.namespace, request.name or (request.data or {}).get("metadata", {}).get("name"))
        current = self.leases.get(key)
        if request.action == kmock.action.FETCH:
            return current if current is not None else kmock.KubernetesError(404, "NotFound", "lease not found")
        if request.action == kmock.action.CREATE:
            if current is not None:
                return kmock.KubernetesError(409, "AlreadyExists", f"leases {key[1]!r} already exists")
            obj = dict(request.data)
            obj["metadata"] = {**obj.get("metadata", {}), "namespace": key[0], "resourceVersion": "1"}
            self.leases[key] = obj
            return obj
        if request.action == kmock.action.UPDATE:
            if current is None:
                return kmock.KubernetesError(404, "NotFound", "lease not found")
            version = (request.data or {}).get("metadata", {}).get("resourceVersion")
            if version is not None and version != current["metadata"]["resourceVersion"]:
                return kmock.KubernetesError(409, "Conflict", "the object has been modified; please apply your "
                                             "changes to the latest version and try again")
            current["spec"] = {**current.get("spec", {}), **(request.data or {}).get("spec", {})}
            current["metadata"]["resourceVersion"] = str(int(current["metadata"]["resourceVersion"]) + 1)
            return current
        return kmock.KubernetesError(405, "MethodNotAllowed", f"{request.action} on leases")

    # ---- watch with expiry --------------------------------------------------------------------------
    async def _watch(self, request: Any) -> AsyncIterator[Any]:
        """The emulator's own watch stream, ended by `expire_watches()` with a 410 ERROR event (as
        kube-apiserver does), or cut by `down()` (so the server can close at once)."""
        end: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        if self._server is None:
            end.set_result("drop")  # a watch that raced `down()`: cut it too
        self._ends.append(end)
        inner = self.emulator._serve_watch(request).__aiter__()
        nxt: asyncio.Future | None = None
        try:
            while True:
                nxt = asyncio.ensure_future(inner.__anext__())
                await asyncio.wait({nxt, end}, return_when=asyncio.FIRST_COMPLETED)
                if not nxt.done():
                    if end.result() == "expire":
                        yield {"type": "ERROR", "object": {
                            "apiVersion": "v1", "kind": "Status", "status": "Failure", "code": 410,
                            "reason": "Expired", "message": "too old resource version: 1 (2)"}}
                    return
                yield nxt.result()
        finally:
            if nxt is not None and not nxt.done():
                nxt.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await nxt
            self._ends.remove(end)
            await inner.aclose()

    def _gone(self, request: Any) -> Exception:
        self.gone_once = False
        return kmock.KubernetesError(status=410, reason="Expired", message="too old resource version: 1 (2)")

    def end_watches(self) -> int:
        """End open watches normally, as the API server does after `timeoutSeconds`."""
        return self._end_watches("timeout")

    def _end_watches(self, how: str) -> int:
        live = [f for f in self._ends if not f.done()]
        for f in live:
            f.set_result(how)
        return len(live)

    async def watched(self, resource: kmock.resource = POD_RESOURCE, timeout: float = 5.0) -> None:
        """Wait until a watch on ``resource`` is subscribed to changes. kmock replays the current objects
        to a new watch and only then subscribes, so a change in between would be lost (a real API
        server resumes from the list's resourceVersion instead): tests change objects after this."""
        bus = self.emulator._buses[resource]
        deadline = asyncio.get_running_loop().time() + timeout
        while bus.consumer_count == 0:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"no watch on {resource} within {timeout}s")
            await asyncio.sleep(0.005)

    def expire_watches(self) -> int:
        return self._end_watches("expire")

    # ---- writes (through the side server, so they work while the watched port is down) ---------------
    def _base(self) -> str:
        return str(self._side.url).rstrip("/")

    async def create(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        path = (f"/api/v1/namespaces/{meta['namespace']}/pods" if obj["kind"] == "Pod" else
                f"/apis/inference.networking.k8s.io/v1/namespaces/{meta['namespace']}/inferencepools")
        async with httpx.AsyncClient(base_url=self._base()) as h:
            (await h.post(path, json=obj)).raise_for_status()

    async def patch(self, kind: str, name: str, patch: dict[str, Any], namespace: str = "ns") -> None:
        async with httpx.AsyncClient(base_url=self._base()) as h:
            r = await h.patch(self._path(kind, name, namespace), json=patch,
                              headers={"content-type": "application/merge-patch+json"})
            r.raise_for_status()

    async def delete(self, kind: str, name: str, namespace: str = "ns") -> None:
        async with httpx.AsyncClient(base_url=self._base()) as h:
            (await h.delete(self._path(kind, name, namespace))).raise_for_status()

    @staticmethod
    def _path(kind: str, name: str, namespace: str) -> str:
        if kind == "Pod":
            return f"/api/v1/namespaces/{namespace}/pods/{name}"
        return f"/apis/inference.networking.k8s.io/v1/namespaces/{namespace}/inferencepools/{name}"


class ThreadedKubeApi:
    """`KubeApi` on its own event loop thread; ``call(coro_fn, ...)`` runs a KubeApi method there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.api = KubeApi()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="kube-emulator")

    def call(self, fn: Any, *args: Any, **kw: Any) -> Any:
        fut: Future = asyncio.run_coroutine_threadsafe(fn(*args, **kw), self.loop)
        return fut.result(timeout=10)


@contextlib.contextmanager
def threaded() -> Iterator[ThreadedKubeApi]:
    t = ThreadedKubeApi()
    t._thread.start()
    t.call(t.api.__aenter__)
    try:
        yield t
    finally:
        t.call(t.api.__aexit__, None, None, None)
        t.loop.call_soon_threadsafe(t.loop.stop)
        t._thread.join(timeout=5)
