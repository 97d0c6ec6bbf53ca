"""Ctrl-C and SIGTERM: the run stops, keeps what is finished and writes nothing half-done."""
from __future__ import annotations

import signal
import threading

from .failures import Interrupted


def on_signals(handler):
    """Install ``handler`` for SIGINT and SIGTERM; returns a function that restores the previous ones.
    Outside the main thread (where Python cannot install handlers) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    return lambda: [signal.signal(s, h) for s, h in old.items()]


def raise_interrupted(signum, frame):
    """Signal handler of a run: later signals are ignored while it stops, the first one unwinds."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Interrupted(signum)
