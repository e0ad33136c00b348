"""KAgent manifests (`kagent.dev/v1alpha2` Agent and ModelConfig, RemoteMCPServer, `kagent.dev/v1alpha1`
MCPServer) read from multi-document YAML and validated offline with the rules the KAgent CRDs enforce
(the schema's enums, MaxItems/MinItems and the CEL rules, with KAgent's own messages), plus the checks
its controller makes when it resolves references (a referenced agent or server must exist, no agent
may reach itself through its tools). Every problem reads ``file:line: Kind/name: path: message``; an
unknown field is an error, as with `kubectl apply` (strict field validation).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from inferstack.config.loader import ConfigError, line_of, load_marked_yaml_all

GROUP = "kagent.dev"
DEFAULT_MODEL_CONFIG = "default-model-config"  # KAgent's default for declarative.modelConfig
_DNS_1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


class ManifestError(ConfigError):
    """Manifest problems, one ``file:line: ...`` line each."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=())


class _Open(BaseModel):
    """Kubernetes core types we pass through (volumes, env, resources): not ours to re-validate."""
    model_config = ConfigDict(extra="allow")


class TypedLocalReference(_Strict):
    kind: str = ""
    api_group: str = Field("", alias="apiGroup")
    name: str
    namespace: str = ""


class McpServerTool(TypedLocalReference):
    tool_names: list[str] = Field(default_factory=list, alias="toolNames")
    allowed_headers: list[str] = Field(default_factory=list, alias="allowedHeaders")


class Tool(_Strict):
    type: Literal["McpServer", "Agent"] | None = None
    mcp_server: McpServerTool | None = Field(None, alias="mcpServer")
    agent: TypedLocalReference | None = None
    headers_from: list[_Open] = Field(default_factory=list, alias="headersFrom")

    @model_validator(mode="after")
    def _cel(self) -> Tool:  # KAgent's four XValidation rules on Tool, in its order and words
        if self.mcp_server is not None and self.type != "McpServer":
            raise ValueError("type.mcpServer must be nil if the type is not McpServer")
        if self.mcp_server is None and self.type == "McpServer":
            raise ValueError("type.mcpServer must be specified for McpServer filter.type")
        if self.agent is not None and self.type != "Agent":
            raise ValueError("type.agent must be nil if the type is not Agent")
        if self.agent is None and self.type == "Agent":
            raise ValueError("type.agent must be specified for Agent filter.type")
        return self


class A2AConfig(_Strict):
    skills: list[_Open] = Field(min_length=1)


class SharedDeployment(_Open):
    @model_validator(mode="after")
    def _cel(self) -> SharedDeployment:
        extra = self.model_extra or {}
        if "serviceAccountName" in extra and "serviceAccountConfig" in extra:
            raise ValueError("serviceAccountName and serviceAccountConfig are mutually exclusive")
        return self


class Declarative(_Strict):
    system_message: str | None = Field(None, alias="systemMessage")
    system_message_from: _Open | None = Field(None, alias="systemMessageFrom")
    model_config_name: str = Field(DEFAULT_MODEL_CONFIG, alias="modelConfig")
    stream: bool = False
    tools: list[Tool] = Field(default_factory=list, max_length=20)
    a2a_config: A2AConfig | None = Field(None, alias="a2aConfig")
    deployment: SharedDeployment | None = None
    execute_code_blocks: bool | None = Field(None, alias="executeCodeBlocks")

    @model_validator(mode="after")
    def _cel(self) -> Declarative:
        if self.system_message is not None and self.system_message_from is not None:
            raise ValueError("systemMessage and systemMessageFrom are mutually exclusive")
        return self


class ByoDeployment(SharedDeployment):
    image: str = Field(min_length=1)


class Byo(_Strict):
    deployment: ByoDeployment | None = None


class GitRepo(_Strict):
    url: str
    ref: str = "main"
    path: str = ""
    name: str = ""


class Skills(_Strict):
    insecure_skip_verify: bool = Field(False, alias="insecureSkipVerify")
    refs: list[str] | None = Field(None, min_length=1, max_length=20)
    git_auth_secret_ref: _Open | None = Field(None, alias="gitAuthSecretRef")
    git_refs: list[GitRepo] | None = Field(None, alias="gitRefs", min_length=1, max_length=20)

    @model_validator(mode="after")
    def _one_of(self) -> Skills:
        if self.refs is None and self.git_refs is None:
            raise ValueError("at least one of the fields in [refs gitRefs] must be set")
        return self


class AgentSpec(_Strict):
    type: Literal["Declarative", "BYO"] = "Declarative"
    declarative: Declarative | None = None
    byo: Byo | None = None
    description: str = ""
    skills: Skills | None = None
    allowed_namespaces: _Open | None = Field(None, alias="allowedNamespaces")

    @model_validator(mode="after")
    def _cel(self) -> AgentSpec:
        if not ((self.type == "Declarative" and self.declarative is not None)
                or (self.type == "BYO" and self.byo is not None)):
            raise ValueError("declarative must be specified if type is Declarative, or byo must be specified "
                             "if type is BYO")
        return self


class OpenAIConfig(_Open):
    base_url: str | None = Field(None, alias="baseUrl")
    temperature: float | str | None = None
    max_tokens: int | None = Field(None, alias="maxTokens")
    seed: int | None = None


class ModelConfigSpec(_Open):
    model: str = Field(min_length=1)
    provider: str = "OpenAI"
    open_ai: OpenAIConfig | None = Field(None, alias="openAI")


class RemoteMcpSpec(_Open):
    url: str = Field(min_length=1)
    protocol: Literal["STREAMABLE_HTTP", "SSE"] = "STREAMABLE_HTTP"


class McpDeployment(_Open):
    cmd: str = Field(min_length=1)
    args: list[str] = Field(default_factory=list)


class McpServerSpec(_Open):
    deployment: McpDeployment
    transport_type: Literal["stdio", "http"] = Field("stdio", alias="transportType")


SPECS: dict[tuple[str, str], type[BaseModel]] = {
    (f"{GROUP}/v1alpha2", "Agent"): AgentSpec,
    (f"{GROUP}/v1alpha2", "ModelConfig"): ModelConfigSpec,
    (f"{GROUP}/v1alpha2", "RemoteMCPServer"): RemoteMcpSpec,
    (f"{GROUP}/v1alpha1", "MCPServer"): McpServerSpec,
}


@dataclass(frozen=True)
class Resource:
    kind: str
    name: str
    namespace: str
    spec: Any           # the validated spec model
    line: int
    doc: Any = field(default=None, repr=False, compare=False)  # as read, for the lines of later problems

    def line_of(self, *loc: str | int) -> int:
        return line_of(self.doc, list(loc)) if self.doc is not None else self.line


@dataclass
class Bundle:
    """Every resource read, by (kind, namespace, name)."""
    source: str
    resources: dict[tuple[str, str, str], Resource] = field(default_factory=dict)

    def get(self, kind: str, name: str, namespace: str) -> Resource | None:
        return self.resources.get((kind, namespace, name))

    def agents(self) -> list[Resource]:
        return [r for r in self.resources.values() if r.kind == "Agent"]


def load_bundle(paths: list[Path]) -> Bundle:
    """Read and validate every kagent.dev resource in ``paths`` (other kinds are left alone)."""
    bundle = Bundle(", ".join(str(p) for p in paths))
    problems: list[str] = []
    for path in paths:
        try:
            text = path.read_text()
        except OSError as exc:
            raise ManifestError([f"{path}:0: cannot read manifest: {exc.strerror}"]) from None
        for doc in load_marked_yaml_all(text, str(path)):
            if doc is not None:
                _read_resource(doc, str(path), bundle, problems)
    if not problems:
        problems += _check_agent_refs(bundle)
    if problems:
        raise ManifestError(problems)
    return bundle


def _read_resource(doc: Any, source: str, bundle: Bundle, problems: list[str]) -> None:
    if not isinstance(doc, dict):
        problems.append(f"{source}:{line_of(doc, [])}: a manifest is a mapping with apiVersion, kind, metadata")
        return
    api, kind = str(doc.get("apiVersion", "")), str(doc.get("kind", ""))
    if not api.startswith(GROUP + "/"):
        return  # a Secret, a Deployment...: not ours to check
    where = f"{source}:{line_of(doc, ['kind'])}"
    model = SPECS.get((api, kind))
    if model is None:
        known = ", ".join(f"{a} {k}" for a, k in SPECS)
        problems.append(f"{where}: {api} {kind}: not a kind inferstack reads (it reads {known})")
        return
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    name, namespace = str(meta.get("name") or ""), str(meta.get("namespace") or "default")
    if not name or len(name) > 253 or not _DNS_1123.fullmatch(name):
        problems.append(f"{source}:{line_of(doc, ['metadata', 'name'])}: {kind}: metadata.name {name!r} must be "
                        "a lowercase RFC 1123 subdomain (a-z, 0-9, '-', '.'; at most 253 characters)")
        return
    label = f"{kind}/{name}"
    try:
        spec = model.model_validate(doc.get("spec") if doc.get("spec") is not None else {})
    except ValidationError as exc:
        problems += [_problem(source, doc, label, err) for err in exc.errors()]
        return
    key = (kind, namespace, name)
    if key in bundle.resources:
        problems.append(f"{where}: {label}: defined twice (first at line {bundle.resources[key].line})")
        return
    bundle.resources[key] = Resource(kind, name, namespace, spec, line_of(doc, ["kind"]), doc)


def _problem(source: str, doc: dict[str, Any], label: str, err: Any) -> str:
    loc = ["spec", *err["loc"]]
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = f'unknown field "{path}"'
    return f"{source}:{line_of(doc, loc)}: {label}: {path}: {msg}"


def tool_target(owner: Resource, ref: TypedLocalReference) -> tuple[str, str]:
    """(namespace, name) a tool reference points at; the owner's namespace when it names none."""
    return ref.namespace or owner.namespace, ref.name


def _check_agent_refs(bundle: Bundle) -> list[str]:
    """What KAgent's controller refuses when it reconciles: a missing or disallowed agent, a cycle."""
    problems = []
    edges: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for agent in bundle.agents():
        decl = agent.spec.declarative
        for i, tool in enumerate(decl.tools if decl else []):
            if tool.agent is None:
                continue
            ns, name = tool_target(agent, tool.agent)
            target = bundle.get("Agent", name, ns)
            where = (f"{bundle.source}:{agent.line_of('spec', 'declarative', 'tools', i, 'agent')}: "
                     f"Agent/{agent.name}: spec.declarative.tools[{i}].agent")
            if target is None:
                problems.append(f"{where}: agent {ns}/{name} is not defined in {bundle.source}")
            elif ns != agent.namespace and not _allows(target, agent.namespace):
                problems.append(f"{where}: agent {ns}/{name} does not allow namespace {agent.namespace} "
                                "(set its spec.allowedNamespaces.from: All)")
            else:
                edges.setdefault((agent.namespace, agent.name), []).append((ns, name))
    cycle = _find_cycle(edges)
    if cycle:
        first = bundle.get("Agent", cycle[0][1], cycle[0][0])
        problems.append(f"{bundle.source}:{first.line_of('spec', 'declarative', 'tools')}: "
                        f"agents call each other in a cycle: {' -> '.join(n for _, n in cycle)}")
    return problems


def _allows(target: Resource, namespace: str) -> bool:
    allowed = target.spec.allowed_namespaces
    return allowed is not None and (allowed.model_extra or {}).get("from") in ("All", "Selector")


def _find_cycle(edges: dict[tuple[str, str], list[tuple[str, str]]]) -> list[tuple[str, str]]:
    state: dict[tuple[str, str], int] = {}  # 1 = on the current path, 2 = done

    def visit(node: tuple[str, str], path: list[tuple[str, str]]) -> list[tuple[str, str]]:
        state[node] = 1
        for nxt in edges.get(node, []):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, [*path, node])):
                return found
        state[node] = 2
        return []

    for start in sorted(edges):
        if start not in state and (found := visit(start, [])):
            return found
    return []
