"""The server's state: the base model loaded once, its adapters by name, and an LRU of adapters under a memory budget.

Adapters given with --adapter are pinned (never evicted); others load from --adapter-dir on first use, and the least
recently used unpinned ones are evicted to make room. Names are identifiers, so no name reaches outside
--adapter-dir, and every path is checked to resolve inside it. Every function that changes the model runs on the
server's worker thread (batcher.py), between batches.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ServeError
from ..data.tables import load_labels
from ..io.models import load_model, resolve_model
from ..training.tasks import TASKS, task_of
from ..errors import ConfigError
from ..adapters.files import CONFIG_NAME, WEIGHTS_NAME, adapter_tensors, read_adapter_config
from ..adapters.inject import delete_adapter
from ..adapters.parts import saved_modules
from ..adapters.routing import load_adapter_with_head

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")  # adapter names: no separators, no dots, nothing to escape with


@dataclass
class Settings:
    """What `lorakit serve` takes; the limits are per request (texts, tokens) and per batch (tokens)."""

    model: str | None = None  # default: the first pinned adapter's base model
    adapters: dict[str, str] = field(default_factory=dict)  # pinned: name -> adapter or run directory
    adapter_dir: str | None = None  # adapters loaded at run time come only from here
    task: str | None = None  # default: from the adapters or the model
    max_wait_ms: float = 5.0
    max_batch_tokens: int = 8192  # padded tokens of one forward
    max_texts: int = 64
    max_length: int = 128  # tokens per text, truncated as `lorakit predict` truncates
    max_new_tokens: int = 256
    adapter_memory_mb: float = 1024.0
    batching: bool = True  # False: one request at a time with set_adapter (the benchmark's baseline)


@dataclass
class Entry:
    """A loaded adapter."""

    path: Path
    pinned: bool
    labels: list[str] | None
    bytes: int


@dataclass
class State:
    settings: Settings
    model: torch.nn.Module
    tokenizer: object
    task: str
    model_path: str
    loaded: OrderedDict = field(default_factory=OrderedDict)  # name -> Entry, least recently used first
    paths: dict = field(default_factory=dict)  # name -> directory of adapters registered by --adapter or POST
    stats: dict = field(default_factory=lambda: {"requests": 0, "batches": 0, "rows": 0, "evictions": 0})


def open_state(settings: Settings) -> State:
    """Load the base model once and the pinned adapters."""
    for name in settings.adapters:
        check_name(name)
    first = next(iter(settings.adapters.values()), None)
    model = settings.model or (read_adapter_config(first).base_model_name_or_path if first else None)
    if model is None:
        raise ConfigError("--model is needed (no --adapter names its base model)")
    path = resolve_model(model)
    task = task_of(path, first, settings.task)
    net, tokenizer = load_model(path, task)
    state = State(settings, net.eval(), tokenizer, task.name, path)
    for name, directory in settings.adapters.items():
        state.paths[name] = Path(directory)
        try:
            load(state, name, Path(directory), pinned=True)
        except ServeError as e:
            raise ConfigError(f"--adapter {name}={directory}: {e.message}") from None
    return state


def check_name(name: str) -> None:
    if not NAME.fullmatch(name):
        raise ServeError(400, f"adapter name {name!r} refused: names are letters, digits and _ (no path separators "
                              f"or dots), at most 64 characters")


def inside_adapter_dir(state: State, path: str) -> Path:
    """`path` (relative to --adapter-dir, or absolute) resolved, if it lies inside --adapter-dir; else 400/403."""
    if state.settings.adapter_dir is None:
        raise ServeError(403, "this server has no --adapter-dir: adapters cannot be loaded at run time")
    root = Path(state.settings.adapter_dir).resolve()
    found = (root / path).resolve()  # symlinks followed: a link out of the directory is refused too
    if not found.is_relative_to(root):
        raise ServeError(400, f"path {path!r} is outside --adapter-dir")
    return found


def adapter_path(state: State, name: str) -> Path:
    """Where adapter `name` loads from: registered, or --adapter-dir/name; 404 if neither holds it."""
    check_name(name)
    if name in state.loaded or name in state.paths:
        return state.loaded[name].path if name in state.loaded else state.paths[name]
    if state.settings.adapter_dir is not None:
        found = inside_adapter_dir(state, name)
        if (found / CONFIG_NAME).is_file():
            return found
    where = " or under --adapter-dir" if state.settings.adapter_dir else ""
    raise ServeError(404, f"unknown adapter {name!r}: not loaded{where}; loaded: {sorted(state.loaded)}")


def adapter_task(state: State, name: str) -> str:
    """The task of adapter `name` (its config's task_type; the server's when it names none)."""
    if name in state.loaded:
        return state.task
    return _task_named_by(read_adapter_config(adapter_path(state, name)).task_type, state.task)


def _task_named_by(peft_type: str | None, default: str) -> str:
    # The task whose PEFT task_type an adapter's file names; the server's own when it names none we know.
    return next((task.name for task in TASKS.values() if task.peft_type == peft_type), default)


def load(state: State, name: str, path: Path, pinned: bool = False, keep: set = frozenset()) -> Entry:
    """Load adapter `name` from `path`, evicting least recently used adapters (but none in `keep`) to make room."""
    try:
        config = read_adapter_config(path)
    except (FileNotFoundError, ValueError) as e:
        raise ServeError(404 if isinstance(e, FileNotFoundError) else 400, str(e)) from None
    if _task_named_by(config.task_type, state.task) != state.task:
        raise ServeError(400, f"adapter {name!r} is a {_task_named_by(config.task_type, state.task)} adapter; this "
                              f"server's model is {state.task}")
    if config.bias != "none" or config.quantize:
        raise ServeError(400, f"adapter {name!r} changes the shared base model (bias={config.bias!r}, "
                              f"quantize={config.quantize!r}): it cannot be served beside other adapters")
    weights = path / WEIGHTS_NAME
    make_room(state, weights.stat().st_size if weights.is_file() else 0, keep={name, *keep})
    try:
        load_adapter_with_head(state.model, path, name)
    except (ValueError, FileNotFoundError) as e:
        raise ServeError(400, f"adapter {name!r} could not be loaded: {e}") from None
    size = sum(t.numel() * t.element_size() for t in adapter_tensors(state.model, name).values())
    entry = state.loaded[name] = Entry(path, pinned, _labels(state, name, path), size)
    return entry


def _labels(state: State, name: str, path: Path) -> list[str] | None:
    # labels.json of a lorakit run, else LABEL_i for each output of the adapter's own head (or the model's).
    if not TASKS[state.task].labelled:
        return None
    heads = [w.modules_to_save[name] for w in saved_modules(state.model).values() if name in w.modules_to_save]
    width = getattr(heads[0], "out_features", None) if heads else state.model.config.num_labels
    labels = load_labels(path)
    if labels is not None and width is not None and len(labels) != width:
        raise ServeError(400, f"adapter {name!r}: labels.json names {len(labels)} labels, its head has {width} outputs")
    return labels or [f"LABEL_{i}" for i in range(width or state.model.config.num_labels)]


def make_room(state: State, need: int, keep: set) -> None:
    """Evict the least recently used unpinned adapters (not those in `keep`) until `need` more bytes fit."""
    budget = state.settings.adapter_memory_mb * 2**20
    while sum(e.bytes for e in state.loaded.values()) + need > budget:
        victim = next((n for n, e in state.loaded.items() if not e.pinned and n not in keep), None)
        if victim is None:
            raise ServeError(503, f"adapter memory budget ({state.settings.adapter_memory_mb:g} MiB) is full with "
                                  f"pinned or in-use adapters {sorted(state.loaded)}")
        unload(state, victim)
        state.stats["evictions"] += 1


def unload(state: State, name: str) -> None:
    if name not in state.loaded:
        raise ServeError(404, f"adapter {name!r} is not loaded; loaded: {sorted(state.loaded)}")
    delete_adapter(state.model, name)
    del state.loaded[name]


def ensure(state: State, names: set) -> dict[str, ServeError]:
    """Make `names` loaded (marking them used); {name: error} for those that could not be."""
    failed = {}
    for name in sorted(names):
        try:
            if name not in state.loaded:
                load(state, name, adapter_path(state, name), keep=names)
            state.loaded.move_to_end(name)
        except ServeError as e:
            failed[name] = e
    return failed
