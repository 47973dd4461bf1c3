"""The server's state: the base model loaded once, its adapters by name, and an LRU of adapters under a memory budget.

Adapters given with --adapter are pinned (never evicted, never unloaded); others load from --adapter-dir on first use,
and the least recently used unpinned ones are evicted to make room. Names are identifiers, so no name reaches outside
--adapter-dir, and every path, and every file of an adapter loaded from there, is checked to resolve inside it. Any
failure to load an adapter is a ServeError naming it (422), never an exception that could reach other requests.
Every function that changes the model runs on the server's worker thread (batcher.py), between batches. Messages
the client sees name adapters and paths relative to --adapter-dir, never the server's absolute paths (`public`).
"""

from __future__ import annotations

import re
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapters.files import CONFIG_NAME, WEIGHTS_NAME, adapter_tensors, read_adapter_config
from ..adapters.inject import delete_adapter
from ..adapters.parts import saved_modules
from ..adapters.routing import load_adapter_with_head
from ..data.tables import load_labels
from ..errors import ConfigError, MemoryFull, ServeError
from ..io.models import load_model, positions, resolve_model, within_positions
from ..training.rundir import saved_chat_template
from ..training.settings import setting
from ..training.tasks import TASKS, Task, task_of
from ..training.trained import default_device
from .generation import end_of_turn_ids, with_template

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")  # adapter names: no separators, no dots, nothing to escape with


SERVER, LIMITS, ACCESS = "Model and adapters", "Batching and limits", "Access"


@dataclass
class Settings:
    """What `lorakit serve` takes (each field is a flag of it, made by cli/options.py); the limits are per request
    (texts, tokens, bytes) and per batch (tokens)."""

    model: str | None = setting(None, SERVER, "Base model (default: the first adapter's base model).")
    adapters: dict[str, str] = setting(None, SERVER, "NAME=DIR, repeatable: adapters loaded at start and never "
                                       "evicted (a run directory or an adapter directory).", flag="--adapter")
    adapter_dir: str | None = setting(None, SERVER, "Adapters loaded by name on first use, the least recently used "
                                      "evicted; nothing outside this directory is read.")
    task: str | None = setting(None, SERVER, f"{' | '.join(TASKS)} (default: from the adapters or model).")
    max_wait_ms: float = setting(5.0, LIMITS, "How long a batch waits for more requests.")
    max_batch_tokens: int = setting(8192, LIMITS, "Padded tokens in one batch (and the most one request may use).")
    max_texts: int = setting(64, LIMITS, "Texts in one classify request.")
    max_length: int = setting(128, LIMITS, "Tokens per text (longer ones truncated, as predict does).")
    max_new_tokens: int = setting(256, LIMITS, "Most tokens one generate request may ask for.")
    adapter_memory_mb: float = setting(1024.0, LIMITS, "Memory budget of the loaded adapters, MiB.")
    batching: bool = setting(True, LIMITS, "Mixed-adapter batches; off: one request at a time with set_adapter (the "
                             "baseline the serving benchmark compares with).")
    max_body_bytes: int = setting(2_000_000, LIMITS, "Largest request body; past it 413, before more is read.")
    max_concurrent_requests: int = setting(256, LIMITS, "Requests in progress at once (/health aside); past it 429.")
    api_key: str | None = setting(None, ACCESS, "Every route but /health then needs 'Authorization: Bearer KEY' "
                                  "(else 401).", envvar="LORAKIT_API_KEY")
    allow_adapter_management: bool = setting(False, ACCESS, "Let clients load and unload adapters (POST/DELETE "
                                             "/v1/adapters; else 403).")

    def __post_init__(self):
        self.adapters = dict(self.adapters or {})
        self.api_key = self.api_key or None  # LORAKIT_API_KEY set but empty: no key
        for name in ("max_body_bytes", "max_concurrent_requests", "max_batch_tokens", "max_texts", "max_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class Entry:
    """A loaded adapter."""

    path: Path
    pinned: bool
    labels: list[str] | None
    bytes: int
    chat_template: str | None = None  # the run's template (chat_template.jinja): generation puts prompts in it
    end_of_turn: list[int] = field(default_factory=list)  # token ids that end its answers (generating tasks)


@dataclass
class State:
    settings: Settings
    model: torch.nn.Module
    tokenizer: object
    task: Task  # training.tasks record
    model_path: str
    model_name: str  # what clients see: the model directory's name or the hub id
    loaded: OrderedDict = field(default_factory=OrderedDict)  # name -> Entry, least recently used first
    paths: dict = field(default_factory=dict)  # name -> directory of adapters registered by --adapter or POST
    stats: dict = field(default_factory=lambda: {"requests": 0, "batches": 0, "rows": 0, "evictions": 0,
                                                 "abandoned": 0, "streams_left": 0})  # left: mid-stream
    private: list = field(default_factory=list)  # (absolute path, what clients see instead), longest first
    end_of_turn: list[int] = field(default_factory=list)  # token ids that end the base model's answers

    @property
    def positions(self) -> float:
        """The model's token positions (inf when its config does not say): a prompt and its answer fit in them."""
        return positions(self.model) or float("inf")


def open_state(settings: Settings) -> State:
    """Load the base model once and the pinned adapters."""
    for name in settings.adapters:
        check_name(name)
    first = next(iter(settings.adapters.values()), None)
    first_config = read_adapter_config(first) if first else None
    model = settings.model or (first_config.base_model_name_or_path if first_config else None)
    if model is None:
        raise ConfigError("--model is needed (no --adapter names its base model)")
    path = resolve_model(model)
    task = task_of(path, first_config, settings.task)
    device = default_device()  # the GPU when there is one, as predict
    net, tokenizer = load_model(path, task, device=device)
    settings.max_length = within_positions(settings.max_length, net, lambda line: print(line, file=sys.stderr))
    name = Path(path).resolve().name if Path(path).is_dir() else path  # a hub id is no secret
    state = State(settings, net.to(device).eval(), tokenizer, task, path, name)
    state.private = _private_paths(settings, path, state.model_name)
    state.end_of_turn = _end_of_turn(state, None)
    for name, directory in settings.adapters.items():
        state.paths[name] = Path(directory)
        try:
            load(state, name, Path(directory), pinned=True)
        except ServeError as e:
            raise ConfigError(f"--adapter {name}={directory}: {e.message}") from None
    return state


def _private_paths(settings: Settings, model_path: str, model_name: str) -> list[tuple[str, str]]:
    # The server's absolute paths as messages may hold them (as given and resolved), and what clients see instead.
    def absolute(given: str) -> set[str]:
        return {p for p in (str(Path(given)), str(Path(given).resolve())) if Path(p).is_absolute()}

    pairs = [(p, model_name) for p in absolute(model_path) if Path(model_path).is_dir()]
    for name, directory in settings.adapters.items():
        pairs += [(p, f"<adapter {name}>") for p in absolute(directory)]
    for root in absolute(settings.adapter_dir) if settings.adapter_dir is not None else ():
        pairs += [(root + "/", ""), (root, "--adapter-dir")]
    return sorted(set(pairs), key=lambda pair: -len(pair[0]))


def public(state: State, message: str) -> str:
    """`message` with the server's absolute paths replaced by what clients may see (relative to --adapter-dir)."""
    for path, label in state.private:
        message = message.replace(path, label)
    return message


def check_name(name: str) -> None:
    if not NAME.fullmatch(name):
        raise ServeError(400, f"adapter name {name!r} refused: names are letters, digits and _ (no path separators "
                              f"or dots), at most 64 characters")


def inside_adapter_dir(state: State, path: str) -> Path:
    """`path` (relative to --adapter-dir, or absolute) resolved, if it lies inside --adapter-dir; else 400/403."""
    if state.settings.adapter_dir is None:
        raise ServeError(403, "this server has no --adapter-dir: adapters cannot be loaded at run time")
    root = Path(state.settings.adapter_dir).resolve()
    try:
        found = (root / path).resolve()  # symlinks followed: a link out of the directory is refused too
    except (ValueError, OSError) as e:  # a NUL byte, a link loop
        raise ServeError(400, f"path {path!r} refused: {e}") from None
    if not found.is_relative_to(root):
        raise ServeError(400, f"path {path!r} is outside --adapter-dir")
    return found


def check_files_inside(state: State, name: str, path: Path) -> None:
    """400 if any entry of adapter directory `path` is a link that leads outside --adapter-dir (a labels.json linked
    to /etc/passwd would come back as labels)."""
    root = Path(state.settings.adapter_dir).resolve()
    if not path.is_dir():
        raise ServeError(404, f"adapter {name!r}: {public(state, str(path))} is not an adapter directory")
    try:
        outside = [e.name for e in path.iterdir() if not e.resolve().is_relative_to(root)]
    except OSError as e:
        raise ServeError(422, public(state, f"adapter {name!r} could not be loaded: {e}")) from None
    if outside:
        raise ServeError(400, f"adapter {name!r}: {', '.join(sorted(outside))} links outside --adapter-dir")


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


def chat_template_of(state: State, name: str) -> str | None:
    """The chat template adapter `name` was trained with (None: it was trained on plain text)."""
    entry = state.loaded.get(name)
    return entry.chat_template if entry is not None else saved_chat_template(adapter_path(state, name))


def end_of_turn_of(state: State, name: str | None) -> list[int]:
    """The token ids that end adapter `name`'s answers (None: the base model's), found when it was loaded."""
    if name is None:
        return state.end_of_turn
    entry = state.loaded.get(name)
    return entry.end_of_turn if entry is not None else _end_of_turn(state, chat_template_of(state, name))


def _end_of_turn(state: State, template: str | None) -> list[int]:
    # Found by rendering a probe conversation (generation.end_of_turn_ids): once per adapter, not per request.
    return end_of_turn_ids(with_template(state.tokenizer, template)) if state.task.generates else []


def adapter_task(state: State, name: str) -> Task:
    """The task of adapter `name` (its config's task_type; the server's when it names none)."""
    if name in state.loaded:
        return state.task
    return _task_named_by(read_config(state, name, adapter_path(state, name)).task_type, state.task)


def _task_named_by(peft_type: str | None, default: Task) -> Task:
    # The task whose PEFT task_type an adapter's file names; the server's own when it names none we know.
    return next((task for task in TASKS.values() if task.peft_type == peft_type), default)


def read_config(state: State, name: str, path: Path):
    """Adapter `name`'s LoraConfig; 404 without adapter_config.json, 422 if it cannot be read."""
    try:
        return read_adapter_config(path)
    except Exception as e:  # noqa: BLE001 (bad JSON, wrong types: this adapter cannot be served, the server can)
        raise ServeError(404 if isinstance(e, FileNotFoundError) else 422,
                         f"adapter {name!r} could not be loaded: {public(state, str(e))}") from None


def load(state: State, name: str, path: Path, pinned: bool = False, keep: set = frozenset()) -> Entry:
    """Load adapter `name` from `path`, evicting least recently used adapters (but none in `keep`) to make room.
    Whatever goes wrong (a missing or corrupt file, an adapter that does not fit the model) is a ServeError naming
    the adapter, and the model is left as it was."""
    if not pinned and state.settings.adapter_dir is not None:
        check_files_inside(state, name, path)
    config = read_config(state, name, path)
    found = _task_named_by(config.task_type, state.task)
    if found is not state.task:
        raise ServeError(400, f"adapter {name!r} is a {found.name} adapter; this server's model is {state.task.name}")
    if config.bias != "none" or config.quantize:
        raise ServeError(400, f"adapter {name!r} changes the shared base model (bias={config.bias!r}, "
                              f"quantize={config.quantize!r}): it cannot be served beside other adapters")
    weights = path / WEIGHTS_NAME
    make_room(state, weights.stat().st_size if weights.is_file() else 0, keep={name, *keep})
    try:
        load_adapter_with_head(state.model, path, name)
    except Exception as e:  # noqa: BLE001 (SafetensorError, OSError, ...: all mean this adapter cannot be served)
        raise ServeError(422, f"adapter {name!r} could not be loaded: {public(state, f'{type(e).__name__}: {e}')}") \
            from None
    try:
        labels = _labels(state, name, path)
    except Exception as e:  # a bad labels.json: take the adapter out again
        delete_adapter(state.model, name)
        if isinstance(e, ServeError):
            raise
        raise ServeError(422, public(state, f"adapter {name!r} could not be loaded: {type(e).__name__}: {e}")) from None
    size = sum(t.numel() * t.element_size() for t in adapter_tensors(state.model, name).values())
    template = saved_chat_template(path)
    entry = state.loaded[name] = Entry(path, pinned, labels, size, template, _end_of_turn(state, template))
    return entry


def _labels(state: State, name: str, path: Path) -> list[str] | None:
    # labels.json of a lorakit run, else LABEL_i for each output of the adapter's own head (or the model's).
    if not state.task.labelled:
        return None
    heads = [w.modules_to_save[name] for w in saved_modules(state.model).values() if name in w.modules_to_save]
    width = getattr(heads[0], "out_features", None) if heads else state.model.config.num_labels
    labels = load_labels(path)
    if labels is not None and width is not None and len(labels) != width:
        raise ServeError(422, f"adapter {name!r}: labels.json names {len(labels)} labels, its head has {width} outputs")
    return labels or [f"LABEL_{i}" for i in range(width or state.model.config.num_labels)]


def make_room(state: State, need: int, keep: set) -> None:
    """Evict the least recently used unpinned adapters (not those in `keep`) until `need` more bytes fit."""
    budget = state.settings.adapter_memory_mb * 2**20
    while sum(e.bytes for e in state.loaded.values()) + need > budget:
        victim = next((n for n, e in state.loaded.items() if not e.pinned and n not in keep), None)
        if victim is None:
            raise MemoryFull(f"adapter memory budget ({state.settings.adapter_memory_mb:g} MiB) is full with "
                                  f"pinned or in-use adapters {sorted(state.loaded)}")
        unload(state, victim)
        state.stats["evictions"] += 1


def unload(state: State, name: str) -> None:
    if name not in state.loaded:
        raise ServeError(404, f"adapter {name!r} is not loaded; loaded: {sorted(state.loaded)}")
    delete_adapter(state.model, name)
    del state.loaded[name]


def add(state: State, name: str, path: Path) -> Entry:
    """POST /v1/adapters on the worker thread: load `path` as `name`; 409 if the name is taken (checked here, where
    loads are serial, so two racing requests for one name get one 201 and one 409)."""
    if name in state.loaded or name in state.paths:
        raise ServeError(409, f"adapter {name!r} is already loaded; DELETE /v1/adapters/{name} first")
    entry = load(state, name, path)
    state.paths[name] = path
    return entry


def remove(state: State, name: str) -> None:
    """DELETE /v1/adapters/NAME on the worker thread: unload it and forget its path; 409 for a pinned adapter."""
    if name in state.settings.adapters:
        raise ServeError(409, f"adapter {name!r} is pinned (--adapter): it cannot be unloaded")
    if name in state.loaded:
        unload(state, name)
    elif name not in state.paths:
        raise ServeError(404, f"adapter {name!r} is not loaded; loaded: {sorted(state.loaded)}")
    state.paths.pop(name, None)


def use(state: State, name: str, keep=frozenset()) -> ServeError | None:
    """Make adapter `name` loaded and most recently used, evicting others but not those in `keep`; the error (never
    raised) if it cannot be: MemoryFull when the adapters in `keep` leave no room."""
    try:
        if name not in state.loaded:
            load(state, name, adapter_path(state, name), keep=set(keep))
        state.loaded.move_to_end(name)
    except ServeError as e:
        return e
    return None
