"""Dynamic batching for `lorakit serve`: requests gathered into mixed-adapter batches, run on one worker thread.

The batcher (an asyncio task) takes queued requests, waiting up to max_wait_ms for more when the queue is empty, up to
max_batch_tokens padded tokens, whatever their adapters, and drops those whose client has gone. The worker thread
loads and evicts adapters (adapter_cache) and runs one routed forward, or one generate, per kind of request in the
batch: each row through its own adapter and head (routing.route). When the batch's adapters do not fit in memory
together, it runs in groups that do, one after the other. Results go back to each request's future; a failure
(an adapter that cannot be loaded, a forward that raises) fails only its own requests. Tokenizing and decoding run on
a second thread of their own (the tokenizer is used there alone), so that the event loop only ever waits.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..adapters.inject import set_adapter
from ..adapters.routing import route
from ..errors import MemoryFull, ServeError
from ..training.tasks import CAUSAL_LM, CLASSIFY
from .cache import State, adapter_task, use
from .generation import Sampling, generate_ids


@dataclass
class Item:
    """One request waiting for the worker."""

    kind: str  # classify | generate
    adapter: str | None  # None: the base model (generate only)
    ids: list[list[int]]
    options: tuple = ()  # generate: (max_new_tokens, temperature, top_p, ids that end an answer, seed)
    future: asyncio.Future | None = None
    disconnected: Callable[[], Awaitable[bool]] | None = None  # whether the client has gone (Request.is_disconnected)
    on_token: Callable[[int], bool] | None = None  # generate, one prompt: called on the worker thread with each token
    # as it is generated (the one ending the answer too); True stops this row (a stop string, a client that left)

    def padded(self) -> tuple[int, int]:
        extra = self.options[0] if self.kind == CAUSAL_LM.endpoint else 0
        return len(self.ids), max(len(i) for i in self.ids) + extra


# ---- one batch on the worker thread ----

def run_batch(state: State, batch: list[Item]) -> list:
    """Results (or exceptions) for every item of `batch`: per group of adapters that fit in memory together, the
    adapters loaded, then one forward per kind of request."""
    results = {}
    for items in fitting_groups(state, batch, results):
        groups = {}
        for item in items:
            seeded = item.kind == CAUSAL_LM.endpoint and item.options[4] is not None
            # A seeded request runs alone: its random numbers, hence its text, are then those of no other batch.
            groups.setdefault((item.kind, item.options, id(item) if seeded else None), []).append(item)
        for (kind, _, _), same in groups.items():
            try:
                rows = (classify_rows if kind == CLASSIFY.endpoint else generate_rows)(state, same)
            except Exception as e:  # noqa: BLE001 (a failed forward fails its requests, never the server)
                rows = [e] * len(same)
            results.update({id(item): r for item, r in zip(same, rows)})
    state.stats["batches"] += 1
    state.stats["requests"] += len(batch)
    state.stats["rows"] += sum(len(item.ids) for item in batch)
    return [results[id(item)] for item in batch]


def fitting_groups(state: State, batch: list[Item], results: dict):
    """The items of `batch` in groups whose adapters are loaded together, each group yielded once its adapters are
    in memory (the next group may evict them). An adapter that cannot be loaded, or does not fit even alone, puts
    its error in `results` for its own items."""
    by_adapter = {}
    for item in batch:
        by_adapter.setdefault(item.adapter, []).append(item)
    group = []
    for name, items in by_adapter.items():
        error = use(state, name, keep=group) if name is not None else None  # None: the base model, always there
        if isinstance(error, MemoryFull) and group:  # run what fits, then start over with this adapter
            yield [item for n in group for item in by_adapter[n]]
            group = []
            error = use(state, name)
        if error is None:
            group.append(name)
        else:
            results.update({id(item): error for item in items})
    if group:
        yield [item for n in group for item in by_adapter[n]]


def padded_batch(ids: list[list[int]], pad: int, left: bool, device="cpu") -> dict[str, torch.Tensor]:
    """input_ids and attention_mask padded to the longest row (on the left for generation), on `device`."""
    width = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        where = slice(width - len(row), width) if left else slice(0, len(row))
        input_ids[i, where], mask[i, where] = torch.tensor(row, dtype=torch.long), 1
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}


@contextlib.contextmanager
def _adapters_of(state: State, names: list[str]):
    # Batching: each row through its own adapter. Otherwise (one request per batch): set_adapter, the usual way (a
    # route of one row to None for the base model: set_adapter has no "no adapter").
    if state.settings.batching or names[0] is None:
        with route(state.model, names):
            yield
    else:
        set_adapter(state.model, names[0])
        yield


@torch.no_grad()
def classify_rows(state: State, items: list[Item]) -> list[list[tuple[str, float]]]:
    """Per item, per text: (label, probability) pairs of the adapter's own labels, most probable first."""
    names = [item.adapter for item in items for _ in item.ids]
    batch = padded_batch([row for item in items for row in item.ids], state.tokenizer.pad_token_id or 0, left=False,
                         device=state.model.device)
    with _adapters_of(state, names):
        logits = state.model(**batch).logits.float()
    out, i = [], 0
    for item in items:
        labels = state.loaded[item.adapter].labels
        probs = logits[i:i + len(item.ids), :len(labels)].softmax(-1).tolist()
        out.append([sorted(zip(labels, p), key=lambda lp: -lp[1]) for p in probs])
        i += len(item.ids)
    return out


@torch.no_grad()
def generate_rows(state: State, items: list[Item]) -> list[list[list[int]]]:
    """Per item, per prompt: the generated token ids (all items share max_new_tokens, temperature, top_p, the ids
    that end an answer and the seed), decoded as `lorakit predict` decodes (generation.generate_ids)."""
    max_new_tokens, temperature, top_p, stops, seed = items[0].options
    names = [item.adapter for item in items for _ in item.ids]
    pad = state.tokenizer.pad_token_id or 0
    batch = padded_batch([row for item in items for row in item.ids], pad, left=True, device=state.model.device)
    watching = any(item.on_token is not None for item in items)
    with _adapters_of(state, names):
        ids = generate_ids(state.model, state.tokenizer, batch, Sampling(max_new_tokens, temperature, top_p, seed),
                           stop_ids=list(stops), on_step=each_token(items, set(stops)) if watching else None)
    new = ids[:, batch["input_ids"].shape[1]:].tolist()
    out, i = [], 0
    for item in items:
        out.append(new[i:i + len(item.ids)])
        i += len(item.ids)
    return out


def each_token(items: list[Item], stops: set[int]) -> Callable[[list[int]], list[bool]]:
    """generate_ids' on_step for `items`: each row's new token to its item's on_token while the row's answer goes
    on; per row, whether it is over (an end id, or on_token said so)."""
    rows = [item for item in items for _ in item.ids]
    over = [False] * len(rows)

    def on_step(tokens: list[int]) -> list[bool]:
        for i, (item, token) in enumerate(zip(rows, tokens)):
            if not over[i]:  # after its end a row gets padding: not the answer's
                stop = item.on_token(token) if item.on_token is not None else False
                over[i] = stop or token in stops
        return over

    return on_step


# ---- the batcher ----

class Batcher:
    """Gathers queued requests into batches and runs them on the worker thread, one batch at a time."""

    def __init__(self, state: State):
        self.state, self.queue, self.carry = state, asyncio.Queue(), None
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorakit-serve")
        self.tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorakit-tokenize")

    async def submit(self, item: Item):
        item.future = asyncio.get_running_loop().create_future()
        await self.queue.put(item)
        return await item.future

    async def call(self, fn, *args):
        """fn(*args) on the worker thread, between batches."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    async def tokenize(self, fn, *args):
        """fn(*args) on the tokenizer's thread: the event loop goes on answering meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizing, fn, *args)

    async def ready(self, name: str | None, endpoint: str) -> None:
        """Check that adapter `name` exists and is served at `endpoint`, and load it now if it is not: a failure to
        load is this request's error, before it can join a batch with others. None: the base model, for generation
        when the server's model generates."""
        state = self.state
        found = state.task if name is None else adapter_task(state, name)  # 400 bad name, 404 unknown, 422 bad config
        if found.endpoint != endpoint:
            what = f"adapter {name!r} is a {found.name} adapter" if name else f"the base model is a {found.name} model"
            raise ServeError(400, f"{what}: use {found.endpoint}")
        if name is not None and name not in state.loaded:
            error = await self.call(use, state, name)
            if error is not None:
                raise error

    async def run(self) -> None:
        while True:
            batch = [item for item in await self.gather() if not await self.abandoned(item)]
            if not batch:
                continue
            try:
                results = await self.call(run_batch, self.state, batch)
            except Exception as e:  # noqa: BLE001 (run_batch catches per group; this is the last line of defence)
                results = [e] * len(batch)
            for item, result in zip(batch, results):
                if not item.future.done():  # a client that went away cancelled its future
                    (item.future.set_exception if isinstance(result, BaseException) else item.future.set_result)(result)

    async def abandoned(self, item: Item) -> bool:
        """Whether nobody waits for `item` any more (its client disconnected): then it is dropped, never computed."""
        gone = item.future.done() or (item.disconnected is not None and await item.disconnected())
        if gone:
            _fail(item, ServeError(499, "the client closed the connection"))  # nginx's code; nobody reads it
            self.state.stats["abandoned"] += 1
        return gone

    def close(self) -> None:
        """Fail what is still queued and let the threads go (at shutdown)."""
        stopping = ServeError(503, "the server is shutting down")
        while not self.queue.empty():
            _fail(self.queue.get_nowait(), stopping)
        if self.carry is not None:
            _fail(self.carry, stopping)
        self.worker.shutdown(wait=False, cancel_futures=True)
        self.tokenizing.shutdown(wait=False, cancel_futures=True)

    async def gather(self) -> list[Item]:
        first = self.carry or await self.queue.get()
        self.carry, batch = None, [first]
        settings = self.state.settings
        if not settings.batching:
            return batch
        if self.queue.empty() and settings.max_wait_ms > 0:
            await asyncio.sleep(settings.max_wait_ms / 1000)  # let concurrent requests arrive
        rows, longest = first.padded()
        while not self.queue.empty():
            item = self.queue.get_nowait()
            n, width = item.padded()
            if (rows + n) * max(longest, width) > settings.max_batch_tokens:
                self.carry = item  # starts the next batch
                break
            batch.append(item)
            rows, longest = rows + n, max(longest, width)
        return batch


def _fail(item: Item, error: ServeError) -> None:
    if not item.future.done():
        item.future.set_exception(error)
