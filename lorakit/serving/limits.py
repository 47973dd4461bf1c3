"""What `lorakit serve` refuses before doing any work, and how it keeps big texts cheap.

`Guard` is the ASGI middleware in front of the app: the API key, the cap on requests in progress and the body's
declared size, each answered with a JSON error before a byte of the body is read. (A body sent without a
Content-Length is counted as it streams by Starlette's RequestBodyLimitMiddleware, which serve.py adds inside.)
Hand-written because neither uvicorn nor Starlette has the two others: uvicorn's --limit-concurrency answers 503
where clients expect 429 to mean "retry later", and FastAPI's security dependencies guard routes, not /docs and
/openapi.json, which the key must guard too.

`encode` tokenizes only as much of a text as decides its tokens: a 5 MB text costs what 4 KB do.
"""

from __future__ import annotations

import functools
import secrets
from typing import Annotated, Callable

from pydantic import AfterValidator
from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from ..errors import DataError, ServeError
from .generation import prompt_text, with_template

OPEN_PATHS = ("/health",)  # answered without a key and outside the concurrency cap, so that probes always get in
CHARS_PER_TOKEN = 32  # a text's first N tokens are looked for in its first 32·N characters


class Guard:
    """ASGI middleware: 401 without the API key (when one is set), 429 past `max_concurrent` requests in progress,
    413 for a declared body over `max_body_bytes`. /health passes the first two."""

    def __init__(self, app, api_key: str | None, max_concurrent: int, max_body_bytes: int,
                 error_body: Callable[[str, int, str], dict] = lambda path, status, message: {"error": message}):
        self.app, self.api_key, self.max_concurrent, self.max_body_bytes = app, api_key, max_concurrent, max_body_bytes
        self.error_body = error_body  # (path, status, message) -> the JSON answer: routes may have their own shape
        self.in_progress = 0  # on the event loop only: no lock needed

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self.refusal(scope)
        if refusal is not None:
            status, message, headers = refusal
            body = self.error_body(scope["path"], status, message)
            return await JSONResponse(body, status, headers)(scope, receive, send)
        if scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        self.in_progress += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_progress -= 1

    def refusal(self, scope) -> tuple[int, str, dict | None] | None:
        """(status, message, headers) of the answer that refuses this request, or None to let it in."""
        headers = Headers(scope=scope)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return 413, f"request body of {int(declared):,} bytes > --max-body-bytes {self.max_body_bytes:,}", None
        if scope["path"] in OPEN_PATHS:
            return None
        if self.api_key is not None and not _bearer_matches(headers.get("authorization", ""), self.api_key):
            return 401, "missing or wrong API key: send 'Authorization: Bearer KEY'", {"WWW-Authenticate": "Bearer"}
        if self.in_progress >= self.max_concurrent:
            message = f"{self.in_progress} requests in progress: --max-concurrent-requests {self.max_concurrent}"
            return 429, message + "; retry later", {"Retry-After": "1"}
        return None


def _bearer_matches(header: str, key: str) -> bool:
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), key.encode())


def encode(tokenizer, text: str, max_tokens: int, truncate: bool, special: bool = True) -> list[int] | None:
    """The token ids of `text` as tokenizing all of it gives them: truncated to `max_tokens` (truncate=True), else
    all of them, or None when there are more than `max_tokens`. A long text is first tried by its head (cut before
    a whitespace, within CHARS_PER_TOKEN·max_tokens characters): when the head alone reaches the limit, its tokens are
    the text's; only a text whose head falls short (say, a run of spaces) is tokenized in full. `special`: the
    tokenizer's special tokens added (not for a text a chat template rendered: it writes its own)."""
    tokenize = functools.partial(tokenizer, add_special_tokens=special)
    head = _head(text, CHARS_PER_TOKEN * max_tokens)
    if head is not text and len(tokenize(head, truncation=True, max_length=max_tokens + 1)["input_ids"]) > max_tokens:
        return tokenize(head, truncation=True, max_length=max_tokens)["input_ids"] if truncate else None
    ids = tokenize(text, **({"truncation": True, "max_length": max_tokens} if truncate else {}))["input_ids"]
    return ids if truncate or len(ids) <= max_tokens else None


def _unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON's "\ud800": a lone surrogate no tokenizer can take
        raise ValueError(f"not valid Unicode: {e.reason} at character {e.start}") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]


def _head(text: str, chars: int) -> str:
    # `text` itself if short; else its first `chars` characters cut back to just before a whitespace, where the
    # tokenizers in use (WordPiece, byte-level BPE, SentencePiece) start a new word: the head's tokens are the text's.
    if len(text) <= chars:
        return text
    cut = text[:chars]
    space = max(map(cut.rfind, " \n\t\r"))
    return cut[:space] if space > 0 else cut


def prompt_ids(tokenizer, prompt: str | list[dict], template: str | None, max_tokens: int,
               chat: bool | None = None) -> list[int] | None:
    """The prompt's token ids (None past `max_tokens`) as `lorakit predict` makes them: an adapter trained on
    conversations (its chat `template`) gets the prompt as a user turn (or the messages `prompt` holds) with the
    assistant's turn opened. chat=False: the prompt as it is (OpenAI's /v1/completions). The ids that end the answer
    are the adapter's own (cache.end_of_turn_of), found once when it loads."""
    view = with_template(tokenizer, template)
    chat = template is not None if chat is None else chat
    try:
        text = prompt_text(view, prompt, chat=chat)
    except DataError as e:
        raise ServeError(422, f"the chat template cannot render this prompt: {e}") from None
    return encode(view, text, max_tokens, False, special=not chat)


def too_long(max_new_tokens: int, positions: float, limits) -> ServeError:
    """The error for a prompt with no room for `max_new_tokens` more tokens: 422 past the model's positions, 413
    past --max-batch-tokens (serving.cache.Settings `limits`)."""
    if positions <= limits.max_batch_tokens:
        return ServeError(422, f"prompt tokens + max_new_tokens {max_new_tokens} are more than the model's "
                               f"{int(positions)} positions")
    return ServeError(413, f"too many tokens: prompt tokens + max_new_tokens {max_new_tokens} > --max-batch-tokens "
                           f"{limits.max_batch_tokens}")
