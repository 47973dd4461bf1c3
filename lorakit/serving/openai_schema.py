"""What OpenAI's API looks like on the wire, for `lorakit serve` (routes in openai_api.py): the request bodies of
/v1/chat/completions and /v1/completions (pydantic; a bad field is a 400 naming it), the error shape
{"error": {"message", "type", "param", "code"}}, and the two kinds of answer (chat, text) as small records.

Field names follow OpenAI's API reference (and vLLM's entrypoint, which mirrors it). What lorakit does not do is
refused by name: n > 1, logprobs, tools and function calling, penalties, logit_bias, response_format, echo, suffix.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .limits import Text

OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models")
UNSUPPORTED = ("logprobs", "top_logprobs", "tools", "tool_choice", "functions", "function_call",
               "parallel_tool_calls", "response_format", "logit_bias", "presence_penalty", "frequency_penalty",
               "echo", "suffix", "best_of")
NOT_USED = (None, False, 0, 0.0, [], {})  # values of UNSUPPORTED fields that ask for nothing (a penalty of 0)
# type and code of an error by HTTP status, as OpenAI's API sends them
ERROR_KINDS = {401: ("invalid_request_error", "invalid_api_key"), 404: ("invalid_request_error", "model_not_found"),
               413: ("invalid_request_error", "request_too_large"), 429: ("rate_limit_error", "rate_limit_exceeded"),
               500: ("server_error", None), 503: ("server_error", None)}

Stop = Annotated[Text, Field(min_length=1)]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # an unknown field is a 400 naming it


class TextPart(Body):
    type: Literal["text"]
    text: Text


class Message(Body):
    role: Literal["system", "user", "assistant"]
    content: Text | list[TextPart]
    name: str | None = None  # taken, not used: chat templates have no place for it

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class StreamOptions(Body):
    include_usage: bool = False


class Sampled(Body):
    """What both endpoints take: the model (the base model's name or an adapter's) and how to sample."""

    model: str
    max_tokens: int | None = Field(None, ge=1)  # None: --max-new-tokens, or what the model's positions leave
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)  # None: 1, as OpenAI; 0: greedy
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    stop: list[Stop] | None = Field(None, max_length=16)  # one string or a list
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # taken, not used
    logprobs: Any = None
    top_logprobs: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None
    logit_bias: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None

    @field_validator("stop", mode="before")
    @classmethod
    def _listed(cls, stop):
        return [stop] if isinstance(stop, str) else stop

    @field_validator("n")
    @classmethod
    def _one(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"only n=1 is supported (one choice per request), got {n}")
        return n

    @field_validator(*[f for f in UNSUPPORTED if f not in ("echo", "suffix", "best_of")], mode="before")
    @classmethod
    def _unsupported(cls, value, info):
        return refuse_unsupported(value, info.field_name)

    def stops(self) -> tuple[str, ...]:
        return tuple(self.stop or ())

    def sampling(self) -> tuple[float, float, int | None]:
        """(temperature, top_p, seed) with OpenAI's defaults; a greedy request has no seed (it needs none)."""
        temperature = 1.0 if self.temperature is None else self.temperature
        return temperature, 1.0 if self.top_p is None else self.top_p, self.seed if temperature > 0 else None


def refuse_unsupported(value, field: str, neutral: tuple = NOT_USED):
    """`value` if it asks for nothing (absent, false, zero, empty), else the error naming `field`."""
    if not any(type(value) is type(v) and value == v for v in neutral):
        raise ValueError(f"{field} is not supported by lorakit serve")
    return value


class ChatRequest(Sampled):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name of max_tokens

    def most_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(Sampled):
    prompt: Text
    echo: Any = None
    suffix: Any = None
    best_of: Any = None

    @field_validator("echo", "suffix", "best_of", mode="before")
    @classmethod
    def _unsupported_here(cls, value, info):
        return refuse_unsupported(value, info.field_name, NOT_USED + (1,) if info.field_name == "best_of" else NOT_USED)

    def most_tokens(self) -> int | None:
        return self.max_tokens


@dataclass(frozen=True)
class Shape:
    """One kind of answer: chat (messages in, a message out) or text (a prompt in, its continuation out)."""

    chat: bool  # the prompt goes through a chat template
    prefix: str  # of the answer's id
    whole: str  # `object` of a whole answer
    chunk: str  # `object` of a streamed piece
    choice: Callable[[str], dict]  # a whole answer's text -> its choice's fields
    piece: Callable[[str], dict]  # streamed text -> a chunk's choice's fields
    first: dict | None  # the fields of a stream's first chunk (chat: the role), None: no such chunk
    last: dict  # the fields of a stream's last chunk, the one with finish_reason


CHAT = Shape(True, "chatcmpl-", "chat.completion", "chat.completion.chunk",
             lambda text: {"message": {"role": "assistant", "content": text}},
             lambda text: {"delta": {"content": text}}, {"delta": {"role": "assistant", "content": ""}}, {"delta": {}})
TEXT = Shape(False, "cmpl-", "text_completion", "text_completion", lambda text: {"text": text},
             lambda text: {"text": text}, None, {"text": ""})


def new_id(shape: Shape) -> tuple[str, int]:
    """(id, created) of a new answer."""
    return f"{shape.prefix}{uuid.uuid4().hex}", int(time.time())


def param_of(loc: tuple) -> str:
    """OpenAI's `param` for a pydantic error's location ("body", "messages", 0, "content", "function-after[...]"):
    the field's path, without the body and the union member names pydantic adds."""
    path = []
    for part in loc[1:]:
        if not (isinstance(part, int) or part.isidentifier()) or part in ("str", "list"):
            break
        path.append(str(part))
    return ".".join(path) or "body"


def is_openai(path: str) -> bool:
    return path in OPENAI_PATHS or path.startswith("/v1/models/")


def openai_error(status: int, message: str, param: str | None = None) -> dict:
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
    kind, code = ERROR_KINDS.get(status, ("invalid_request_error", None))
    if code == "model_not_found":
        param = param or "model"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_body(path: str, status: int, message: str, param: str | None = None) -> dict:
    """The JSON answer of an error at `path`: OpenAI's shape on OpenAI's routes, the server's {"error": message}
    elsewhere."""
    return openai_error(status, message, param) if is_openai(path) else {"error": message}
