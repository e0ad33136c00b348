"""Dify DSL import/export: the app file's version rules, graph checks with file:line errors.

Import follows Dify's `AppDslService` rules: `version` must be a string (missing → "0.1.0"), `kind` is
forced to `app`, files over 10 MiB are refused, `app` and `app.mode` are required. The version decides
the status: newer than ours or an older major → `pending` (needs confirmation), older minor →
`completed-with-warnings`, otherwise `completed`; an unparsable version → `failed`.
Export writes the document back as it was read (only `kind` may have been normalised).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from inferstack.config.loader import ConfigError, line_of, load_marked_yaml

CURRENT_DSL_VERSION = "0.5.0"
MAX_DSL_BYTES = 10 * 1024 * 1024
RUNNABLE_MODES = ("workflow", "advanced-chat")
# node types the runner executes
SUPPORTED_TYPES = frozenset({
    "start", "llm", "code", "if-else", "iteration", "iteration-start", "http-request",
    "template-transform", "variable-aggregator", "answer", "end", "tool", "parameter-extractor",
    "question-classifier",
})
# node types that call the model (through the gateway)
MODEL_NODES = frozenset({"llm", "parameter-extractor", "question-classifier"})
# Dify node types we know but do not run yet (retrieval, loops, Dify's own agent node)
KNOWN_UNSUPPORTED = frozenset({
    "knowledge-retrieval", "loop", "loop-start",
    "agent", "document-extractor", "list-operator", "variable-assigner", "assigner",
})
# Dify's variable reference in templates: {{#node_id.var[.field...]#}}
TEMPLATE_REF = re.compile(r"\{\{#([a-zA-Z0-9_]{1,50}(?:\.[a-zA-Z_][a-zA-Z0-9_]{0,29}){1,10})#\}\}")
SELECTOR_KEYS = ("value_selector", "variable_selector", "iterator_selector", "output_selector", "query",
                 "query_variable_selector")
# selector roots that are not nodes: system, environment and conversation variables
SPECIAL_ROOTS = ("sys", "env", "conversation")


class ImportStatus(StrEnum):
    COMPLETED = "completed"
    COMPLETED_WITH_WARNINGS = "completed-with-warnings"
    PENDING = "pending"
    FAILED = "failed"


class DslError(ConfigError):
    """A DSL problem; each line reads ``file:line: message``."""


@dataclass(frozen=True)
class Node:
    id: str
    type: str
    title: str
    data: dict[str, Any]
    line: int
    parent: str | None  # the iteration that contains it


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    source_handle: str
    line: int


@dataclass
class App:
    source: str
    document: dict[str, Any]     # plain data, as read (for export)
    status: ImportStatus
    warnings: list[str]
    name: str
    mode: str
    nodes: dict[str, Node]
    edges: list[Edge]
    environment: dict[str, Any] = field(default_factory=dict)


def _parse_version(text: str) -> tuple[int, int, int] | None:
    m = re.fullmatch(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", text.strip())
    if not m:
        return None
    return int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0)


def version_status(imported: str) -> ImportStatus:
    """Dify's `_check_version_compatibility`, rule for rule."""
    current, got = _parse_version(CURRENT_DSL_VERSION), _parse_version(imported)
    if current is None or got is None:
        return ImportStatus.FAILED
    if got > current or got[0] < current[0]:
        return ImportStatus.PENDING
    if got[1] < current[1]:
        return ImportStatus.COMPLETED_WITH_WARNINGS
    return ImportStatus.COMPLETED


def to_plain(value: Any) -> Any:
    """Line-marked YAML values → plain dicts/lists (for export and for the runner)."""
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_plain(v) for v in value]
    return value


def load_app(path: str | Path, confirm_pending: bool = False) -> App:
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_DSL_BYTES:
            raise DslError([f"{p}:1: file is {size} bytes; Dify DSL files are limited to 10 MiB"])
        text = p.read_text()
    except OSError as exc:
        raise DslError([f"{p}:0: cannot read workflow file: {exc.strerror}"]) from None
    return parse_app(text, str(p), confirm_pending)


def parse_app(text: str, source: str = "<string>", confirm_pending: bool = False) -> App:
    if len(text.encode()) > MAX_DSL_BYTES:
        raise DslError([f"{source}:1: file is larger than 10 MiB"])
    try:
        doc = load_marked_yaml(text, source)
    except ConfigError as exc:
        raise DslError(exc.problems) from None
    if not isinstance(doc, dict):
        raise DslError([f"{source}:1: a Dify DSL file is a mapping with `version`, `kind`, `app`, `workflow`"])
    status, warnings = _check_header(doc, source, confirm_pending)
    app = doc.get("app")
    if not isinstance(app, dict):
        raise DslError([f"{source}:1: missing app data (`app:` with `name` and `mode`)"])
    mode = app.get("mode")
    if mode not in RUNNABLE_MODES:
        raise DslError([f"{source}:{line_of(doc, ['app', 'mode'])}: app.mode {mode!r}: only "
                        f"{' / '.join(RUNNABLE_MODES)} apps have a workflow graph to run"])
    nodes, edges = _read_graph(doc, source)
    workflow = doc.get("workflow") or {}
    env = {v.get("name"): v.get("value") for v in workflow.get("environment_variables") or []
           if isinstance(v, dict)}
    return App(source=source, document=to_plain(doc), status=status, warnings=warnings,
               name=str(app.get("name", "")), mode=mode, nodes=nodes, edges=edges, environment=env)


def _check_header(doc: dict, source: str, confirm_pending: bool) -> tuple[ImportStatus, list[str]]:
    version = doc.get("version", "0.1.0")
    if not isinstance(version, str):
        raise DslError([f"{source}:{line_of(doc, ['version'])}: version must be a string such as "
                        f"\"{CURRENT_DSL_VERSION}\", got {type(version).__name__} (quote it)"])
    if "version" not in doc:
        doc["version"] = version
    if doc.get("kind") != "app":
        doc["kind"] = "app"
    status = version_status(version)
    where = f"{source}:{line_of(doc, ['version'])}"
    if status is ImportStatus.FAILED:
        raise DslError([f"{where}: version {version!r} is not a version number"])
    if status is ImportStatus.PENDING and not confirm_pending:
        raise DslError([f"{where}: DSL version {version} needs confirmation (ours is {CURRENT_DSL_VERSION}; "
                        "newer or older-major files may not import correctly); pass --confirm-version"])
    warnings = []
    if status is not ImportStatus.COMPLETED:
        warnings.append(f"{where}: DSL version {version} differs from {CURRENT_DSL_VERSION}; "
                        "check the result")
    return status, warnings


def _read_graph(doc: dict, source: str) -> tuple[dict[str, Node], list[Edge]]:
    graph = (doc.get("workflow") or {}).get("graph")
    if not isinstance(graph, dict) or not isinstance(graph.get("nodes"), list):
        raise DslError([f"{source}:{line_of(doc, ['workflow'])}: missing workflow.graph.nodes"])
    problems: list[str] = []
    nodes: dict[str, Node] = {}
    for i, raw in enumerate(graph["nodes"]):
        line = line_of(doc, ["workflow", "graph", "nodes", i])
        node = _read_node(raw, line, source, problems)
        if node is not None:
            if node.id in nodes:
                problems.append(f"{source}:{line}: node {node.id} ({node.type}): duplicate node id")
            nodes[node.id] = node
    edges: list[Edge] = []
    for i, raw in enumerate(graph.get("edges") or []):
        line = line_of(doc, ["workflow", "graph", "edges", i])
        edge = Edge(str(raw.get("source")), str(raw.get("target")),
                    str(raw.get("sourceHandle") or "source"), line)
        for end in (edge.source, edge.target):
            if end not in nodes:
                problems.append(f"{source}:{line}: edge {edge.source} -> {edge.target}: no node {end!r}")
        edges.append(edge)
    for node in nodes.values():
        problems += _check_refs(node, nodes, source)
    if not problems and not any(n.type == "start" and n.parent is None for n in nodes.values()):
        problems.append(f"{source}:{line_of(doc, ['workflow', 'graph', 'nodes'])}: the graph has no start node")
    if not problems:
        problems += _check_iterations(nodes, edges, source)
    if problems:
        raise DslError(problems)
    return nodes, edges


def _read_node(raw: Any, line: int, source: str, problems: list[str]) -> Node | None:
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), dict) or "id" not in raw:
        problems.append(f"{source}:{line}: a node needs `id` and `data` (with `type`)")
        return None
    data = raw["data"]
    node = Node(id=str(raw["id"]), type=str(data.get("type")), title=str(data.get("title", raw["id"])),
                data=to_plain(data), line=line, parent=raw.get("parentId") or data.get("iteration_id"))
    if node.type in KNOWN_UNSUPPORTED:
        problems.append(f"{source}:{line}: node {node.id} ({node.type}): this node type is not supported "
                        "by the inferstack runner yet (see docs/workflows.md)")
    elif node.type not in SUPPORTED_TYPES:
        problems.append(f"{source}:{line}: node {node.id} ({node.type}): unknown node type")
    return node


def _check_iterations(nodes: dict[str, Node], edges: list[Edge], source: str) -> list[str]:
    """Each iteration's children run from its iteration-start along edges inside the iteration (as the
    runner walks them): a child nothing leads to would be skipped on every step, so it is an error here."""
    problems = []
    for node in nodes.values():
        if node.parent is not None and (node.parent not in nodes or nodes[node.parent].type != "iteration"):
            problems.append(f"{source}:{node.line}: node {node.id} ({node.type}): its parent {node.parent!r} "
                            "is not an iteration node")
    for it in (n for n in nodes.values() if n.type == "iteration"):
        children = {i: n for i, n in nodes.items() if n.parent == it.id}
        starts = [i for i, n in children.items() if n.type == "iteration-start"]
        if len(starts) != 1:
            problems.append(f"{source}:{it.line}: node {it.id} (iteration): needs exactly one iteration-start "
                            f"child (a node with parentId {it.id} and type iteration-start), found {len(starts)}")
            continue
        reached, todo = {starts[0]}, [starts[0]]
        while todo:
            here = todo.pop()
            for e in edges:
                if e.source == here and e.target in children and e.target not in reached:
                    reached.add(e.target)
                    todo.append(e.target)
        problems += [f"{source}:{n.line}: node {i} ({n.type}): inside iteration {it.id}, but no edge path from "
                     f"its iteration-start {starts[0]} reaches it, so it would never run" for i, n in children.items()
                     if i not in reached]
    return problems


def references(value: Any) -> list[tuple[str, ...]]:
    """Every variable selector and `{{#a.b#}}` reference inside a node's data."""
    found: list[tuple[str, ...]] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if key in SELECTOR_KEYS and isinstance(item, list) and item and all(isinstance(s, str) for s in item):
                found.append(tuple(item))
            else:
                found += references(item)
    elif isinstance(value, list):
        for item in value:
            found += references(item)
    elif isinstance(value, str):
        found += [tuple(m.split(".")) for m in TEMPLATE_REF.findall(value)]
    return found


def _check_refs(node: Node, nodes: dict[str, Node], source: str) -> list[str]:
    selectors = references(node.data)
    if node.type == "variable-aggregator":
        selectors += [tuple(s) for s in node.data.get("variables") or [] if isinstance(s, list)]
    if node.type == "tool":
        selectors += [tuple(p["value"]) for p in (node.data.get("tool_parameters") or {}).values()
                      if isinstance(p, dict) and p.get("type") == "variable" and isinstance(p.get("value"), list)]
    bad = sorted({".".join(s) for s in selectors
                  if len(s) < 2 or (s[0] not in nodes and s[0] not in SPECIAL_ROOTS)})
    return [f"{source}:{node.line}: node {node.id} ({node.type}): reference {ref!r} names no node"
            for ref in bad]


def export_app(app: App) -> str:
    """The DSL text of ``app`` (the document as imported; key order kept)."""
    return yaml.safe_dump(app.document, sort_keys=False, allow_unicode=True)
