"""One MCP session per server, reused by every tool call (a stdio server is one process, not one per call).

The SDK's `Client` is an anyio context that must be entered and left in the same task, so each server
gets a task that holds the session open and serves calls from a queue, one at a time. A session that
fails to connect or breaks fails the calls waiting on it; the next call connects again.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

Call = tuple[str | None, dict[str, Any], asyncio.Future[Any]]  # tool None: list the tools


class McpConnections:
    def __init__(self, targets: dict[str, object] | None = None) -> None:
        self.targets = dict(targets or {})  # name → URL, StdioServerParameters or an in-memory server
        self._queues: dict[str, asyncio.Queue[Call | None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def __contains__(self, server: str) -> bool:
        return server in self.targets

    async def call(self, server: str, tool: str, arguments: dict[str, Any]) -> Any:
        """`CallToolResult` of ``tool`` on ``server``; transport and protocol errors raise."""
        return await self._request(server, tool, arguments)

    async def list_tools(self, server: str) -> Any:
        """`ListToolsResult` of ``server`` (`.tools[i].name, description, input_schema`)."""
        return await self._request(server, None, {})

    async def _request(self, server: str, tool: str | None, arguments: dict[str, Any]) -> Any:
        queue = self._queues.get(server)
        if queue is None:
            queue = self._queues[server] = asyncio.Queue()
            task = asyncio.create_task(self._session(server, queue))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await queue.put((tool, arguments, future))
        return await future

    async def _session(self, server: str, queue: asyncio.Queue[Call | None]) -> None:
        from mcp import Client

        try:
            async with Client(self.targets[server]) as client:
                while (item := await queue.get()) is not None:
                    tool, arguments, future = item
                    try:
                        result = await (client.list_tools() if tool is None else client.call_tool(tool, arguments))
                    except Exception as exc:  # handed to the caller, who fails the node
                        _settle(future, exc=exc)
                    else:
                        _settle(future, result=result)
        except Exception as exc:  # connect or transport failure: fail whoever waits
            if self._queues.get(server) is queue:
                del self._queues[server]
            while not queue.empty():
                item = queue.get_nowait()
                if item is not None:
                    _settle(item[2], exc=exc)

    async def aclose(self) -> None:
        for queue in self._queues.values():
            queue.put_nowait(None)
        self._queues.clear()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=10)
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _settle(future: asyncio.Future[Any], result: Any = None, exc: BaseException | None = None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


def describe(exc: BaseException) -> str:
    """``Type: message`` of the first real error (anyio wraps a server's failure in exception groups)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


# what a local (stdio) server of ours needs beyond the SDK's safe defaults (HOME, PATH, ...): our
# sources and virtualenv; API keys and other secrets of the caller stay out of the server's environment
_PYTHON_ENV = ("PYTHONPATH", "VIRTUAL_ENV", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def stdio_server(command: str, args: list[str]) -> Any:
    """`StdioServerParameters` for a local MCP server process."""
    import os

    from mcp import StdioServerParameters
    from mcp.client.stdio import get_default_environment

    env = {**get_default_environment(), **{k: os.environ[k] for k in _PYTHON_ENV if k in os.environ}}
    return StdioServerParameters(command=command, args=args, env=env)
