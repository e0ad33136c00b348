"""API keys (stored as sha256 digests) -> tenant, allowed models, priority.

The gateway owns a request's priority: a client may name an objective (header), but never more
than its key allows (`keys[].max_objective`), and a `priority` in the body is always overwritten.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from inferstack.config.schema import InferstackConfig
from inferstack.protocol.errors import APIError

# distinct Authorization values of configured keys remembered (`KeyStore.identify`); more are hashed each time
_KNOWN_MAX = 1024


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Identity:
    tenant: str
    models: frozenset[str] | None
    priority: int
    key_id: str | None = None  # the key's configured name, else the first 12 hex digits of its sha256
    max_priority: int = 0  # the highest priority an objective header may ask for


class KeyStore:
    def __init__(self, cfg: InferstackConfig):
        self.require = cfg.gateway.require_keys if cfg.gateway.require_keys is not None else bool(cfg.keys)
        self.default = Identity(cfg.gateway.default_tenant, None, 0)
        self.objectives = {n: o.priority for n, o in cfg.objectives.items()}
        self._by_hash: dict[str, Identity] = {}
        # Authorization header -> identity, for headers that named a configured key: a request with a key seen
        # before costs one dict lookup instead of a parse and a sha256 (1.2 -> 0.4 µs of CPU, measured). Only
        # configured keys enter it, and at most _KNOWN_MAX spellings of them, so its memory is bounded.
        self._known: dict[bytes, Identity] = {}
        for k in cfg.keys:
            prio = self.objectives[k.objective] if k.objective else 0
            cap = self.objectives[k.max_objective] if k.max_objective else prio
            self._by_hash[k.sha256] = Identity(k.tenant, frozenset(k.models) if k.models is not None else None, prio,
                                               k.name or k.sha256[:12], max(prio, cap))

    def identify(self, authorization: bytes | None) -> Identity:
        if not authorization:
            if self.require:
                raise APIError(401, "Missing API key: send `Authorization: Bearer <key>`.", code="invalid_api_key")
            return self.default
        known = self._known.get(authorization)
        if known is not None:
            return known
        scheme, _, token = authorization.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "Malformed Authorization header: expected `Bearer <key>`.", code="invalid_api_key")
        ident = self._by_hash.get(hash_key(token.strip()))
        if ident is None:
            if self.require:
                raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
            return self.default
        if len(self._known) < _KNOWN_MAX:
            self._known[authorization] = ident
        return ident

    def priority(self, ident: Identity, objective: bytes | None) -> int:
        if objective is None:
            return ident.priority
        name = objective.decode("latin-1")
        try:
            requested = self.objectives[name]
        except KeyError:
            raise APIError(400, f"Unknown inference objective {name[:64]!r} in x-gateway-inference-objective.",
                           param="x-gateway-inference-objective", code="unknown_objective") from None
        return capped_priority(requested, ident.max_priority)


def capped_priority(requested: int, allowed: int) -> int:
    """A client may lower its priority (e.g. ask to be sheddable), never raise it above its key's cap."""
    return min(requested, allowed)
