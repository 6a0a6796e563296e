"""Giving memory back between jobs.

The node idles most of the time, holding every active model compiled. OpenVINO keeps the
intermediate buffers of a compiled model after an inference (for the 256³ brain-extraction network
about 450 MiB, more than the rest of the node), and glibc keeps freed heap pages mapped. Neither is
needed between jobs: :func:`release_compiled` hands a compiled model's buffers back
(``CompiledModel.release_memory``; the next inference allocates them again, ~0.1 s for the brain
network) and :func:`trim_heap` returns free heap pages to the system (``malloc_trim``).
``release_memory`` leaves a compiled model's own input and output buffers alone: the brain extractor
cuts its networks' output to the channel it reads, which OpenVINO then writes into the request's
tensor, and runs each network once at load, which frees the input buffer filled at compile
(node/brain_extraction.py; 64 + 128 MiB on the 256³ grid).
:func:`limit_arenas` caps glibc's malloc arenas for ``segnode serve``: each of the node's many threads
(associations, spool writers, worker, sender) would otherwise get an arena of its own, and the freed
pages scattered over them stay mapped (measured: ~30 MiB less after a job with 2 arenas).
:func:`fix_mmap_threshold` gives every allocation of 4 MiB or more (a slice stack, a mask, a resampled
volume) a memory map of its own, handed back to the system when freed. glibc's default threshold moves:
each freed map raises it to that map's size (up to 32 MiB), after which arrays of that size come from
the heap, where a few live objects between them keep the freed pages mapped. After one job the node
idled ~20-40 MiB higher than before it, and the next study's early analysis started from there.
:func:`tune_malloc` does both; ``segnode serve``, ``segnode demo`` and each receiving process call it
before their threads start.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def release_compiled(compiled: Any) -> None:
    """Release the intermediate buffers of an OpenVINO ``CompiledModel`` (no inference may be running
    on it); a runtime without ``release_memory`` or one that refuses is left as it is."""
    release = getattr(compiled, "release_memory", None)
    if release is None:
        return
    try:
        release()
    except RuntimeError as exc:  # e.g. an inference request still running
        logger.debug("OpenVINO kept its buffers: %s", exc)


@functools.cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


#: glibc's mallopt parameter number of M_ARENA_MAX (malloc.h).
M_ARENA_MAX = -8
#: Arenas for the node process: the usual cap for multi-threaded servers (glibc's default is 8 per core).
NODE_ARENAS = 2


def limit_arenas(arenas: int = NODE_ARENAS) -> bool:
    """Cap glibc's malloc arenas (``mallopt(M_ARENA_MAX)``; ``MALLOC_ARENA_MAX`` in the environment
    wins). Call before threads start. False where there is no glibc or it refused."""
    return _mallopt(M_ARENA_MAX, arenas, "MALLOC_ARENA_MAX")


#: glibc's mallopt parameter number of M_MMAP_THRESHOLD (malloc.h).
M_MMAP_THRESHOLD = -3
#: Allocations of at least this many bytes get a memory map of their own (glibc's default: 128 KiB,
#: raised by every freed map up to 32 MiB). Below it stay what the receive path allocates per C-STORE
#: (a data set's bytes, ~0.1-1 MiB), which the heap serves without a system call.
NODE_MMAP_THRESHOLD = 4 * 1024 * 1024


def fix_mmap_threshold(size: int = NODE_MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``size`` bytes (``mallopt(M_MMAP_THRESHOLD)``, which also stops
    glibc from moving it; ``MALLOC_MMAP_THRESHOLD_`` in the environment wins). False where there is no
    glibc, the environment sets it, or glibc refused."""
    return _mallopt(M_MMAP_THRESHOLD, size, "MALLOC_MMAP_THRESHOLD_")


def _mallopt(parameter: int, value: int, environment: str) -> bool:
    """``mallopt(parameter, value)`` unless the environment variable of the same setting is set (an
    operator's choice, which glibc has already applied); False where it is set, there is no glibc, or
    glibc refused."""
    libc = _libc()
    if libc is None or os.environ.get(environment):
        return False
    return bool(libc.mallopt(parameter, int(value)))


def tune_malloc() -> None:
    """The node's allocator settings (:func:`limit_arenas`, :func:`fix_mmap_threshold`); call before
    the process's threads start."""
    limit_arenas()
    fix_mmap_threshold()


def trim_heap() -> bool:
    """Return free heap pages to the system (glibc ``malloc_trim``); False where there is no glibc."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def memory_status_mib(pid: int | str = "self") -> dict[str, float]:
    """The ``kB`` fields of ``/proc/PID/status`` (VmRSS, RssAnon, RssFile, VmHWM...) in MiB; empty
    where unreadable."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if value.strip().endswith(" kB"):
            out[key] = int(value.split()[0]) / 1024
    return out


def rss_mib(pid: int | str = "self") -> float:
    """Resident set of a process (default: this one) in MiB, from ``/proc``; 0.0 where unreadable."""
    return memory_status_mib(pid).get("VmRSS", 0.0)
