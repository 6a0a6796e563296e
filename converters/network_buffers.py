"""Network buffers: float32 arrays whose rows a staged network hands back to the system as it reads them.

A staged network (converters/staged_network.py) runs a layer over a large tensor a slab of rows at a
time, writing a tensor of its own. Once the last slab that reads a row has run, that row of the input
is never read again, yet its pages stay resident until the whole array is freed: for the brain
network's first layer, the 64 MiB input on its 256³ grid beside the 128 MiB map it writes. An array
from :func:`network_buffer` lives on pages of its own (an anonymous private memory map), and
:func:`release_rows` gives the pages of rows already read back to the kernel (``MADV_DONTNEED``)
while the array still exists: the input shrinks while the output grows.

The contract: a buffer passed to a network is the network's to consume. After the call its values
are gone (released pages read back as zeros); nothing may read it again.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

PAGE = mmap.PAGESIZE
#: Buffers from this size on ask for transparent huge pages (NumPy's own threshold).
HUGE_BYTES = 4 * 1024 * 1024


class _Pages(mmap.mmap):
    """An anonymous private memory map that a network may consume (see the module's docstring)."""


def network_buffer(shape: Sequence[int], huge_pages: bool = True) -> npt.NDArray[np.float32]:
    """A zero-filled C-contiguous float32 array of ``shape`` on pages of its own, which a staged
    network consumes as it reads it (:func:`release_rows`).

    ``huge_pages`` False for a buffer that is written and released a few rows at a time across many
    channels: a huge page holds 2 MiB of one channel's rows, so each channel written would keep up to
    two of them resident where a few 4 KiB pages of rows are all that is live. Such a buffer is kept
    off huge pages also where the kernel gives them unasked (``transparent_hugepage`` "always")."""
    count = int(np.prod(shape, dtype=np.int64))
    pages = _Pages(-1, max(count * 4, 1), flags=mmap.MAP_PRIVATE)  # private: released pages are freed
    if count * 4 >= HUGE_BYTES:
        # As NumPy asks for its own large arrays: transparent huge pages where the kernel gives them on
        # request, 512 times fewer page faults (~0.2 s of the brain network's 0.7 s without).
        advice = "MADV_HUGEPAGE" if huge_pages else "MADV_NOHUGEPAGE"
        if hasattr(mmap, advice):
            pages.madvise(getattr(mmap, advice))
    return np.frombuffer(pages, dtype=np.float32, count=count).reshape(tuple(int(n) for n in shape))


def _pages_of(x: npt.NDArray[np.float32]) -> _Pages | None:
    """The memory map under ``x`` when ``x`` is a whole :func:`network_buffer` (not a slice of one)."""
    root = x
    while isinstance(root.base, np.ndarray):
        root = root.base
    owner = root.base.obj if isinstance(root.base, memoryview) else root.base
    if not isinstance(owner, _Pages):
        return None
    whole = x.flags.c_contiguous and x.ctypes.data == root.ctypes.data and x.nbytes == root.nbytes
    return owner if whole else None


def release_rows(x: npt.NDArray[np.float32], start: int, stop: int | None = None) -> None:
    """Hand back to the kernel the pages holding rows ``start:stop`` (axis 2, the first spatial axis;
    ``stop`` None: to the last) of every batch item and channel of ``x``, a :func:`network_buffer` of
    shape (N, C, rows, ...). Only whole pages inside those rows go (a page shared with a row still to
    be read stays); they read back as zeros. Does nothing for any other array."""
    pages = _pages_of(x)
    if pages is None or x.ndim < 3:
        return
    stop = x.shape[2] if stop is None else min(stop, x.shape[2])
    start = max(start, 0)
    if stop <= start:
        return
    row_bytes = x.nbytes // (x.shape[0] * x.shape[1] * x.shape[2])
    block_bytes = row_bytes * x.shape[2]
    for block in range(x.shape[0] * x.shape[1]):
        first = block * block_bytes + start * row_bytes
        last = block * block_bytes + stop * row_bytes
        first = -(-first // PAGE) * PAGE  # whole pages inside [first, last) only
        last = last // PAGE * PAGE
        if last > first:
            pages.madvise(mmap.MADV_DONTNEED, first, last - first)
