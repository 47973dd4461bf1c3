"""Stopping a run cleanly: the first Ctrl-C (SIGINT) or SIGTERM (a timeout, a preempted cluster job) asks the loop
to checkpoint and stop after the current step; a second Ctrl-C interrupts at once."""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal:
    """A context in which SIGINT and SIGTERM set `requested` instead of ending the process (main thread only:
    signal handlers live there); the previous handlers come back on exit."""

    def __init__(self):
        self.requested, self.previous = False, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def _handle(self, signum, frame):
        self.requested = True
        if signum == signal.SIGINT:  # a second Ctrl-C: stop now
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
