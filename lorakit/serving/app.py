"""`lorakit serve`: one base model, many adapters, behind an HTTP server (FastAPI + uvicorn) that batches concurrent
requests into mixed-adapter forwards (batcher.py) and keeps adapters in an LRU under a memory budget (adapter_cache.py).

    POST   /v1/classify       {"adapter": "news", "texts": [...]}  ->  {"results": [{"label", "probabilities"}, ...]}
    POST   /v1/generate       {"adapter", "prompt", "max_new_tokens": 40, "temperature": 0}  ->  {"generation": ...}
    GET    /v1/adapters       the loaded adapters, LRU order, and the memory budget
    POST   /v1/adapters       {"name", "path"}: load an adapter from a path under --adapter-dir
    DELETE /v1/adapters/NAME  unload it
    GET    /health            status and counters;  /docs: the OpenAPI docs

Handlers run on the event loop and only validate, tokenize and decode (the tokenizer is used on that thread alone);
model work runs on the batcher's worker thread. Every error is JSON, {"error": message}: 400 bad adapter name or
task, 403/400 paths outside --adapter-dir, 404 unknown adapter, 409 name taken, 413 over a limit (named),
422 malformed JSON or wrong types, 503 adapter memory full, 500 anything else; the server keeps serving.
"""

from __future__ import annotations

import contextlib

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from .cache import Settings, State, adapter_path, adapter_task, check_name, inside_adapter_dir
from ..errors import ServeError
from .cache import load, open_state, unload
from .batcher import Batcher, Item


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # "texts": "one string" is a 422, not 10 letters


class ClassifyRequest(Strict):
    adapter: str
    texts: list[str] = Field(min_length=1)


class GenerateRequest(Strict):
    adapter: str
    prompt: str = Field(min_length=1)
    max_new_tokens: int = Field(40, ge=1)
    temperature: float = Field(0.0, ge=0.0)  # 0: greedy, as `lorakit predict`


class LoadRequest(Strict):
    name: str
    path: str


def create_app(state: State) -> FastAPI:
    """The FastAPI app serving `state` (see the module docstring); the batcher runs while the app does."""
    batcher = Batcher(state)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        import asyncio

        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()
        batcher.worker.shutdown(wait=True)

    app = FastAPI(title="lorakit serve", lifespan=lifespan,
                  description="One base model, many LoRA adapters; concurrent requests share mixed-adapter batches.")
    _error_handlers(app)
    _adapter_routes(app, state, batcher)
    _task_routes(app, state, batcher)
    return app


def _adapter_routes(app: FastAPI, state: State, batcher: Batcher) -> None:
    """/health and /v1/adapters: status, and loading and unloading adapters on the worker thread."""
    limits = state.settings

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": state.model_path, "task": state.task, "batching": limits.batching,
                "loaded": len(state.loaded), **state.stats}

    @app.get("/v1/adapters")
    async def adapters():
        loaded = list(state.loaded.items())  # one atomic copy: the worker thread may load or evict meanwhile
        return {"adapters": [{"name": n, "pinned": e.pinned, "bytes": e.bytes, "labels": e.labels} for n, e in loaded],
                "memory_budget_bytes": int(limits.adapter_memory_mb * 2**20),
                "memory_used_bytes": sum(e.bytes for _, e in loaded)}

    @app.post("/v1/adapters", status_code=201)
    async def load_adapter(body: LoadRequest):
        check_name(body.name)
        if body.name in state.loaded:
            raise ServeError(409, f"adapter {body.name!r} is already loaded; DELETE /v1/adapters/{body.name} first")
        path = inside_adapter_dir(state, body.path)
        entry = await batcher.call(load, state, body.name, path)
        state.paths[body.name] = path
        return {"name": body.name, "bytes": entry.bytes, "labels": entry.labels}

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str):
        check_name(name)
        await batcher.call(unload, state, name)
        state.paths.pop(name, None)
        return {"unloaded": name}


def _task_routes(app: FastAPI, state: State, batcher: Batcher) -> None:
    """/v1/classify and /v1/generate: checked, tokenized here, batched and run by the batcher."""
    limits = state.settings

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest):
        _check_adapter(state, body.adapter, "classify")
        if len(body.texts) > limits.max_texts:
            raise ServeError(413, f"too many texts: {len(body.texts)} > --max-texts {limits.max_texts}")
        ids = state.tokenizer(body.texts, truncation=True, max_length=limits.max_length)["input_ids"]
        _check_tokens(len(ids) * max(map(len, ids)), limits, f"{len(ids)} texts of up to {limits.max_length} tokens")
        rows = await batcher.submit(Item("classify", body.adapter, ids))
        return {"results": [{"label": ranked[0][0], "probabilities": dict(ranked)} for ranked in rows]}

    @app.post("/v1/generate")
    async def generate(body: GenerateRequest):
        _check_adapter(state, body.adapter, "causal-lm")
        if body.max_new_tokens > limits.max_new_tokens:
            raise ServeError(413, f"max_new_tokens {body.max_new_tokens} > --max-new-tokens {limits.max_new_tokens}")
        ids = state.tokenizer(body.prompt)["input_ids"]
        _check_tokens(len(ids) + body.max_new_tokens, limits, "prompt tokens + max_new_tokens")
        rows = await batcher.submit(Item("generate", body.adapter, [ids], (body.max_new_tokens, body.temperature)))
        return {"generation": state.tokenizer.decode(rows[0], skip_special_tokens=True)}


def _check_adapter(state: State, name: str, task: str) -> None:
    adapter_path(state, name)  # 400 for a bad name, 404 for an unknown adapter
    found = adapter_task(state, name)
    if found != task:
        endpoint = "/v1/generate" if found == "causal-lm" else "/v1/classify"
        raise ServeError(400, f"adapter {name!r} is a {found} adapter: use {endpoint}")


def _check_tokens(tokens: int, limits: Settings, what: str) -> None:
    if tokens > limits.max_batch_tokens:
        raise ServeError(413, f"too many tokens: {what} make {tokens} > --max-batch-tokens {limits.max_batch_tokens}")


def _error_handlers(app: FastAPI) -> None:
    """Every error as JSON {"error": message}."""

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, e: ServeError):
        return JSONResponse({"error": e.message}, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        return JSONResponse({"error": f"invalid request: {problems}"}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):
        return JSONResponse({"error": f"internal error: {type(e).__name__}: {e}"}, status_code=500)


def run(settings: Settings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Load the model and the pinned adapters, then serve until interrupted."""
    import uvicorn

    uvicorn.run(create_app(open_state(settings)), host=host, port=port, log_level="info")
