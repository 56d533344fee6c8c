"""Keeping Python's cycle collector off the heap that exists once an engine has started.

gc.freeze() moves every object alive into a permanent generation that collections skip: the
models, torch, transformers, hundreds of thousands of objects. Without it, every full
collection (which objects outliving a few passes trigger) walks them all, a pause of every
thread, and so of every running request (docs/engine.md, "Execution paths", has the
figures). The collector is process-wide, so the engines of one process share one freeze:
each start collects and freezes what is alive (its own model included), and only the last
engine to stop unfreezes.
"""

from __future__ import annotations

import gc
import threading

_lock = threading.Lock()
_holders = 0  # engines running with the heap frozen


def freeze() -> int:
    """Collects (so that no garbage is frozen), then freezes everything alive; returns how
    many objects are frozen. Stalls the process's other threads for the collection."""
    global _holders
    with _lock:
        gc.collect()
        gc.freeze()
        _holders += 1
        return gc.get_freeze_count()


def release() -> None:
    """An engine that froze has stopped: the last one unfreezes."""
    global _holders
    with _lock:
        _holders -= 1
        if _holders == 0:
            gc.unfreeze()
