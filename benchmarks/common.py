"""What the benchmarks share: the machine they run on, result files, tables, child processes.

Each benchmark prints its tables and writes its figures as JSON under ``build/bench/`` (or
``--out``); ``benchmarks/report.py`` turns those files into docs/benchmarks.md and its chart.
"""

from __future__ import annotations

import array
import fcntl
import json
import os
import platform
import resource
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
RESULTS_DIR = REPO / "build" / "bench"
DEFAULT_MODEL = REPO / "models" / "default"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


#: ``FS_IOC_GETFLAGS``, ``FS_IOC_SETFLAGS`` and ``FS_TOPDIR_FL`` (the flag ``chattr +T`` sets), linux/fs.h.
_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
_FS_TOPDIR_FL = 0x00020000


def spread_subdirectories(directory: Path) -> bool:
    """Ask the file system to place each new subdirectory of ``directory`` as the top of a tree of its
    own, away from its siblings (ext4's Orlov allocator; the flag ``chattr +T`` sets); returns whether
    ``directory`` has the flag. A file system without it (tmpfs, XFS, ...) is left as it is.

    Benchmarks that write many files give each run a directory of its own this way: on ext4 without a
    journal, creating a file checks every inode of its directory's allocation group freed in the last
    60 s (360 s while its inode-table block is dirty) before it takes a free one, so a run in a group
    where files were just deleted (a folder of /tmp, after the tests or the previous run) pays up to
    ~0.9 ms of kernel time per file instead of ~15 us (benchmarks/ingest.py).
    """
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        flags = array.array("i", [0])
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, flags, True)
        if not flags[0] & _FS_TOPDIR_FL:
            flags[0] |= _FS_TOPDIR_FL
            fcntl.ioctl(fd, _FS_IOC_SETFLAGS, flags, True)
        return True
    except OSError:  # ENOTTY, EOPNOTSUPP, EPERM, EINVAL: no such flag here
        return False
    finally:
        os.close(fd)


def machine() -> dict[str, Any]:
    """The CPU model, core count, memory, ISA extensions that matter and library versions."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version()}
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                info.setdefault("cpu", value.strip())
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    info["cores"] = os.cpu_count()
    info["isa"] = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16",
                               "amx_int8") if f in flags]
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages / 2**30, 1)
    except (ValueError, OSError):
        pass
    for module in ("openvino", "onnxruntime", "torch", "numpy", "pynetdicom"):
        try:
            mod = __import__(module)
            info[module] = str(getattr(mod, "__version__", "?")).split("-")[0]
        except ImportError:
            info[module] = None
    return info


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mib() -> float:
    """Resident memory of this process now, MiB (from /proc/self/statm; 0 where there is none)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> bool:
    """Reset this process's peak resident memory (VmHWM) to its current RSS: Linux's
    ``/proc/self/clear_refs`` with "5". False where that is not possible (not Linux, a kernel or
    sandbox that refuses it); :func:`peak_rss_since_reset_mib` then has no figure to give."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _vm_hwm_mib() is not None


def _vm_hwm_mib() -> float | None:
    """VmHWM (the mm's resident high-water mark) from /proc/self/status, MiB; None where absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except (OSError, IndexError, ValueError):
        return None
    return None


def peak_rss_since_reset_mib(reset: bool) -> float | None:
    """Peak resident memory since :func:`reset_peak_rss` (whose result is ``reset``), MiB; None when the
    peak could not be reset. Not ``ru_maxrss``: that keeps the whole process's peak (a reset of VmHWM
    does not lower it once a thread has exited), so it cannot tell what came after the reset."""
    return _vm_hwm_mib() if reset else None


def save_result(name: str, data: dict[str, Any], out_dir: Path | None = None) -> Path:
    """Write ``data`` (plus the machine description) as ``<out_dir>/<name>.json``."""
    out_dir = out_dir or RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **data}, indent=2, default=float))
    return path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table (numbers already formatted by the caller)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def run_child(args: Sequence[str], timeout: float = 600.0) -> dict[str, Any]:
    """Run ``python <args>`` in a fresh process that prints one JSON object as its last line."""
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, check=False, cwd=REPO
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))
