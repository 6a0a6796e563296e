"""Device selection: CPU, CUDA or Habana Gaudi (HPU), and the torch.distributed set-up around them.

HPU support follows Habana's PyTorch guide: ``habana_frameworks.torch.core`` is imported only when
HPU is asked for (or, with ``auto``, detected), training runs in lazy mode with ``mark_step()``
after ``backward()`` and after ``optimizer.step()``, bf16 autocast is available, and the fused
AdamW of ``habana_frameworks.torch.hpex.optimizers`` is used when present. Many devices go through
DDP started by ``torchrun``: backend ``hccl`` on HPU, ``nccl`` on CUDA, ``gloo`` on CPU.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, TypeVar

import torch

from trainer.exceptions import DeviceError

logger = logging.getLogger(__name__)

DEVICE_KINDS = ("auto", "cpu", "cuda", "hpu")
BACKENDS = {"cpu": "gloo", "cuda": "nccl", "hpu": "hccl"}


def habana_available() -> bool:
    """Whether the Habana PyTorch bridge is installed (does not import it)."""
    return importlib.util.find_spec("habana_frameworks") is not None


def _import_habana() -> ModuleType:
    try:
        htcore = importlib.import_module("habana_frameworks.torch.core")
    except ImportError as exc:
        raise DeviceError(f"device hpu: habana_frameworks.torch.core cannot be imported ({exc})") from None
    return htcore


#: A torch module kept as its own type through :meth:`DeviceInfo.place`.
ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


@dataclass
class DeviceInfo:
    """The chosen device and what the training loop must do on it.

    Attributes
    ----------
    kind:
        ``cpu``, ``cuda`` or ``hpu``.
    device:
        The torch device of this process.
    amp_dtype:
        Autocast dtype (bf16 on HPU, fp16 on CUDA) or None.
    htcore:
        The ``habana_frameworks.torch.core`` module on HPU (for ``mark_step``), else None.
    memory_format:
        The layout of the network's weights and input batches: channels last on the CPU, where oneDNN's
        convolutions with this U-Net's few channels train about 1.5x faster in it (benchmarks/
        train_throughput.py); the default layout elsewhere.
    """

    kind: str
    device: torch.device
    amp_dtype: torch.dtype | None = None
    htcore: ModuleType | None = field(default=None, repr=False)
    memory_format: torch.memory_format = torch.contiguous_format

    def place(self, module: ModuleT) -> ModuleT:
        """``module`` on this device, its weights in :attr:`memory_format`."""
        # Module.to(memory_format=...) is documented and works, but torch's type stubs omit it.
        return module.to(self.device).to(memory_format=self.memory_format)  # type: ignore[call-overload]

    def mark_step(self) -> None:
        """HPU lazy mode: execute the graph accumulated so far; a no-op elsewhere."""
        if self.htcore is not None:
            self.htcore.mark_step()

    def autocast(self) -> Any:
        """The autocast context of this device (a disabled one when AMP is off)."""
        device_type = "cpu" if self.kind == "cpu" else self.kind
        return torch.autocast(
            device_type=device_type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
        )

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A gradient scaler for fp16 CUDA AMP; None where none is needed (bf16, fp32)."""
        if self.kind == "cuda" and self.amp_dtype == torch.float16:
            return torch.amp.GradScaler("cuda")
        return None

    def optimizer(
        self, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float
    ) -> torch.optim.Optimizer:
        """AdamW; Habana's FusedAdamW on HPU when present."""
        if self.kind == "hpu":
            try:
                from habana_frameworks.torch.hpex.optimizers import FusedAdamW

                return FusedAdamW(params, lr=lr, weight_decay=weight_decay)
            except ImportError:
                logger.info("Habana FusedAdamW not available; using torch AdamW")
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def resolve_device(
    kind: str = "auto", local_rank: int = 0, amp: bool = True, threads: int | None = None
) -> DeviceInfo:
    """Pick the device of this process.

    Parameters
    ----------
    kind:
        ``auto`` (HPU if habana_frameworks is installed, else CUDA if available, else CPU), ``cpu``,
        ``cuda`` or ``hpu``.
    local_rank:
        Index of the device on this host (torchrun's LOCAL_RANK).
    amp:
        Use mixed precision where the device has it (bf16 autocast on HPU, fp16 AMP on CUDA).
    threads:
        CPU threads for torch (None: all cores, divided among local processes).

    Raises
    ------
    DeviceError
        The kind is unknown or not available here.
    """
    if kind not in DEVICE_KINDS:
        raise DeviceError(f"device {kind!r} is not one of {', '.join(DEVICE_KINDS)}")
    if kind == "auto":
        kind = "hpu" if habana_available() else "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "hpu":
        os.environ.setdefault("PT_HPU_LAZY_MODE", "1")
        htcore = _import_habana()
        return DeviceInfo("hpu", torch.device("hpu"), torch.bfloat16 if amp else None, htcore)
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("device cuda: torch.cuda.is_available() is False on this machine")
        torch.cuda.set_device(local_rank)
        return DeviceInfo("cuda", torch.device("cuda", local_rank), torch.float16 if amp else None)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local))
    return DeviceInfo("cpu", torch.device("cpu"), memory_format=torch.channels_last)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a torch.distributed job (world size 1 without torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes logs, checkpoints and files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1


def dist_from_env() -> DistInfo:
    """Rank, local rank and world size from torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE)."""
    return DistInfo(
        rank=int(os.environ.get("RANK", "0")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
    )


def init_distributed(info: DistInfo, device_kind: str) -> None:
    """Initialise the default process group with the backend for ``device_kind`` (once)."""
    import torch.distributed as dist

    if not info.distributed or dist.is_initialized():
        return
    backend = BACKENDS[device_kind]
    if device_kind == "hpu":
        importlib.import_module("habana_frameworks.torch.distributed.hccl")
    dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size)
    logger.info("process group %s: rank %d of %d", backend, info.rank, info.world_size)
