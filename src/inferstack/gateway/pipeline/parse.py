"""parse: the request body, read once and parsed once with orjson."""

from __future__ import annotations

from typing import Any

import orjson

from inferstack.protocol.errors import APIError


def parse_body(body: bytes) -> dict[str, Any]:
    try:
        req = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise APIError(400, f"Request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(req, dict):
        raise APIError(400, "Request body must be a JSON object.", code="invalid_json")
    return req


MAX_MODEL_CHARS = 256


def requested_model(req: dict[str, Any]) -> str:
    model = req.get("model")
    if not isinstance(model, str) or not model:
        # OpenAI answers a missing model with 400 (a malformed request), not 404 (an unknown one)
        raise APIError(400, "You must provide a model parameter (`model`): name one of GET /v1/models.",
                       param="model", code="missing_model")
    if len(model) > MAX_MODEL_CHARS:  # no configured name is this long; never echo or audit megabytes
        raise APIError(404, f"The model `{model[:64]}...` does not exist.", param="model",
                       code="model_not_found")
    return model
