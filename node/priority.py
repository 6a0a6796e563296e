"""Receiving first: the node's analysis threads run at a lower CPU priority (a higher nice value).

On two cores, the brain network's and the segmenter's worker threads use both while a study is still
arriving (early analysis, node/early.py). Receiving is a chain of short hand-offs between threads (the
association's, the spool writer's, the committer's), and each one then waits for a time slice: on
2026-12-03 the node received the 620-instance demo study in 2.0-3.1 s with early analysis off and in
4.4 s (median of six) with it on. With the analysis threads at nice 10 the receiving threads preempt
them when they wake: 4.0 s (median of six, alternating with the six at nice 0; first C-STORE to SEG
5.27 -> 5.13 s), because the study's job starts once the study is received. On an idle CPU a nice
value changes nothing.

The threads lowered: the early-analysis thread and the threads it starts (they inherit the value), and
every thread of the process that Python did not start: the inference engines' (OpenVINO's) and the
registration's (ITK's) worker pools, which the jobs share. Linux only (``/proc/self/task``); elsewhere
nothing changes. Raising one's own nice value needs no privilege; it is never lowered here.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

TASKS = Path("/proc/self/task")


def _raise_nice(tid: int, nice: int) -> bool:
    """Set thread ``tid``'s nice value to ``nice`` if it is lower; True when it was changed."""
    try:
        if os.getpriority(os.PRIO_PROCESS, tid) >= nice:
            return False
        os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError:  # the thread ended meanwhile, or the platform has no per-thread priority
        return False
    return True


def lower_this_thread(nice: int) -> None:
    """Give the calling thread (and the threads it starts from now on) nice value ``nice``."""
    if nice > 0 and hasattr(os, "setpriority"):
        _raise_nice(threading.get_native_id(), nice)


def lower_native_threads(nice: int) -> int:
    """Give every thread of this process that Python did not start nice value ``nice`` (the engines'
    worker pools); returns how many were changed."""
    if nice <= 0 or not TASKS.is_dir():
        return 0
    tids = [int(entry.name) for entry in TASKS.iterdir()]  # before Python's list: see below
    threads = threading.enumerate()
    if any(t.native_id is None for t in threads):
        # A Python thread still starting is listed before it knows its OS id, and its task may be in
        # ``tids`` already: it would be taken for an engine's. Nothing this time; the next call will do.
        return 0
    python_threads = {t.native_id for t in threads} | {os.getpid()}  # the main thread whatever threading says
    changed = 0
    for tid in tids:
        if tid not in python_threads and _raise_nice(tid, nice):
            changed += 1
    if changed:
        logger.debug("%d engine worker threads at nice %d", changed, nice)
    return changed
