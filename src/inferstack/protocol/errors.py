"""The OpenAI error envelope and the mapping from exceptions to HTTP statuses.

Every HTTP error leaves our servers as ``{"error": {"message", "type", "param", "code"}}``; clients
(the official SDKs included) pick the exception class from the status and show ``message``.
"""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import ValidationError

# OpenAI's error `type` for each status we emit.
_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "service_unavailable_error",
    504: "server_error",
}


class APIError(Exception):
    """An error that becomes an HTTP response with the OpenAI envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def envelope(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def body(self) -> bytes:
        return orjson.dumps(self.envelope())

    def __repr__(self) -> str:
        return f"APIError({self.status}, {self.message!r}, param={self.param!r}, code={self.code!r})"


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def not_supported(feature: str, param: str) -> APIError:
    return APIError(400, f"{feature} is not supported yet", param=param, code="unsupported_parameter")


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> bytes:
    return APIError(status, message, param=param, code=code).body()


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "constrained-int", "constrained-float"}


def _is_union_tag(part: Any) -> bool:
    """Pydantic labels union branches in locations ("str", "list[int]"): noise to a client."""
    return isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or part.startswith("function-"))


def loc_to_param(loc: tuple[Any, ...]) -> str | None:
    """Pydantic's error location ``("messages", 0, "content")`` as ``messages[0].content``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _is_union_tag(part):
            out += f".{part}" if out else str(part)
    return out or None


def from_validation_error(exc: ValidationError) -> APIError:
    err = exc.errors(include_url=False, include_context=False, include_input=False)[0]
    if err["type"] == "json_invalid":
        return APIError(400, f"The request body is not valid JSON: {err['msg']}", code="invalid_json")
    if err["type"] == "model_type" and not err["loc"]:
        return APIError(400, "The request body must be a JSON object", code="invalid_json")
    param = loc_to_param(tuple(err["loc"]))
    if any(_is_union_tag(p) for p in err["loc"]):
        # one error per union branch: say what each branch wanted
        msgs = dict.fromkeys(e["msg"] for e in exc.errors(include_url=False)
                             if (loc_to_param(tuple(e["loc"])) or "").startswith(param or ""))
        message = f"{param}: no accepted form matches ({'; or '.join(list(msgs)[:4])})"
    else:
        message = f"{param}: {err['msg']}" if param else err["msg"]
    return APIError(400, message, param=param, code="invalid_type" if "type" in err["type"] else "invalid_value")


def error_from_exception(exc: BaseException) -> APIError | None:
    """The client-facing error for ``exc``, or None when it is internal (the caller logs it, sends 500).

    A ``ValueError`` carrying a ``param`` attribute (e.g. the engine's SamplingParamError) is a bad value
    the client sent; a bare ValueError is not trusted to be the client's fault.
    """
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValidationError):
        return from_validation_error(exc)
    if isinstance(exc, orjson.JSONDecodeError):
        return APIError(400, f"The request body is not valid JSON: {exc}", code="invalid_json")
    if isinstance(exc, ValueError) and isinstance(getattr(exc, "param", None), str):
        return APIError(400, str(exc), param=exc.param, code="invalid_value")
    return None


def internal_error(request_id: str | None = None) -> APIError:
    ref = f" (request id {request_id})" if request_id else ""
    return APIError(500, f"Internal server error{ref}; the server logged the details.", code="internal_error")
