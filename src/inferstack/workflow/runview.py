"""The run view: a workflow's graph with each node's status, time, tokens and cache hits, as one HTML page
with an inline SVG (no scripts; the page reloads itself every 2 s while the run is going).

`node_views` is the pure part: a run's stored node rows folded onto the app's top-level nodes (the steps
of an iteration are summed onto their parent node and onto their child node), laid out in columns by
longest path from the start node."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from typing import Any

from inferstack.workflow.dsl import App

BOX_W, BOX_H, GAP_X, GAP_Y = 190, 74, 60, 22
_FAILED_NODE = re.compile(r"node (\S+) \(")
COLORS = {"succeeded": "#d9f2d9", "cached": "#d6e8ff", "failed": "#ffd6d6", "not run": "#eeeeee",
          "running": "#fff2c2"}


@dataclass
class NodeView:
    id: str
    type: str
    title: str
    status: str = "not run"   # succeeded | cached | failed | not run | running
    elapsed_s: float = 0.0
    tokens: int = 0
    steps: int = 0            # executions (an iteration's children run once per item)
    cache_hits: int = 0
    child_steps: int = 0      # an iteration: its children's executions
    child_cache_hits: int = 0
    column: int = 0
    row: int = 0


def node_views(app: App, detail: dict[str, Any]) -> list[NodeView]:
    top = {i: n for i, n in app.nodes.items() if n.parent is None}
    views = {i: NodeView(i, n.type, n.title) for i, n in app.nodes.items() if n.type != "iteration-start"}
    for row in detail.get("nodes") or []:
        key, cached, tokens = str(row["node_key"]), bool(row["cached"]), int(row["tokens"] or 0)
        view = views.get(key.rsplit("/", 1)[-1])
        if view is not None:
            view.steps += 1
            view.cache_hits += int(cached)
            view.elapsed_s += float(row["elapsed_s"] or 0.0)
            view.tokens += tokens
        inner = "[" in key and row["node_type"] != "iteration-start"  # a real step inside an iteration
        parent = views.get(key.split("[", 1)[0]) if inner else None
        if parent is not None and parent is not view:  # an iteration step: counted on the iteration too
            parent.tokens += tokens
            parent.child_steps += 1
            parent.child_cache_hits += int(cached)
    for view in views.values():
        if view.steps:
            view.status = "cached" if view.cache_hits == view.steps else "succeeded"
    failed = _FAILED_NODE.search(str(detail.get("error") or ""))
    if detail.get("status") == "failed" and failed and failed.group(1) in views:
        views[failed.group(1)].status = "failed"
    if detail.get("status") == "running":
        for view in views.values():
            if view.status == "not run" and _ready(app, view.id, views):
                view.status = "running"
    _layout(app, {i: views[i] for i in top})
    return [views[i] for i in top]


def _ready(app: App, node_id: str, views: dict[str, NodeView]) -> bool:
    incoming = [e.source for e in app.edges if e.target == node_id]
    return bool(incoming) and all(views[s].status in ("succeeded", "cached") for s in incoming if s in views)


def _layout(app: App, views: dict[str, NodeView]) -> None:
    """Column = longest path from a node without incoming edges; rows in order of appearance."""
    edges = [(e.source, e.target) for e in app.edges if e.source in views and e.target in views]
    for _ in range(len(views)):  # Bellman-Ford-style relaxation; the graph is a DAG
        changed = False
        for source, target in edges:
            if views[target].column < views[source].column + 1:
                views[target].column, changed = views[source].column + 1, True
        if not changed:
            break
    rows: dict[int, int] = {}
    for view in views.values():
        view.row = rows.get(view.column, 0)
        rows[view.column] = view.row + 1


def render_html(app: App, detail: dict[str, Any]) -> str:
    views = node_views(app, detail)
    by_id = {v.id: v for v in views}
    width = (max(v.column for v in views) + 1) * (BOX_W + GAP_X)
    height = (max(v.row for v in views) + 1) * (BOX_H + GAP_Y)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">']
    for edge in app.edges:
        a, b = by_id.get(edge.source), by_id.get(edge.target)
        if a and b:
            x1, y1 = _x(a) + BOX_W, _y(a) + BOX_H / 2
            parts.append(f'<line x1="{x1}" y1="{y1}" x2="{_x(b)}" y2="{_y(b) + BOX_H / 2}" stroke="#888"/>')
    for v in views:
        detail_line = f"{v.elapsed_s * 1000:.0f} ms" + (f" · {v.tokens} tok" if v.tokens else "")
        if v.child_steps:
            detail_line += f" · {v.child_steps} steps, {v.child_cache_hits} cached"
        elif v.steps > 1 or v.cache_hits:
            detail_line += f" · {v.cache_hits}/{v.steps} cached"
        parts.append(
            f'<g class="node {v.status.replace(" ", "-")}" data-node="{html.escape(v.id)}">'
            f'<rect x="{_x(v)}" y="{_y(v)}" width="{BOX_W}" height="{BOX_H}" rx="8" fill="{COLORS[v.status]}" '
            f'stroke="#555"/><text x="{_x(v) + 8}" y="{_y(v) + 20}" font-size="13" font-weight="bold">'
            f'{html.escape(v.title or v.id)[:26]}</text><text x="{_x(v) + 8}" y="{_y(v) + 38}" font-size="11">'
            f'{html.escape(v.type)} · {v.status}</text><text x="{_x(v) + 8}" y="{_y(v) + 56}" font-size="11">'
            f'{detail_line}</text></g>')
    parts.append("</svg>")
    refresh = '<meta http-equiv="refresh" content="2">' if detail.get("status") == "running" else ""
    title = html.escape(f"{app.name} · run {detail.get('run_id', '')} · {detail.get('status', '')}")
    error = f"<p class='error'>{html.escape(str(detail['error']))}</p>" if detail.get("error") else ""
    return (f"<!doctype html><html><head><meta charset='utf-8'>{refresh}<title>{title}</title></head>"
            f"<body><h1 style='font:16px sans-serif'>{title}</h1>{error}{''.join(parts)}</body></html>")


def _x(v: NodeView) -> float:
    return v.column * (BOX_W + GAP_X) + 10


def _y(v: NodeView) -> float:
    return v.row * (BOX_H + GAP_Y) + 10
