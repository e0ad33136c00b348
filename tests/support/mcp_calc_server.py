"""A small MCP server written with the official SDK, for the workflow tool-node tests.

Run as a process (stdio transport): python mcp_calc_server.py; or import `server` for in-memory use.
"""

from __future__ import annotations

from mcp.server import MCPServer

server = MCPServer("calc")


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def explode(reason: str) -> str:
    """Always fails, so clients see an is_error result."""
    raise ValueError(f"boom: {reason}")


if __name__ == "__main__":
    server.run()
