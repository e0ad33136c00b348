"""One request pipeline of explicit stages, shared by the HTTP gateway and the Envoy picker.

authenticate -> parse -> resolve -> admit -> plan -> pick -> [proxy | answer Envoy] -> account.
See `core.Pipeline` for how the stages compose and `context` for the records they pass along.
"""

from inferstack.gateway.pipeline.context import (
    Admission,
    Caller,
    Inbound,
    Outcome,
    Plan,
    RequestContext,
    Route,
    Tenant,
)
from inferstack.gateway.pipeline.core import Pipeline

__all__ = [
    "Admission",
    "Caller",
    "Inbound",
    "Outcome",
    "Pipeline",
    "Plan",
    "RequestContext",
    "Route",
    "Tenant",
]
