"""`lorakit serve`: one base model, many adapters, behind an HTTP server (FastAPI + uvicorn) that batches concurrent
requests into mixed-adapter forwards (batcher.py) and keeps adapters in an LRU under a memory budget (adapter_cache.py).

    POST   /v1/classify       {"adapter": "news", "texts": [...]}  ->  {"results": [{"label", "probabilities"}, ...]}
    POST   /v1/generate       {"adapter", "prompt", "max_new_tokens": 40, "temperature": 0, "top_p": 1}
                              ->  {"generation": ...}
    GET    /v1/adapters       the loaded adapters, LRU order, and the memory budget
    POST   /v1/adapters       {"name", "path"}: load an adapter from a path under --adapter-dir (with
                              --allow-adapter-management only)
    DELETE /v1/adapters/NAME  unload it (the same; never a pinned adapter)
    GET    /health            status and counters;  /docs: the OpenAPI docs
    POST   /v1/chat/completions, /v1/completions;  GET /v1/models: OpenAI's API (openai_api.py)

Before a request is read, serve_limits.Guard checks the API key, the number of requests in progress and the body's
size. Handlers then validate on the event loop; tokenizing and decoding run on the batcher's tokenizer thread, model
work and adapter loading on its worker thread, so /health answers whatever the requests. An adapter a request needs
is loaded before the request joins a batch: an adapter that cannot be loaded fails its own requests alone.
Every error is JSON, {"error": message}, and names no absolute server path: 400 bad adapter name, path or task,
401 no or wrong API key, 403 adapter management off, 404 unknown adapter, 409 name taken or adapter pinned,
413 over a limit (named), 422 malformed request or an adapter that cannot be loaded, 429 too many requests in
progress, 503 adapter memory full with pinned adapters, 500 anything else; the server keeps serving. OpenAI's routes
answer the same errors in OpenAI's shape, and a malformed request there with 400 (as OpenAI does), not 422.
"""

from __future__ import annotations

import contextlib
import functools

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.middleware.body_limit import RequestBodyLimitMiddleware

from ..errors import ServeError
from ..training.tasks import CAUSAL_LM, CLASSIFY
from .batcher import Batcher, Item
from .cache import (
    Settings,
    State,
    add,
    chat_template_of,
    check_name,
    end_of_turn_of,
    inside_adapter_dir,
    open_state,
    public,
    remove,
)
from .limits import Guard, Text, encode, prompt_ids, too_long
from .openai_api import openai_routes
from .openai_schema import error_body, is_openai, param_of


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # "texts": "one string" is a 422, not 10 letters


class ClassifyRequest(Strict):
    adapter: str
    texts: list[Text] = Field(min_length=1)


class GenerateRequest(Strict):
    adapter: str
    prompt: Text = Field(min_length=1)
    max_new_tokens: int = Field(40, ge=1)
    temperature: float = Field(0.0, ge=0.0, allow_inf_nan=False)  # 0: greedy, as `lorakit predict`
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)


class LoadRequest(Strict):
    name: str
    path: Text


def create_app(state: State) -> FastAPI:
    """The FastAPI app serving `state` (see the module docstring); the batcher runs while the app does."""
    batcher = Batcher(state)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        import asyncio

        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()
        batcher.close()  # never waits for a batch in progress: shutting down stays prompt

    limits = state.settings
    app = FastAPI(title="lorakit serve", lifespan=lifespan,
                  description="One base model, many LoRA adapters; concurrent requests share mixed-adapter batches.")
    app.state.batcher = batcher
    app.add_middleware(RequestBodyLimitMiddleware, max_body_size=limits.max_body_bytes)  # counts chunked bodies
    app.add_middleware(Guard, api_key=limits.api_key, max_concurrent=limits.max_concurrent_requests,
                       max_body_bytes=limits.max_body_bytes, error_body=error_body)  # added last: runs first
    _error_handlers(app, state)
    _adapter_routes(app, state, batcher)
    _task_routes(app, state, batcher)
    openai_routes(app, state, batcher)
    return app


def _adapter_routes(app: FastAPI, state: State, batcher: Batcher) -> None:
    """/health and /v1/adapters: status, and loading and unloading adapters on the worker thread."""
    limits = state.settings

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": state.model_name, "task": state.task.name, "batching": limits.batching,
                "loaded": len(state.loaded), **state.stats}

    @app.get("/v1/adapters")
    async def adapters():
        loaded = list(state.loaded.items())  # one atomic copy: the worker thread may load or evict meanwhile
        return {"adapters": [{"name": n, "pinned": e.pinned, "bytes": e.bytes, "labels": e.labels} for n, e in loaded],
                "memory_budget_bytes": int(limits.adapter_memory_mb * 2**20),
                "memory_used_bytes": sum(e.bytes for _, e in loaded)}

    @app.post("/v1/adapters", status_code=201)
    async def load_adapter(body: LoadRequest):
        _check_management(limits)
        check_name(body.name)
        path = inside_adapter_dir(state, body.path)
        entry = await batcher.call(add, state, body.name, path)  # 409 for a name taken, checked where loads are serial
        return {"name": body.name, "bytes": entry.bytes, "labels": entry.labels}

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str):
        _check_management(limits)
        check_name(name)
        await batcher.call(remove, state, name)  # 409 for a pinned adapter
        return {"unloaded": name}


def _check_management(limits: Settings) -> None:
    if not limits.allow_adapter_management:
        raise ServeError(403, "loading and unloading adapters over HTTP is off: start the server with "
                              "--allow-adapter-management (adapters under --adapter-dir still load on first use)")


def _task_routes(app: FastAPI, state: State, batcher: Batcher) -> None:
    """/v1/classify and /v1/generate: checked, their adapter loaded, tokenized off the event loop, then batched."""
    limits = state.settings
    positions = state.positions

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest, request: Request):
        if len(body.texts) > limits.max_texts:
            raise ServeError(413, f"too many texts: {len(body.texts)} > --max-texts {limits.max_texts}")
        await batcher.ready(body.adapter, CLASSIFY.endpoint)
        ids = await batcher.tokenize(lambda: [encode(state.tokenizer, t, limits.max_length, True) for t in body.texts])
        _check_tokens(len(ids) * max(map(len, ids)), limits, f"{len(ids)} texts of up to {limits.max_length} tokens")
        rows = await batcher.submit(Item(CLASSIFY.endpoint, body.adapter, ids, disconnected=request.is_disconnected))
        return {"results": [{"label": ranked[0][0], "probabilities": dict(ranked)} for ranked in rows]}

    @app.post("/v1/generate")
    async def generate(body: GenerateRequest, request: Request):
        if body.max_new_tokens > limits.max_new_tokens:
            raise ServeError(413, f"max_new_tokens {body.max_new_tokens} > --max-new-tokens {limits.max_new_tokens}")
        await batcher.ready(body.adapter, CAUSAL_LM.endpoint)
        room = int(min(positions, limits.max_batch_tokens)) - body.max_new_tokens  # the most prompt tokens
        template = chat_template_of(state, body.adapter)
        ids = await batcher.tokenize(prompt_ids, state.tokenizer, body.prompt, template, room) if room > 0 else None
        stops = end_of_turn_of(state, body.adapter)
        if ids is None:
            raise too_long(body.max_new_tokens, positions, limits)
        if not ids:
            raise ServeError(422, "the prompt has no tokens")
        options = (body.max_new_tokens, body.temperature, body.top_p, tuple(stops), None)
        rows = await batcher.submit(Item(CAUSAL_LM.endpoint, body.adapter, [ids], options, disconnected=request.is_disconnected))
        decode = functools.partial(state.tokenizer.decode, rows[0], skip_special_tokens=True)
        return {"generation": await batcher.tokenize(decode)}


def _check_tokens(tokens: int, limits: Settings, what: str) -> None:
    if tokens > limits.max_batch_tokens:
        raise ServeError(413, f"too many tokens: {what} make {tokens} > --max-batch-tokens {limits.max_batch_tokens}")


def _error_handlers(app: FastAPI, state: State) -> None:
    """Every error as JSON {"error": message} (OpenAI's routes: in OpenAI's shape), with no absolute server path in
    it."""

    def answer(request: Request, status: int, message: str, param: str | None = None, headers=None) -> JSONResponse:
        return JSONResponse(error_body(request.url.path, status, message, param), status_code=status, headers=headers)

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, e: ServeError):
        return answer(request, e.status, public(state, e.message))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        if not is_openai(request.url.path):
            return answer(request, 422, f"invalid request: {problems}")
        problems = "; ".join(f"{param_of(err['loc'])}: {err['msg']}" for err in e.errors())
        return answer(request, 400, f"invalid request: {problems}", param_of(e.errors()[0]["loc"]))  # as OpenAI

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        if e.status_code == 413:  # a body without Content-Length, counted by RequestBodyLimitMiddleware as it came
            message = f"request body over --max-body-bytes {state.settings.max_body_bytes:,}"
        else:
            message = str(e.detail)
        return answer(request, e.status_code, message, headers=e.headers)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):
        return answer(request, 500, public(state, f"internal error: {type(e).__name__}: {e}"))


def run(settings: Settings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Load the model and the pinned adapters, then serve until interrupted."""
    import uvicorn

    # SIGTERM: stop taking requests and give those in progress a few seconds, then exit whatever they do.
    uvicorn.run(create_app(open_state(settings)), host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
