"""Builders for OpenAI response bodies and stream chunks (plain dicts, serialized with orjson).

Shapes follow the official schemas in ``openai-api-subset.json`` (tests validate every builder's output
against them).
"""

from __future__ import annotations

from typing import Any

FinishReason = str | None     # "stop" | "length" | None while streaming


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


# --- chat ------------------------------------------------------------------------------------------

def chat_logprob_entry(token: str, logprob: float, top: list[tuple[str, float]] | None) -> dict[str, Any]:
    """One ``ChatCompletionTokenLogprob``; ``top`` is (token, logprob) best first."""
    return {
        "token": token,
        "logprob": logprob,
        "bytes": list(token.encode("utf-8")),
        "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))} for t, lp in (top or ())],
    }


def chat_logprobs(content: list[dict[str, Any]]) -> dict[str, Any]:
    return {"content": content, "refusal": None}


def chat_choice(index: int, content: str | None, finish_reason: str, logprobs: dict[str, Any] | None = None,
                tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_completion(id: str, created: int, model: str, choices: list[dict[str, Any]],
                    usage: dict[str, Any]) -> dict[str, Any]:
    return {"id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage}


def chat_chunk_choice(index: int, delta: dict[str, Any], finish_reason: FinishReason = None,
                      logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_chunk(id: str, created: int, model: str, choices: list[dict[str, Any]],
               usage: dict[str, Any] | None = None, include_usage_field: bool = False) -> dict[str, Any]:
    """A ``chat.completion.chunk``. With ``stream_options.include_usage`` every chunk carries ``usage``
    (null except on the final, choice-less one), as OpenAI sends it."""
    out: dict[str, Any] = {"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": choices}
    if include_usage_field or usage is not None:
        out["usage"] = usage
    return out


# --- completions -----------------------------------------------------------------------------------

def completion_logprobs(tokens: list[str], token_logprobs: list[float],
                        top_logprobs: list[dict[str, float]] | None, text_offset: list[int]) -> dict[str, Any]:
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offset}


def completion_choice(index: int, text: str, finish_reason: FinishReason,
                      logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion(id: str, created: int, model: str, choices: list[dict[str, Any]],
               usage: dict[str, Any] | None = None) -> dict[str, Any]:
    """A ``text_completion``; streamed chunks share this shape (``usage`` only where asked for)."""
    out: dict[str, Any] = {"id": id, "object": "text_completion", "created": created, "model": model,
                           "choices": choices}
    if usage is not None:
        out["usage"] = usage
    return out


# --- models ----------------------------------------------------------------------------------------

def model_card(id: str, created: int, owned_by: str = "inferstack", **extra: Any) -> dict[str, Any]:
    return {"id": id, "object": "model", "created": created, "owned_by": owned_by, **extra}


def model_list(cards: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": cards}
