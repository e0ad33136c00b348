"""Execute a workflow graph: ready nodes run concurrently (asyncio tasks), branches not taken are
skipped, each node retries and times out on its own, results are committed to SQLite as they finish
and looked up in the step cache before running."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from inferstack.workflow.cache import cache_key, cache_ttl
from inferstack.workflow.conditions import ConditionError
from inferstack.workflow.context import RunContext
from inferstack.workflow.dsl import MODEL_NODES, App, Edge, Node, export_app
from inferstack.workflow.executors import EXECUTORS
from inferstack.workflow.inputs import coerce_inputs
from inferstack.workflow.nodes import Executor, NodeFailure, NodeResult, Services
from inferstack.workflow.store import RunStore, StoredNode

DEFAULT_TIMEOUT_S = {"llm": 120.0, "parameter-extractor": 120.0, "question-classifier": 120.0,
                     "http-request": 30.0}
Event = dict[str, Any]
QUERY_KEY = "sys.query"  # where a run's stored inputs keep an advanced-chat query


class WorkflowError(Exception):
    """The run failed; the message names the node."""


@dataclass(frozen=True)
class RunOutcome:
    run_id: str
    outputs: dict[str, Any]
    llm_calls: int


def app_digest(app: App) -> str:
    return hashlib.sha256(export_app(app).encode()).hexdigest()


class Runner:
    def __init__(self, app: App, store: RunStore, services: Services, use_cache: bool = True,
                 on_event: Callable[[Event], None] | None = None, model: str | None = None) -> None:
        self.app, self.store, self.svc, self.use_cache = app, store, services, use_cache
        self.model = model  # serve every LLM node with this model instead of the one the DSL names
        self.emit = on_event or (lambda event: None)
        self.run_id = ""
        self.llm_calls = 0

    async def run(self, inputs: dict[str, Any], run_id: str | None = None, resume: bool = False) -> RunOutcome:
        digest = app_digest(self.app)
        if resume:
            record = self.store.get_run(run_id or "")
            if record is None:
                raise WorkflowError(f"no run {run_id!r} to resume")
            if record.app_digest != digest:
                raise WorkflowError(f"run {run_id} was started from a different version of {self.app.source}")
            self.run_id, inputs = record.run_id, dict(record.inputs)
            query = inputs.pop(QUERY_KEY, None)
        else:
            inputs = dict(inputs)
            # advanced-chat: the user's message is sys.query, not a start-node input
            query = inputs.pop("query", None) if self.app.mode == "advanced-chat" else None
            start = next(n for n in self.app.nodes.values() if n.type == "start" and n.parent is None)
            inputs = coerce_inputs(start, inputs)
            self.run_id = run_id or uuid.uuid4().hex
            stored = {**inputs, QUERY_KEY: query} if query is not None else inputs
            self.store.create_run(self.run_id, self.app.source, digest, stored)
        self.svc = dataclasses.replace(self.svc, session_id=self.run_id)
        ctx = RunContext({"sys": {"inputs": inputs, "workflow_run_id": self.run_id,
                                  "query": query, "app_id": self.app.name},
                          "env": dict(self.app.environment)})
        t0 = time.perf_counter()
        self.emit({"event": "workflow_started", "workflow_run_id": self.run_id, "data": {"inputs": inputs}})
        try:
            await self._walk(None, ctx, "")
        except WorkflowError as exc:
            self.store.finish_run(self.run_id, "failed", None, str(exc))
            self._finished("failed", None, str(exc), t0)
            raise
        outputs = self._final_outputs(ctx)
        self.store.finish_run(self.run_id, "succeeded", outputs, None)
        self._finished("succeeded", outputs, None, t0)
        return RunOutcome(self.run_id, outputs, self.llm_calls)

    def _finished(self, status: str, outputs: dict[str, Any] | None, error: str | None, t0: float) -> None:
        self.emit({"event": "workflow_finished", "workflow_run_id": self.run_id,
                   "data": {"status": status, "outputs": outputs, "error": error,
                            "elapsed_time": time.perf_counter() - t0}})

    def _final_outputs(self, ctx: RunContext) -> dict[str, Any]:
        top = [n for n in self.app.nodes.values() if n.parent is None]
        if self.app.mode == "advanced-chat":
            answers = [ctx.values[n.id]["answer"] for n in top if n.type == "answer" and n.id in ctx.values]
            return {"answer": "".join(answers)}
        outputs: dict[str, Any] = {}
        for node in top:
            if node.type == "end" and node.id in ctx.values:
                outputs.update(ctx.values[node.id])
        return outputs

    def _scope(self, parent: str | None) -> tuple[dict[str, Node], list[Edge], str]:
        nodes = {i: n for i, n in self.app.nodes.items() if n.parent == parent}
        edges = [e for e in self.app.edges if e.source in nodes and e.target in nodes]
        root_type = "start" if parent is None else "iteration-start"
        root = next((i for i, n in nodes.items() if n.type == root_type), None)
        if root is None:
            raise WorkflowError(f"{'the graph' if parent is None else 'iteration ' + parent} has no {root_type} node")
        return nodes, edges, root

    async def _walk(self, parent: str | None, ctx: RunContext, prefix: str) -> None:
        """Run one graph level: a node starts once every incoming edge is decided and one was taken."""
        nodes, edges, root = self._scope(parent)
        decided: dict[int, bool] = {}
        incoming = {nid: [i for i, e in enumerate(edges) if e.target == nid] for nid in nodes}
        tasks: dict[asyncio.Task[NodeResult], str] = {}

        def settle(nid: str, branch: str | None, ran: bool) -> None:
            for i, e in enumerate(edges):
                if e.source == nid:
                    decided[i] = ran and (branch is None or e.source_handle == branch)
            for target in {e.target for e in edges if e.source == nid}:
                if all(i in decided for i in incoming[target]):
                    if any(decided[i] for i in incoming[target]):
                        tasks[asyncio.create_task(self._node(nodes[target], ctx, prefix))] = target
                    else:
                        settle(target, None, False)

        tasks[asyncio.create_task(self._node(nodes[root], ctx, prefix))] = root
        try:
            while tasks:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    nid = tasks.pop(task)
                    result = task.result()
                    ctx.values[nid] = result.outputs
                    settle(nid, result.branch, True)
        finally:
            for task in tasks:
                task.cancel()

    async def _node(self, node: Node, ctx: RunContext, prefix: str) -> NodeResult:
        key = prefix + node.id
        stored = self.store.finished_node(self.run_id, key)
        if stored is not None:  # finished before a crash: never re-run
            self._node_event("node_finished", node, key, outputs=stored.outputs, resumed=True)
            return NodeResult(stored.outputs, stored.branch)
        self._node_event("node_started", node, key)
        t0 = time.perf_counter()
        if node.type == "iteration":
            result, attempts, cached = await self._iteration(node, ctx, prefix), 1, False
        else:
            result, attempts, cached = await self._execute(node, EXECUTORS[node.type], ctx)
        elapsed = time.perf_counter() - t0
        tokens = int(result.usage.get("total_tokens", 0))
        self.store.record_node(self.run_id, key, node.id, node.type,
                               StoredNode(result.outputs, result.branch, cached), elapsed, attempts, tokens)
        self._node_event("node_finished", node, key, outputs=result.outputs, elapsed_time=elapsed,
                         cache_hit=cached, attempts=attempts, total_tokens=tokens)
        return result

    def _node_event(self, event: str, node: Node, key: str, **data: Any) -> None:
        self.emit({"event": event, "workflow_run_id": self.run_id,
                   "data": {"node_id": node.id, "node_key": key, "node_type": node.type, "title": node.title,
                            **({"status": "succeeded"} if event == "node_finished" else {}), **data}})

    async def _execute(self, node: Node, executor: Executor, ctx: RunContext) -> tuple[NodeResult, int, bool]:
        try:
            resolved = executor.resolve(node, ctx)
        except ConditionError as exc:
            raise WorkflowError(f"node {node.id} ({node.type}) '{node.title}': {exc}") from None
        if node.type in MODEL_NODES and self.model:
            resolved["model"] = self.model
        ttl = cache_ttl(node, resolved)
        key = cache_key(node, resolved, self.svc.gateway) if ttl else ""
        if ttl and self.use_cache:
            hit = self.store.cache_get(key, time.time())
            if hit is not None:
                return NodeResult(hit.outputs, hit.branch), 0, True
        result, attempts = await self._attempts(node, executor, resolved)
        if ttl:
            self.store.cache_put(key, StoredNode(result.outputs, result.branch, False), time.time(), ttl)
        return result, attempts, False

    async def _attempts(self, node: Node, executor: Executor, resolved: dict[str, Any]) -> tuple[NodeResult, int]:
        retry = node.data.get("retry_config") or {}
        tries = 1 + (int(retry.get("max_retries", 0)) if retry.get("enabled") else 0)
        default_timeout = self.svc.sandbox.wall_s + 5 if node.type == "code" else DEFAULT_TIMEOUT_S.get(node.type, 60.0)
        timeout = float(node.data.get("timeout_s", default_timeout))
        error = ""
        for attempt in range(1, tries + 1):
            if node.type in MODEL_NODES:
                self.llm_calls += 1
            try:
                return await asyncio.wait_for(executor.run(node, resolved, self.svc), timeout), attempt
            except NodeFailure as exc:
                error = str(exc)
            except TimeoutError:
                error = f"timed out after {timeout:g}s"
            self.emit({"event": "node_retry", "workflow_run_id": self.run_id,
                       "data": {"node_id": node.id, "attempt": attempt, "error": error}})
            if attempt < tries:
                await asyncio.sleep(float(retry.get("retry_interval", 1000)) / 1000)
        raise WorkflowError(f"node {node.id} ({node.type}) '{node.title}' failed after {tries} attempt(s): {error}")

    async def _iteration(self, node: Node, ctx: RunContext, prefix: str) -> NodeResult:
        items = ctx.get(node.data.get("iterator_selector") or [])
        if not isinstance(items, list):
            raise WorkflowError(f"node {node.id} (iteration): iterator_selector gave {type(items).__name__}, "
                                "not a list")
        width = int(node.data.get("parallel_nums") or 10) if node.data.get("is_parallel") else 1
        gate = asyncio.Semaphore(max(1, width))
        output_selector = node.data.get("output_selector") or []

        async def step(index: int, item: Any) -> Any:
            async with gate:
                child = ctx.child(**{node.id: {"item": item, "index": index}})
                await self._walk(node.id, child, f"{prefix}{node.id}[{index}]/")
                return child.get(output_selector)

        steps = [asyncio.create_task(step(i, item)) for i, item in enumerate(items)]
        try:
            return NodeResult({"output": list(await asyncio.gather(*steps))})
        finally:  # one failed step fails the iteration: stop the others
            for task in steps:
                task.cancel()
