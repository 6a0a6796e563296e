"""converters.network_buffers: a network buffer's rows are handed back to the kernel (they read as zeros
and leave the resident set) while every other row, and every other array, keeps its values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from converters.network_buffers import PAGE, network_buffer, release_rows


def _resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def test_a_network_buffer_is_a_writable_float32_array() -> None:
    x = network_buffer((1, 2, 3, 1024))  # rows of one page
    assert x.shape == (1, 2, 3, 1024) and x.dtype == np.float32 and x.flags.writeable and x.flags.c_contiguous
    x[...] = 5.0
    release_rows(x[:, :1], 0)  # slices are not whole buffers: nothing released
    release_rows(x[..., 1:], 0)
    assert np.all(x == 5.0)
    release_rows(x.reshape(2, 1, 3, 1024), 0, 1)  # a reshaped view is whole: the first row of each block
    assert np.all(x[0, :, 0] == 0.0) and np.all(x[0, :, 1:] == 5.0)


@pytest.mark.parametrize("row_floats", [1024, 1000, 3000])  # rows of exactly one page, less, and more
def test_released_rows_read_zero_and_the_others_keep_their_values(row_floats: int) -> None:
    shape = (1, 3, 40, row_floats)
    values = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) + 1.0
    x = network_buffer(shape)
    x[...] = values
    release_rows(x, 0, 17)
    release_rows(x, 17, 17)  # nothing
    release_rows(x, 30, None)
    for channel in range(3):
        kept = x[0, channel, 17:30]
        np.testing.assert_array_equal(kept, values[0, channel, 17:30])  # a shared page is never released
        gone = x[0, channel, :17].ravel()
        # only whole pages inside the rows go: at most one page's floats of them at each end stay
        assert np.count_nonzero(gone) <= 2 * PAGE // 4
        if row_floats * 4 >= PAGE:
            assert np.count_nonzero(x[0, channel, 1:16]) == 0
    plain = values.copy()
    release_rows(plain, 0, None)
    np.testing.assert_array_equal(plain, values)


def test_released_rows_leave_the_resident_set() -> None:
    x = network_buffer((1, 1, 64, 256, 256))  # 16 MiB, every page touched below
    x[...] = 1.0
    before = _resident_mib()
    release_rows(x, 0, 48)
    assert before - _resident_mib() > 10  # 12 MiB released, with slack for the rest of the process
    assert float(x[0, 0, 48:].sum()) == 16 * 256 * 256


def _thp_eligible(x: np.ndarray) -> bool:
    """Whether the kernel may back ``x``'s memory map with transparent huge pages (/proc/self/smaps;
    the test skips on a kernel whose smaps do not say, before Linux 5.0)."""
    address = x.ctypes.data
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                start, end = (int(a, 16) for a in head.split("-"))
                inside = start <= address < end
            elif inside and line.startswith("THPeligible:"):
                return line.split()[1] == "1"
    pytest.skip("this kernel's /proc/self/smaps has no THPeligible line")


def test_a_buffer_released_a_few_rows_at_a_time_stays_off_huge_pages() -> None:
    """``huge_pages=False`` (the raw pool's many-channel buffer) advises the kernel against them, which
    holds where it hands them out unasked too; a default buffer asks for them."""
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        pytest.skip("no transparent huge pages on this kernel")
    small_pages = network_buffer((1, 16, 32, 128, 128), huge_pages=False)  # 32 MiB
    assert not _thp_eligible(small_pages)
    if "[never]" not in mode:
        assert _thp_eligible(network_buffer((1, 16, 32, 128, 128)))
