"""The OpenAI wire format of `lorakit deploy`: request checking and response shapes (pure functions).

Every check names the field it rejects (`param`, in OpenAI's error shape), so a client sees
`400 {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens"}}`
instead of a stack trace.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "developer")
MAX_STOP_STRINGS = 4


class ApiError(Exception):
    """An error answered as OpenAI-shaped JSON with this HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Sampling:
    """The sampling fields both endpoints share."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False


@dataclass
class ChatRequest:
    model: str
    messages: list[dict[str, str]]
    sampling: Sampling


@dataclass
class CompletionRequest:
    model: str
    prompt: str | list[int]
    sampling: Sampling


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"Invalid '{param}': {message}", param=param)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(body: dict, name: str, default, low: float, high: float, *, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    if integer and not (isinstance(value, int) and not isinstance(value, bool)):
        raise _bad(name, f"expected an integer, got {json_type(value)}.")
    if not _is_number(value):
        raise _bad(name, f"expected a number, got {json_type(value)}.")
    if not low <= value <= high:
        raise _bad(name, f"{value} is out of range: it must be between {low} and {high}.")
    return value


def json_type(value) -> str:
    """The JSON name of a Python value's type, for error messages."""
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
             dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def parse_sampling(body: dict) -> Sampling:
    """Check the shared sampling fields of a request body."""
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise _bad("stop", f"expected a string or an array of strings, got {json_type(stop)}.")
    if len(stop) > MAX_STOP_STRINGS:
        raise _bad("stop", f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stop)}.")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise _bad("stream", f"expected a boolean, got {json_type(stream)}.")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("stream_options", f"expected an object, got {json_type(options)}.")
    n = _number(body, "n", 1, 1, 1, integer=True)
    del n  # one choice per request; _number already refused anything else
    max_tokens = _number(body, "max_tokens", None, 1, 1 << 20, integer=True)
    max_tokens = _number(body, "max_completion_tokens", max_tokens, 1, 1 << 20, integer=True)
    return Sampling(
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 1e-9, 1.0),
        max_tokens=max_tokens,
        stop=[s for s in stop if s],
        seed=_number(body, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True),
        stream=bool(stream),
        include_usage=bool(options.get("include_usage", False)),
    )


def _model(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "a model name is required (see GET /v1/models)." if model is None
                   else f"expected a string, got {json_type(model)}.")
    return model


def _content(message: dict, index: int) -> str:
    content = message.get("content")
    param = f"messages[{index}].content"
    if isinstance(content, str):
        return content
    if content is None and message.get("role") == "assistant":
        return ""
    if isinstance(content, list):  # OpenAI content parts: only text parts make sense for a text model
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"{param}[{j}]", "only {'type': 'text', 'text': '...'} parts are supported.")
            texts.append(part["text"])
        return "".join(texts)
    raise _bad(param, f"expected a string or an array of text parts, got {json_type(content)}.")


def parse_messages(messages) -> list[dict[str, str]]:
    """Check `messages` and reduce each to {'role', 'content'} ('developer' counts as 'system')."""
    if messages is None:
        raise _bad("messages", "a list of messages is required.")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", f"expected a non-empty array of messages, got {json_type(messages)}"
                   + (" (empty)." if isinstance(messages, list) else "."))
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _bad(f"messages[{i}]", f"expected an object with 'role' and 'content', got {json_type(message)}.")
        role = message.get("role")
        if role not in ROLES:
            raise _bad(f"messages[{i}].role", f"{role!r} is not one of {', '.join(ROLES)}.")
        out.append({"role": "system" if role == "developer" else role, "content": _content(message, i)})
    if out[-1]["role"] == "assistant":
        raise _bad(f"messages[{len(out) - 1}].role", "the last message must not be the assistant's: "
                   "there would be nothing to answer.")
    return out


def parse_chat_request(body) -> ChatRequest:
    """A checked /v1/chat/completions request."""
    if not isinstance(body, dict):
        raise ApiError(400, f"The request body must be a JSON object, got {json_type(body)}.")
    return ChatRequest(_model(body), parse_messages(body.get("messages")), parse_sampling(body))


def parse_completion_request(body) -> CompletionRequest:
    """A checked /v1/completions request (one prompt: a string or a list of token ids)."""
    if not isinstance(body, dict):
        raise ApiError(400, f"The request body must be a JSON object, got {json_type(body)}.")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    valid_ids = isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                            for t in prompt)
    if not (isinstance(prompt, str) and prompt) and not valid_ids:
        raise _bad("prompt", "expected a non-empty string (or one array of token ids), got "
                   f"{json_type(prompt)}{' (empty)' if prompt in ('', []) else ''}.")
    if body.get("echo") or (body.get("best_of") or 1) != 1 or body.get("logprobs"):
        raise _bad("echo" if body.get("echo") else "best_of" if body.get("best_of") else "logprobs",
                   "not supported by this server.")
    return CompletionRequest(_model(body), prompt, parse_sampling(body))


# ---------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(rid: str, model: str, text: str, reason: str, use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                         "logprobs": None}], "usage": use}


def chat_chunk(rid: str, model: str, delta: dict, reason: str | None = None, use: dict | None = None) -> dict:
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
             "choices": [] if use else [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}]}
    if use:
        chunk["usage"] = use
    return chunk


def completion_response(rid: str, model: str, text: str, reason: str, use: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": reason, "logprobs": None}], "usage": use}


def completion_chunk(rid: str, model: str, text: str, reason: str | None = None, use: dict | None = None) -> dict:
    chunk = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
             "choices": [] if use else [{"index": 0, "text": text, "finish_reason": reason, "logprobs": None}]}
    if use:
        chunk["usage"] = use
    return chunk
