"""Which KV transfer peers a decode engine may pull from (the SSRF guard of PD disaggregation).

A decode request's ``kv_transfer_params`` name a host and port the engine connects to. They come
from the prefill engine's response, relayed by the gateway; a client that could set them could make
the decode engine open TCP connections to any address it can reach. So a decode engine pulls only
when the params pass its `TransferTrust`:

- ``secret`` (``INFERSTACK_KV_TRANSFER_SECRET``; `inferstack up` generates one per stack): the
  prefill engine signs the params it returns (HMAC-SHA256 in ``transfer_sig``), the decode engine
  checks the signature. Nobody without the secret can name a peer.
- ``peers`` (``--kv-transfer-peers host[:port],...``): the peer must be on the list (a bare host
  allows any port of it: prefill engines usually take an OS-chosen transfer port).

With both set, both must pass. A decode engine with neither refuses to start (see `EngineConfig`).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

SIG_FIELD = "transfer_sig"
# kv_reuse: the gateway's cross-replica read (it signs these itself; absent in PD, signed as "").
# remote_agent .. remote_block_hash: a NIXL prefill engine's direct READ (`transports.DirectRead`; absent: "").
_SIGNED = ("remote_host", "remote_port", "remote_request_id", "remote_num_blocks", "kv_reuse",
           "remote_agent", "remote_hold", "remote_block_ids", "remote_block_hash")


@dataclass(frozen=True)
class TransferTrust:
    peers: frozenset[str] = frozenset()     # "host" or "host:port"
    secret: bytes | None = None

    @classmethod
    def from_config(cls, peers: tuple[str, ...], secret: str | None) -> TransferTrust:
        return cls(frozenset(p.strip().lower() for p in peers if p.strip()), secret.encode() if secret else None)

    @property
    def configured(self) -> bool:
        return bool(self.peers) or self.secret is not None

    def sign(self, params: dict[str, Any]) -> dict[str, Any]:
        """The params with a signature when this engine has a secret (prefill side)."""
        if self.secret is None:
            return params
        return {**params, SIG_FIELD: self._mac(params)}

    def refusal(self, params: dict[str, Any]) -> str | None:
        """Why the decode side must not pull from these params, or None when it may."""
        if not self.configured:
            return "no --kv-transfer-peers and no transfer secret: remote prefill is off"
        if self.secret is not None:
            given = params.get(SIG_FIELD)
            if not isinstance(given, str) or not hmac.compare_digest(given, self._mac(params)):
                return "kv_transfer_params are not signed with this stack's transfer secret"
        if self.peers:
            host = str(params.get("remote_host", "")).lower()
            if host not in self.peers and f"{host}:{params.get('remote_port')}" not in self.peers:
                return f"transfer peer {host}:{params.get('remote_port')} is not in --kv-transfer-peers"
        return None

    def _mac(self, params: dict[str, Any]) -> str:
        assert self.secret is not None
        message = "\n".join(str(params.get(k, "")) for k in _SIGNED).encode()
        return hmac.new(self.secret, message, hashlib.sha256).hexdigest()
