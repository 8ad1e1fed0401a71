"""The OpenAI wire format, without a web framework: request bodies checked field by field into
frozen records, OpenAI-style errors, and response / stream-chunk bodies.

Mapped: ``temperature``, ``top_p``, ``max_tokens`` (or ``max_completion_tokens``), ``seed``,
``stop``, ``stream``, ``stream_options.include_usage``; extensions (as llama.cpp's server):
``top_k``, ``ignore_eos``. Refused with a 400 that names the field: what edge cannot honour
(``n`` > 1, tools, logprobs, penalties, logit_bias, a non-text response_format, echo, suffix,
best_of). Other fields (``user``, ``metadata``, ...) are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from edge.errors import PromptError

from edge.runtime.chat import GenerationOptions

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MAX_STOPS = 4  # as OpenAI
_DATA_URL = re.compile(r"data:(image/[\w.+-]+)?(;[\w=.+-]+)*;base64,(.*)", re.S | re.I)


class ApiError(Exception):
    """An HTTP error with an OpenAI-style body ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str | None = None) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code=code)


def from_prompt_error(e: PromptError, param: str | None = None) -> ApiError:
    from edge.runtime.chat import ContextFullError

    code = "context_length_exceeded" if isinstance(e, ContextFullError) else None
    return ApiError(400, str(e), param=param, code=code)


def parse_json(body: bytes) -> dict[str, Any]:
    def no_constant(name: str):
        raise ValueError(f"{name} is not valid JSON")

    try:
        data = json.loads(body, parse_constant=no_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ApiError(400, f"the request body is not valid JSON ({str(e)[:200]})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    return data


# ---------------------------------------------------------------- field checks
def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad(name, f"must be a number, got {json.dumps(v)[:40]}")
    if v > hi or v < lo or (lo_open and v == lo):
        raise bad(name, f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v}")
    return v


def _integer(body: dict, name: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(name, f"must be an integer, got {json.dumps(v)[:40]}")
    if v < lo or (hi is not None and v > hi):
        raise bad(name, f"must be an integer in [{lo}, {hi if hi is not None else 'inf'}], got {v}")
    return v


def _bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(name, f"must be true or false, got {json.dumps(v)[:40]}")
    return v


def _unsupported(body: dict, allowed_default: dict[str, Any]) -> None:
    """Fields edge cannot honour: refused unless absent, null or their neutral value."""
    for name, neutral in allowed_default.items():
        v = body.get(name)
        if v is None or v == neutral or (isinstance(neutral, tuple) and v in neutral):
            continue
        raise bad(name, f"is not supported by edge-serve (got {json.dumps(v)[:60]})", code="unsupported_parameter")


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise bad("stop", "must be a string or a list of strings")
    if len(v) > MAX_STOPS:
        raise bad("stop", f"at most {MAX_STOPS} stop strings, got {len(v)}")
    return tuple(s for s in v if s)


@dataclass(frozen=True)
class Request:
    """A checked request: ``messages`` (chat; edge content parts, images as bytes) or ``prompt``
    (completions: a str or token ids)."""

    kind: str  # "chat" | "completion"
    model: str
    options: GenerationOptions
    stream: bool
    include_usage: bool
    messages: tuple = ()
    prompt: str | tuple[int, ...] = ""


def _common(body: dict, served: str, max_tokens_limit: int, default_max_tokens: int) -> dict[str, Any]:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", "must be a string")
    if model is not None and model != served:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {served!r}",
                       param="model", code="model_not_found")
    _integer(body, "n", 1, 1, 1)
    _unsupported(body, {"logit_bias": {}, "presence_penalty": 0, "frequency_penalty": 0})
    max_tokens = body.get("max_tokens")
    name = "max_tokens"
    if max_tokens is None and body.get("max_completion_tokens") is not None:
        name = "max_completion_tokens"
    max_tokens = _integer(body, name, None, 1)
    if max_tokens is not None and max_tokens > max_tokens_limit:
        raise bad(name, f"{max_tokens} is more than this server allows ({max_tokens_limit})", code="max_tokens_exceeded")
    seed = _integer(body, "seed", None, -(1 << 63), (1 << 64) - 1)
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and (not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool)):
        raise bad("stream_options", "must be an object like {\"include_usage\": true}")
    if opts is not None and not stream:
        raise bad("stream_options", "is only allowed with stream: true")
    try:
        options = GenerationOptions(
            max_new_tokens=max_tokens if max_tokens is not None else default_max_tokens,
            temperature=_number(body, "temperature", 1.0, 0.0, 2.0),  # OpenAI's default; 0 = greedy
            top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
            top_k=_integer(body, "top_k", 0, 0),
            seed=None if seed is None else seed % (1 << 64),
            stop=_stop(body),
            ignore_eos=_bool(body, "ignore_eos"))
    except PromptError as e:
        raise ApiError(400, str(e)) from None
    return dict(model=served, options=options, stream=stream, include_usage=bool(opts and opts.get("include_usage")))


def _image(url: Any, where: str) -> bytes:
    if isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str):
        raise bad(where, "image_url must be {\"url\": \"data:image/...;base64,...\"}")
    m = _DATA_URL.fullmatch(url.strip())
    if not m:
        raise bad(where, "only data: URLs with base64 image data are accepted (the server fetches nothing)")
    try:
        return base64.b64decode(m.group(3), validate=True)
    except (binascii.Error, ValueError):
        raise bad(where, "the data: URL's base64 payload is invalid") from None


def _content(content: Any, where: str, vision: bool) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad(where, "must be a string or a list of content parts")
    parts: list[dict[str, Any]] = []
    for j, p in enumerate(content):
        pw = f"{where}[{j}]"
        kind = p.get("type") if isinstance(p, dict) else None
        if kind == "text":
            if not isinstance(p.get("text"), str):
                raise bad(pw, "a text part needs a string 'text'")
            parts.append({"type": "text", "text": p["text"]})
        elif kind == "image_url":
            if not vision:
                raise bad(pw, "this model is text-only; it takes no images", code="images_not_supported")
            parts.append({"type": "image", "image": _image(p.get("image_url"), pw)})
        else:
            raise bad(pw, f"unsupported content part type {json.dumps(kind)[:40]} (text, image_url)")
    return parts


def parse_chat(body: dict, served: str, max_tokens_limit: int, default_max_tokens: int, vision: bool) -> Request:
    _unsupported(body, {"tools": [], "tool_choice": ("none", "auto"), "functions": [], "function_call": ("none", "auto"),
                        "logprobs": False, "top_logprobs": 0, "response_format": {"type": "text"}, "audio": {},
                        "modalities": (["text"],), "prediction": {}})
    common = _common(body, served, max_tokens_limit, default_max_tokens)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "must be a non-empty list of {\"role\": ..., \"content\": ...}")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, "must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {json.dumps(role)[:40]}")
        content = m.get("content")
        if content is None and role == "assistant" and not m.get("tool_calls"):
            content = ""
        if m.get("tool_calls"):
            raise bad(f"{where}.tool_calls", "tool calls are not supported by edge-serve", code="unsupported_parameter")
        out.append({"role": ROLES[role], "content": _content(content, f"{where}.content", vision)})
    return Request("chat", messages=tuple(out), **common)


def parse_completion(body: dict, served: str, max_tokens_limit: int, vocab_size: int) -> Request:
    _unsupported(body, {"suffix": "", "echo": False, "best_of": 1, "logprobs": 0})
    common = _common(body, served, max_tokens_limit, min(16, max_tokens_limit))  # OpenAI's default: 16
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one
    if isinstance(p, str):
        if not p:
            raise bad("prompt", "is empty")
        prompt: str | tuple[int, ...] = p
    elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        if any(not 0 <= t < vocab_size for t in p):
            raise bad("prompt", f"token ids must be in [0, {vocab_size})")
        prompt = tuple(p)
    elif isinstance(p, list) and len(p) > 1:
        raise bad("prompt", "one prompt per request (batches are not supported)")
    else:
        raise bad("prompt", "must be a non-empty string or a list of token ids")
    return Request("completion", prompt=prompt, **common)


# ---------------------------------------------------------------- responses
def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def response(kind: str, rid: str, model: str, text: str, finish: str, use: dict[str, Any]) -> dict[str, Any]:
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice],
            "usage": use, "system_fingerprint": _fingerprint()}


def chunk(kind: str, rid: str, model: str, created: int, text: str | None = None, finish: str | None = None,
          first: bool = False, use: dict[str, Any] | None = None) -> dict[str, Any]:
    """One streamed chunk: text (``first``: the chat role delta), the final one (``finish``), or the
    usage chunk (``use``: no choices, as OpenAI's include_usage sends it)."""
    if use is not None:
        choices = []
    elif kind == "chat":
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
        if text:
            delta["content"] = text
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    else:
        choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
    out = {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion", "created": created,
           "model": model, "choices": choices, "system_fingerprint": _fingerprint()}
    if use is not None:
        out["usage"] = use
    return out


def sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def _fingerprint() -> str:
    from edge import __version__

    return f"edge-{__version__}"
