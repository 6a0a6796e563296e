"""What this CPU can do for INT8 models: its feature flags and model name, from /proc/cpuinfo.

INT8 accuracy depends on the CPU: without an 8-bit dot-product instruction (VNNI or AMX), OpenVINO
forms u8 x s8 products with instructions that add pairs in 16 bits, which can saturate unless the
model was quantized with NNCF's overflow fix. The node and the trainer both ask.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: /proc/cpuinfo flags of an 8-bit dot-product instruction: VNNI (AVX-512 or AVX) or AMX.
INT8_DOT_PRODUCT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def _cpuinfo_field(name: str) -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    line = next((ln for ln in text.splitlines() if ln.split(":")[0].strip() == name), "")
    return line.partition(":")[2].strip()


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (/proc/cpuinfo); empty where unreadable (not Linux)."""
    return frozenset(_cpuinfo_field("flags").split())


def cpu_description() -> dict[str, object]:
    """The CPU's model name and its 8-bit dot-product flags (empty list: AVX2-only INT8 kernels)."""
    return {
        "model": _cpuinfo_field("model name") or "unknown",
        "int8_dot_product": sorted(cpu_flags() & INT8_DOT_PRODUCT_FLAGS),
    }


def int8_may_saturate(calibration: Mapping[str, Any] | None, flags: frozenset[str] | None = None) -> bool:
    """Whether an INT8 model's u8 x s8 sums may saturate on this CPU.

    True when the model was quantized without NNCF's overflow fix on every layer (its card's
    ``calibration.overflow_fix`` is not ``"enable"``) and the CPU (``flags``, default this one's) has
    no VNNI or AMX; False where the flags cannot be read.
    """
    if (calibration or {}).get("overflow_fix") == "enable":
        return False
    present = cpu_flags() if flags is None else flags
    return bool(present) and not present & INT8_DOT_PRODUCT_FLAGS
