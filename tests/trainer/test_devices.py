"""Device paths of the trainer without the hardware: HPU through a fake habana_frameworks, early stopping.

No Gaudi is needed: a meta-path finder serves a fake ``habana_frameworks`` package (``torch.core``
with a ``mark_step`` that records its calls, and optionally ``torch.hpex.optimizers.FusedAdamW``),
so the real :func:`trainer.devices.resolve_device` detects and imports it as it would the real one.
For the training loop the resolved HPU device is swapped for the CPU (the only change to what the
trainer sees), and the loop's calls -- backward, mark_step, optimizer step, autocast -- are logged.
"""

from __future__ import annotations

import dataclasses
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from trainer.exceptions import DeviceError, TrainerError

torch = pytest.importorskip("torch")

SHAPE = (32, 32, 12)
HABANA = "habana_frameworks"
CORE = "habana_frameworks.torch.core"
OPTIMIZERS = "habana_frameworks.torch.hpex.optimizers"


_AdamW: Any = torch.optim.AdamW


class FakeFusedAdamW(_AdamW):
    """Stands in for ``habana_frameworks.torch.hpex.optimizers.FusedAdamW`` (same signature)."""


class FakeHabana(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves a fake ``habana_frameworks`` package; records what is imported and every call made."""

    def __init__(self, fused: bool) -> None:
        self.modules = {HABANA, "habana_frameworks.torch", CORE}
        if fused:
            self.modules |= {"habana_frameworks.torch.hpex", OPTIMIZERS}
        self.imported: list[str] = []
        self.log: list[str] = []

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.modules:
            return None
        is_package = fullname not in (CORE, OPTIMIZERS)
        return importlib.util.spec_from_loader(fullname, self, is_package=is_package)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        self.imported.append(module.__name__)
        if module.__name__ == CORE:
            module.mark_step = lambda: self.log.append("mark_step")  # type: ignore[attr-defined]
        if module.__name__ == OPTIMIZERS:
            module.FusedAdamW = FakeFusedAdamW  # type: ignore[attr-defined]


def _forget_habana() -> None:
    for name in [n for n in sys.modules if n == HABANA or n.startswith(HABANA + ".")]:
        del sys.modules[name]


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Restore what resolve_device changes globally: torch threads, PT_HPU_LAZY_MODE, habana modules."""
    threads = torch.get_num_threads()
    monkeypatch.setenv("PT_HPU_LAZY_MODE", "placeholder")
    monkeypatch.delenv("PT_HPU_LAZY_MODE")  # undone in reverse: back to how it was before the test
    _forget_habana()
    yield
    _forget_habana()
    torch.set_num_threads(threads)


def _install(monkeypatch: pytest.MonkeyPatch, fused: bool = True) -> FakeHabana:
    fake = FakeHabana(fused)
    monkeypatch.setattr(sys, "meta_path", [fake, *sys.meta_path])
    return fake


def _absent(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make habana_frameworks absent even where it is installed (find_spec None, import fails)."""
    monkeypatch.setitem(sys.modules, HABANA, None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# -- import only when asked or detected -------------------------------------------------------------


def test_cpu_and_auto_without_habana_never_import_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.devices import habana_available, resolve_device

    fake = _install(monkeypatch)
    info = resolve_device("cpu", threads=1)
    assert info.kind == "cpu" and info.htcore is None and info.amp_dtype is None
    assert info.memory_format == torch.channels_last  # the U-Net trains ~1.5x faster so on the CPU
    assert fake.imported == []  # installed, but --device cpu does not touch it
    assert "PT_HPU_LAZY_MODE" not in os.environ
    info.mark_step()  # a no-op off HPU
    assert fake.log == []

    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path if f is not fake])
    _absent(monkeypatch)
    assert not habana_available()
    info = resolve_device("auto", threads=1)
    assert info.kind == "cpu" and info.htcore is None
    assert sys.modules[HABANA] is None and CORE not in sys.modules
    with pytest.raises(DeviceError, match=r"device hpu: habana_frameworks\.torch\.core cannot be imported"):
        resolve_device("hpu")


def test_hpu_imports_habana_when_asked_or_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.devices import habana_available, resolve_device

    fake = _install(monkeypatch)
    assert habana_available() and fake.imported == []  # detection does not import
    info = resolve_device("hpu")
    assert fake.imported == [HABANA, "habana_frameworks.torch", CORE]
    assert info.kind == "hpu" and info.device.type == "hpu"
    assert info.htcore is sys.modules[CORE]
    assert info.amp_dtype == torch.bfloat16
    assert os.environ["PT_HPU_LAZY_MODE"] == "1"  # lazy mode
    info.mark_step()
    assert fake.log == ["mark_step"]
    assert resolve_device("hpu", amp=False).amp_dtype is None

    _forget_habana()
    fake.imported.clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # HPU wins over CUDA under auto
    info = resolve_device("auto")
    assert info.kind == "hpu" and CORE in fake.imported


def test_fused_adamw_when_present_plain_adamw_when_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.devices import resolve_device

    params = [torch.nn.Parameter(torch.zeros(3))]
    _install(monkeypatch, fused=True)
    opt = resolve_device("hpu").optimizer(params, lr=0.01, weight_decay=0.001)
    assert type(opt) is FakeFusedAdamW
    assert opt.defaults["lr"] == 0.01 and opt.defaults["weight_decay"] == 0.001
    assert type(resolve_device("cpu", threads=1).optimizer(params, 0.01, 0.0)) is torch.optim.AdamW

    _forget_habana()
    monkeypatch.setattr(sys, "meta_path", sys.meta_path[1:])
    _install(monkeypatch, fused=False)
    opt = resolve_device("hpu").optimizer(params, lr=0.01, weight_decay=0.001)
    assert type(opt) is torch.optim.AdamW and OPTIMIZERS not in sys.modules


def test_hpu_autocast_is_bf16_and_off_without_amp(monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.devices import resolve_device

    _install(monkeypatch)
    with resolve_device("hpu").autocast() as ctx:
        assert (ctx.device, ctx.fast_dtype, ctx._enabled) == ("hpu", torch.bfloat16, True)
    with resolve_device("hpu", amp=False).autocast() as ctx:
        assert ctx._enabled is False


# -- the real training loop on a fake HPU ------------------------------------------------------------


@pytest.fixture(scope="module")
def task01(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from converters.synthetic import write_synthetic_task01

    return write_synthetic_task01(
        tmp_path_factory.mktemp("task01") / "Task01_BrainTumour", 3, seed=7, shape=SHAPE
    )


def _config(data: Path, out: Path, **kw: Any) -> Any:
    from trainer.train import TrainConfig

    base: dict[str, Any] = dict(
        data=str(data),
        out=str(out),
        device="cpu",
        epochs=1,
        batch_size=4,
        base_filters=4,
        depth=2,
        crop_size=[32, 32],
        val_fraction=0.34,
        slices_per_epoch=8,
        threads=1,
    )
    base.update(kw)
    return TrainConfig(**base)


def _on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer's resolve_device, for real, with the torch device of HPU swapped for the CPU."""
    import trainer.devices
    import trainer.train

    def resolve(kind: str, *args: Any, **kwargs: Any) -> Any:
        info = trainer.devices.resolve_device(kind, *args, **kwargs)
        return dataclasses.replace(info, device=torch.device("cpu")) if info.kind == "hpu" else info

    monkeypatch.setattr(trainer.train, "resolve_device", resolve)


@contextmanager
def _log_calls(monkeypatch: pytest.MonkeyPatch, log: list[str]) -> Iterator[None]:
    """Append backward, optimizer step (with its class) and autocast entries to ``log``."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    backward = torch.Tensor.backward

    def logged_backward(self: Any, *args: Any, **kwargs: Any) -> None:
        backward(self, *args, **kwargs)
        log.append("backward")

    real_autocast = torch.autocast

    @contextmanager
    def logged_autocast(device_type: str, dtype: Any = None, enabled: bool = True) -> Iterator[None]:
        log.append(f"autocast {device_type} {dtype} {enabled}")
        with real_autocast(device_type=device_type, dtype=dtype, enabled=enabled):
            yield

    monkeypatch.setattr(torch.Tensor, "backward", logged_backward)
    monkeypatch.setattr(torch, "autocast", logged_autocast)
    handle = register_optimizer_step_post_hook(
        lambda opt, args, kwargs: log.append(f"step {type(opt).__name__}")
    )
    try:
        yield
    finally:
        handle.remove()


@pytest.mark.parametrize("fused", [True, False], ids=["fused-adamw", "no-fused-adamw"])
def test_hpu_loop_marks_steps_after_backward_and_optimizer_step(
    task01: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fused: bool
) -> None:
    from trainer.checkpoint import load_checkpoint
    from trainer.train import train

    fake = _install(monkeypatch, fused=fused)
    _on_cpu(monkeypatch)
    log = fake.log  # mark_step appends here too: one ordered log of everything
    with _log_calls(monkeypatch, log):
        summary = train(_config(task01, tmp_path / "run", device="hpu", epochs=2), progress=False)
    assert summary["epoch"] == 2 and CORE in fake.imported
    optimizer = "FakeFusedAdamW" if fused else "AdamW"
    autocast = "autocast hpu torch.bfloat16 True"
    iteration = [autocast, "backward", "mark_step", f"step {optimizer}", "mark_step"]
    iterations = 2 * (8 // 4)  # epochs * slices_per_epoch // batch_size
    assert log.count("backward") == iterations
    starts = [i for i, call in enumerate(log) if call.startswith("autocast")]
    assert len(starts) == iterations
    for start in starts:
        assert log[start : start + len(iteration)] == iteration, log[start : start + len(iteration)]
    # what is left is validation, which marks a step after each forward pass and steps nothing
    in_iterations = {i for start in starts for i in range(start, start + len(iteration))}
    rest = [call for i, call in enumerate(log) if i not in in_iterations]
    assert rest and set(rest) == {"mark_step"}
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["device_kind"] == "hpu"


# -- early stopping and the validation split ---------------------------------------------------------


def test_early_stopping_after_patience_epochs_without_gain(
    task01: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainer.checkpoint import load_checkpoint
    from trainer.train import Trainer, train

    scores = iter([0.1, 0.2, 0.15, 0.3, 0.3, 0.25, 0.9, 0.9])  # gain at 1, 2, 4; none at 5, 6
    monkeypatch.setattr(Trainer, "_validate", lambda self: next(scores))
    run = tmp_path / "run"
    summary = train(_config(task01, run, epochs=8, patience=2), progress=False)
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3, 4, 5, 6]  # 3 reset nothing; 5, 6 ended it
    assert (summary["best_epoch"], summary["best_dice"], summary["stale_epochs"]) == (4, 0.3, 2)
    assert load_checkpoint(run / "best.pt")["run_state"]["epoch"] == 4
    assert load_checkpoint(run / "last.pt")["run_state"]["epoch"] == 6


def test_should_stop_on_patience_and_time_cap(task01: Path, tmp_path: Path) -> None:
    import time

    from trainer.train import RunState, Trainer

    trainer = Trainer(_config(task01, tmp_path / "run", patience=3), progress=False)
    trainer.state = RunState(stale_epochs=2)
    assert not trainer._should_stop([1.0])
    trainer.state.stale_epochs = 3
    assert trainer._should_stop([1.0])
    trainer.state.stale_epochs = 0
    trainer.config.max_minutes = 1.0
    trainer.started = time.monotonic() - 50
    assert not trainer._should_stop([5.0])  # 50 s + 5 s < 60 s
    assert trainer._should_stop([15.0])  # another 15 s epoch would pass the minute
    with pytest.raises(TrainerError, match="patience 0 must be at least 1"):
        _config(task01, tmp_path / "r0", patience=0).check()


def test_no_validation_case_is_a_clear_error_before_training(task01: Path, tmp_path: Path) -> None:
    from converters.synthetic import write_synthetic_task01
    from trainer.train import train

    run = tmp_path / "run"
    with pytest.raises(TrainerError, match=r"validation fraction 0\.0 leaves no validation case among 3"):
        train(_config(task01, run, val_fraction=0.0), progress=False)
    assert not run.exists()
    one = write_synthetic_task01(tmp_path / "one" / "Task01_BrainTumour", 1, seed=3, shape=SHAPE)
    with pytest.raises(TrainerError, match=r"validation fraction 0\.34 leaves no validation case among 1"):
        train(_config(one, run, val_fraction=0.34), progress=False)
    assert not run.exists()
