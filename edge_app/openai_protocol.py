"""OpenAI's request and error shapes, checked: the pure half of `picospec edge-serve`.

`parse_request` turns a JSON body into a `Request` or raises `RequestError` (HTTP status, message,
offending parameter), which the server answers as {"error": {message, type, param, code}}.
"""
from __future__ import annotations

from dataclasses import dataclass

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_N, MAX_STOPS = 8, 4


class RequestError(Exception):
    """An OpenAI-shaped error: HTTP status, message, and the offending parameter."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.kind = message, param, code, status, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Request:
    messages: list[dict] | None  # chat
    prompt: str | list[int] | None  # completions
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    n: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    mode: str


def _number(body: dict, key: str, default, lo: float, hi: float, integer: bool = False):
    value = body.get(key)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok:
        raise RequestError(f"'{key}' must be {'an integer' if integer else 'a number'}", key, "invalid_type")
    if not lo <= value <= hi:
        raise RequestError(f"'{key}' must be between {lo:g} and {hi:g}, got {value}", key, "invalid_value")
    return value


def _content(message: dict, i: int) -> str:
    """A message's text: a string, or the text parts of a list."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise RequestError("message content must be a string or a list of text parts", f"messages[{i}].content",
                       "invalid_type")


def parse_messages(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise RequestError("'messages' must be a non-empty list", "messages", "invalid_type" if value else "missing")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RequestError(f"messages[{i}] needs a role of {', '.join(ROLES)}", f"messages[{i}].role",
                               "invalid_value")
        out.append({"role": ROLES[m["role"]], "content": _content(m, i)})
    return out


def parse_prompt(value) -> str | list[int]:
    """A completions prompt: text, a list of one text, or token ids."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                  for t in value):
        return list(value)
    raise RequestError("'prompt' must be a non-empty string (or token ids); one prompt per request",
                       "prompt", "invalid_type" if value is not None else "missing")


def parse_stop(value) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise RequestError(f"'stop' must be a string or a list of up to {MAX_STOPS} non-empty strings", "stop",
                           "invalid_type")
    return tuple(stops)


def parse_request(body, chat: bool, defaults) -> Request:
    """Validate an OpenAI request body; `defaults` is the server's GenerateOptions."""
    from edge_app.pipeline import MODES

    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", None, "invalid_type")
    for key in ("tools", "functions", "logprobs"):
        if body.get(key):
            raise RequestError(f"'{key}' is not supported by picospec", key, "unsupported_parameter")
    limit = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be a boolean", "stream", "invalid_type")
    n = _number(body, "n", 1, 1, MAX_N, integer=True)
    if stream and n > 1:
        raise RequestError("n > 1 is only supported without streaming", "n", "unsupported_value")
    extra = body.get("picospec") or {}
    mode = extra.get("mode", defaults.mode) if isinstance(extra, dict) else None
    if mode not in MODES:
        raise RequestError(f"picospec.mode must be one of {', '.join(MODES)}", "picospec.mode", "invalid_value")
    options = body.get("stream_options") or {}
    params = defaults.params
    return Request(
        messages=parse_messages(body.get("messages")) if chat else None,
        prompt=None if chat else parse_prompt(body.get("prompt")),
        max_tokens=_number(body, limit, defaults.max_new_tokens, 1, 1 << 20, integer=True),
        temperature=float(_number(body, "temperature", params.temperature, 0, 2)),
        top_p=float(_number(body, "top_p", params.top_p, 1e-9, 1)),
        top_k=_number(body, "top_k", params.top_k, 0, 1 << 20, integer=True),
        seed=_number(body, "seed", params.seed, -(1 << 63), (1 << 63) - 1, integer=True),
        n=n, stop=parse_stop(body.get("stop")), stream=stream,
        include_usage=bool(isinstance(options, dict) and options.get("include_usage")), mode=mode,
    )

