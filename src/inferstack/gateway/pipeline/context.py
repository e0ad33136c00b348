"""The typed request context the pipeline stages fill in, one small record per stage.

A stage reads the records of the stages before it and returns its own; nothing is filled in
"later" except `Outcome`, which the serving stage (proxy or Envoy answer) and accounting share.

The per-request records are plain slotted dataclasses, not frozen ones: a frozen dataclass sets each
field through `object.__setattr__` and costs about three times as much to build, and every request
builds several. No stage writes another stage's record (`Admission` and `Outcome` excepted, as said).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from inferstack.gateway.auth import Identity
from inferstack.gateway.datalayer import Pool
from inferstack.gateway.flowcontrol import FlowController
from inferstack.gateway.limits import Limits, Reservation
from inferstack.gateway.routing import PoolSnapshot, RequestView
from inferstack.protocol.ids import clean_request_id

KINDS = {b"/v1/chat/completions": "chat", b"/v1/completions": "completions"}
PATHS = {kind: path for path, kind in KINDS.items()}


@dataclass(slots=True, frozen=True)
class Tenant:
    """A configured tenant: its limits, prefix-cache salt and fair-share weight."""

    limits: Limits
    salt: str
    weight: float
    local_only: bool = False  # never spilled to a fallback pool (pipeline/spill.py)


_VERSION_4 = bytes((x & 0x0F) | 0x40 for x in range(256))  # a UUID's version nibble: 4
_VARIANT = bytes((x & 0x3F) | 0x80 for x in range(256))     # its variant bits: RFC 4122


class RequestIds:
    """Ids for requests that bring none: random version-4 UUIDs as hex (what ``uuid.uuid4().hex`` gives),
    cut from 4 KiB of `os.urandom` at a time, so one getrandom system call serves 256 requests instead of
    one. One per process (the `Pipeline` owns it): a copy inherited through fork would repeat ids, and
    the gateway's workers build their pipelines after forking."""

    __slots__ = ("_at", "_hex")
    _BATCH = 4096

    def __init__(self) -> None:
        self._hex, self._at = "", 0

    def new(self) -> str:
        at = self._at
        if at >= len(self._hex):
            self._hex, at = self._refill(), 0
        self._at = at + 32
        return self._hex[at:at + 32]

    @classmethod
    def _refill(cls) -> str:
        """256 ids' worth of random bytes with the version and variant bits set, as hex: a request's id is then
        one slice of it (marking and hex-encoding 16 bytes per request cost it 0.6 µs)."""
        b = bytearray(os.urandom(cls._BATCH))
        b[6::16] = b[6::16].translate(_VERSION_4)  # byte 6 of every id
        b[8::16] = b[8::16].translate(_VARIANT)    # byte 8 of every id
        return b.hex()


@dataclass(slots=True)
class Inbound:
    """What arrived: the API (chat or completions), request headers, id and arrival time."""

    kind: str
    headers: Mapping[bytes, bytes]
    rid: bytes
    t0: float

    @classmethod
    def arrive(cls, kind: str, headers: Mapping[bytes, bytes], ids: RequestIds) -> Inbound:
        given = headers.get(b"x-request-id")
        rid = clean_request_id(given.decode("latin-1")) if given else None
        return cls(kind, headers, (rid or ids.new()).encode(), time.perf_counter())

    @property
    def path(self) -> bytes:
        return PATHS[self.kind]


@dataclass(slots=True)
class Caller:
    """authenticate: who is asking, their tenant (if configured) and the request's priority."""

    ident: Identity
    tenant: Tenant | None
    priority: int

    @property
    def salt(self) -> str:
        return self.tenant.salt if self.tenant else self.ident.tenant


@dataclass(slots=True)
class Route:
    """resolve: the model as asked, the pool serving it, the name upstream and a LoRA adapter."""

    model: str
    pool: Pool
    upstream_model: str
    adapter: str | None


@dataclass(slots=True)
class Admission:
    """admit: the request passed limits and flow control. ``reserved`` stays True while a queued
    request holds a flow-control reservation that `pick` converts into endpoint in-flight."""

    flow: FlowController
    prompt_tokens: int  # estimated input tokens of every prompt
    reserved: bool
    tokens: Reservation | None = None  # TPM held until `Pipeline.close` settles it to the real usage
    unenforced: bool = False  # admitted without limits: the store was down (`on_store_failure: allow`)
    # the pool as flow control's free-slot check saw it, for the first pick to reuse; None once anything
    # may have changed since (the request waited, or its task suspended): see `Picker.pick`
    snapshot: PoolSnapshot | None = None
    flow_id: str = ""    # its fairness flow and weight, for the wait at its endpoint (`Picker.route`)
    weight: float = 1.0
    # the endpoint queue that released it to its endpoint, until `Picker.hold` counts it in-flight there
    held_at: FlowController | None = None


@dataclass(slots=True)
class EngineBody:
    """plan, before admission: the body as the engine gets it, serialized once, so a body the
    gateway cannot forward is refused before it holds any capacity."""

    payload: bytes
    stream: bool
    inject_usage: bool  # we asked for stream usage: strip the usage-only event before the client


@dataclass(slots=True)
class Plan:
    """The body as the engine gets it (rewritten, serialized once) and the routing view of it."""

    payload: bytes
    stream: bool
    inject_usage: bool  # we asked for stream usage: strip the usage-only event before the client
    view: RequestView


@dataclass(slots=True)
class Outcome:
    """What happened upstream; filled by the serving stage, read by accounting."""

    endpoint: str = ""
    status: int = 0
    ttft: float | None = None
    tpot: float | None = None
    gaps: list[float] = field(default_factory=list)
    in_tokens: int | None = None
    out_tokens: int | None = None
    usage_tokens: int | None = None  # input + output from the engine's usage, when it sent one
    streamed: int = 0  # content chunks relayed so far (what a stream cut short is charged)
    responded: bool = False  # the client has its whole response (a disconnect now changes nothing)


@dataclass(slots=True)
class RequestContext:
    """One admitted request: every stage's record. Built only after admission succeeded."""

    inbound: Inbound
    caller: Caller
    body: dict[str, Any]  # the parsed request, rewritten for the engine by `plan` (audit hashes its prompt)
    route: Route
    admission: Admission
    plan: Plan
    outcome: Outcome = field(default_factory=Outcome)
    span: Any = None  # OpenTelemetry span, when tracing is on
