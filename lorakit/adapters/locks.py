"""One lock per model, so that a routed call (routing.route) never sees an adapter half added or half removed.

`route()` holds its model's lock for the whole routed call (a forward or a whole `generate`); the functions that add,
remove, merge or unmerge adapters take it too (`@exclusive`), so they wait for routed calls in flight and routed
calls wait for them. The lock is re-entrant: a function holding it may call another that takes it.
"""

from __future__ import annotations

import functools
import threading
import weakref

from torch import nn

from .parts import unwrap

_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_GUARD = threading.Lock()


def model_lock(root: nn.Module) -> threading.RLock:
    """The re-entrant lock of model `root` (the unwrapped model), created on first use. Held outside the model, so
    that models still deep-copy and pickle."""
    with _GUARD:
        lock = _LOCKS.get(root)
        if lock is None:
            lock = _LOCKS[root] = threading.RLock()
        return lock


def exclusive(fn):
    """Decorator for fn(model, ...) that changes a model's adapters: run it holding the model's lock."""

    @functools.wraps(fn)
    def locked(model, *args, **kwargs):
        with model_lock(unwrap(model)):
            return fn(model, *args, **kwargs)

    return locked
