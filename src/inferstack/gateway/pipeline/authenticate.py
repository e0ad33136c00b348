"""authenticate: API key -> identity, tenant and priority; then whether it may use the model.

Runs on the headers alone, before the body is parsed, so an unauthenticated caller never gets its
body parsed (and the Envoy picker can refuse it at the headers phase).
"""

from __future__ import annotations

from collections.abc import Mapping

from inferstack.gateway.auth import KeyStore
from inferstack.gateway.pipeline.context import Caller, Tenant
from inferstack.protocol.errors import APIError


class Authenticator:
    def __init__(self, keys: KeyStore, tenants: Mapping[str, Tenant]):
        self.keys = keys
        self.tenants = tenants

    def authenticate(self, headers: Mapping[bytes, bytes]) -> Caller:
        ident = self.keys.identify(headers.get(b"authorization"))
        priority = self.keys.priority(ident, headers.get(b"x-gateway-inference-objective"))
        return Caller(ident, self.tenants.get(ident.tenant), priority)

    @staticmethod
    def authorize(caller: Caller, model: str) -> None:
        if caller.ident.models is not None and model not in caller.ident.models:
            raise APIError(
                403, f"This API key may not use the model `{model}`.", param="model", code="model_not_allowed"
            )
