"""The models the node runs: the active model of a task, verified, compiled once, swapped when it changes.

Two runtimes share the rules (:class:`ActiveModel`): :class:`ModelRuntime` for the node's
segmentation task and :class:`BrainExtractorRuntime` for ``brain_extraction``. Workers call
``refresh()`` between jobs: a cheap ``Registry.active(task)`` query. When the active model changed,
the new model's files are hashed against their recorded sha256 before OpenVINO sees them; a missing
or tampered file is refused with a clear error and the previous model keeps serving.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from converters.cpu import cpu_flags, int8_may_saturate
from converters.exceptions import ModelCardError
from db.card import check_file, sha256_file
from db.registry import ModelInfo, Registry
from node.brain_extraction import BrainExtractor
from node.exceptions import ModelLoadError
from node.segmenter import DEFAULT_BATCH, OpenVINOSegmenter

logger = logging.getLogger(__name__)

#: Seconds before a refused model (tampered file...) is checked again.
RETRY_REFUSED_SECONDS = 30.0

#: Device names OpenVINO resolves itself from the available ones.
VIRTUAL_DEVICES = ("AUTO", "MULTI", "HETERO", "BATCH")


def check_device(device: str, available: list[str] | None = None) -> str:
    """Return ``device`` when OpenVINO can run on it, else raise :class:`ModelLoadError`.

    ``CPU``, ``GPU``, ``GPU.1``, ``NPU`` must be in ``ov.Core().available_devices`` (``GPU``
    matches ``GPU.0``...); ``AUTO``, ``MULTI:...``, ``HETERO:...`` are passed through.
    """
    name = device.strip().upper()
    if not name:
        raise ModelLoadError("node.inference_device is empty (use CPU, GPU, NPU or AUTO)")
    if name.split(":")[0] in VIRTUAL_DEVICES:
        return device.strip()
    if available is None:
        import openvino as ov

        available = list(ov.Core().available_devices)
    if any(d.upper() == name or d.upper().split(".")[0] == name for d in available):
        return device.strip()
    raise ModelLoadError(
        f"node.inference_device {device!r} is not available on this machine "
        f"(OpenVINO sees: {', '.join(available) or 'none'}); set [node] inference_device"
    )


def verify_files(info: ModelInfo) -> None:
    """Raise :class:`ModelLoadError` naming the first missing or tampered file of ``info``.

    Each file is checked against its recorded size and sha256 (:func:`db.card.check_file`).
    """
    for f in info.files:
        path = Path(f.path)
        check = check_file(path, f.sha256, f.size)
        if check.status == "missing":
            raise ModelLoadError(f"model {info.label}: file {path} is missing; not loaded")
        if not check.ok:
            actual = check.actual_sha256 or sha256_file(path)  # None when the size already differed
            raise ModelLoadError(
                f"model {info.label}: file {path} sha256 {actual[:12]}... does not match the recorded "
                f"{f.sha256[:12]}... (tampered or corrupt); not loaded"
            )


def job_label(info: ModelInfo) -> str:
    """``name version (precision, #id)``: how job records and logs name a loaded model."""
    return f"{info.name} {info.version} ({info.precision}, #{info.id})"


@dataclass
class LoadedModel:
    """A verified, compiled model."""

    info: ModelInfo
    card: dict[str, Any]
    segmenter: OpenVINOSegmenter
    #: One inference at a time per compiled model (its default infer request is not thread-safe).
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def label(self) -> str:
        """``name version (precision, #id)`` for job records."""
        return job_label(self.info)


class _Loaded(Protocol):
    info: ModelInfo

    @property
    def label(self) -> str: ...


L = TypeVar("L", bound=_Loaded)


@dataclass
class LoadedExtractor:
    """A verified, compiled brain extractor."""

    info: ModelInfo
    card: dict[str, Any]
    extractor: BrainExtractor
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def label(self) -> str:
        """``name version (precision, #id)`` for job records."""
        return job_label(self.info)


def int8_caveat(info: ModelInfo, flags: frozenset[str] | None = None) -> str | None:
    """Why an INT8 model may be less accurate on this CPU than its FP32 parent, or None.

    On a CPU without VNNI or AMX (AVX2 only), OpenVINO computes the INT8 model's u8 x s8 products with
    instructions that add pairs in 16 bits, which can saturate unless NNCF's overflow fix was applied
    to every layer (``calibration.overflow_fix == "enable"`` in the card, what ``segnode export`` and
    ``segnode requantize`` do). Measured on such a CPU with segnode-wt-flair 2.1.0, quantized without
    it: validation Dice 0.931 against 0.943 for its FP32 IR, and 0.42 against 0.63 on a holdout case;
    2.1.1, the same FP32 IR quantized with the fix, gave 0.943 on the validation cases.
    """
    if info.precision != "int8":
        return None
    if not int8_may_saturate(info.calibration, cpu_flags() if flags is None else flags):
        return None
    return (
        f"model {info.label} is INT8, quantized without NNCF's overflow fix, and this CPU has no VNNI "
        "or AMX (AVX2 only): its accuracy may fall below its FP32 parent's; quantize it again "
        "(segnode requantize) or promote the FP32 artifact (segnode models promote ID)"
    )


class ActiveModel(Generic[L]):
    """Keeps a task's active model compiled; thread-safe. Subclasses say how a model is compiled.

    Parameters
    ----------
    registry:
        The model table.
    task:
        The task whose active model this runs.
    device:
        OpenVINO device, checked with :func:`check_device` at construction.
    """

    def __init__(self, registry: Registry, task: str, device: str = "CPU") -> None:
        self.registry = registry
        self.task = task
        self.device = check_device(device)
        self._lock = threading.Lock()
        self._current: L | None = None
        self._refused: dict[int, str] = {}
        self._refused_at: dict[int, float] = {}
        self.last_error: str = ""
        #: The task's active model was refused at its last load (its files fail their check, OpenVINO
        #: cannot compile it...): :attr:`current` is then an older model, or None.
        self.active_refused = False

    @property
    def current(self) -> L | None:
        """The model serving now (None before the first successful load)."""
        return self._current

    def compile(self, info: ModelInfo, xml: Path) -> L:
        """Compile verified model ``info`` (its first ``.xml`` is ``xml``); raises on failure."""
        raise NotImplementedError

    def load(self, info: ModelInfo) -> L:
        """Verify and compile ``info``; raises :class:`ModelLoadError`."""
        verify_files(info)
        if not info.card:
            raise ModelLoadError(f"model {info.label} has no model card; not loaded")
        xml = next((Path(f.path) for f in info.files if str(f.path).endswith(".xml")), None)
        if info.kind != "ir" or xml is None:
            raise ModelLoadError(f"model {info.label} is not an OpenVINO IR (kind {info.kind!r}); not loaded")
        try:
            return self.compile(info, xml)
        except ModelCardError as exc:  # the card, not OpenVINO: say so (segnode models show ID)
            raise ModelLoadError(
                f"model {info.label}: its model card is not one this node can run: {exc}; not loaded"
            ) from exc
        except ModelLoadError as exc:  # already says what failed (file unreadable, warm-up inference...)
            raise ModelLoadError(f"model {info.label}: {exc}; not loaded") from exc
        except Exception as exc:
            raise ModelLoadError(f"model {info.label}: OpenVINO cannot compile {xml}: {exc}") from exc

    def refresh(self) -> L | None:
        """Swap to the task's active model if it changed; on failure keep the previous one.

        Returns the model to use now (None when there has never been a usable one).
        """
        return self.refresh_to(self.registry.active_id(self.task))

    def refresh_to(self, active_id: int | None) -> L | None:
        """:meth:`refresh` with the task's active model id already read (``None``: no active model),
        e.g. every task's at once by :meth:`~db.registry.Registry.active_ids`."""
        # The model's whole row is read only when it is not the one serving.
        current = self._current
        if current is not None and active_id == current.info.id:
            if self.last_error:  # e.g. rolled back to it after a newer model was refused
                self.last_error = ""
                self.active_refused = False
            return current
        active = self.registry.active(self.task) if active_id is not None else None
        with self._lock:
            current = self._current
            if active is None:
                self.active_refused = False
                if current is None:
                    self.last_error = f"no active model for task {self.task!r} (segnode models promote ID)"
                return current
            if current is not None and current.info.id == active.id:
                return current
            refused_at = self._refused_at.get(active.id)
            if refused_at is not None and time.monotonic() - refused_at < RETRY_REFUSED_SECONDS:
                return self._kept(current)
            try:
                loaded = self.load(active)
            except ModelLoadError as exc:
                if self._refused.get(active.id) != str(exc):
                    logger.error(
                        "%s; %s", exc, "keeping the previous model" if current else "no model serving"
                    )
                self._refused[active.id] = str(exc)
                self._refused_at[active.id] = time.monotonic()
                self.last_error = str(exc)
                self.active_refused = True
                return self._kept(current)
            self._current = loaded
            self.last_error = ""
            self.active_refused = False
            caveat = int8_caveat(active)
            if caveat:
                logger.warning("%s", caveat)
            logger.info(
                "serving %s model %s on %s%s",
                self.task,
                loaded.label,
                self.device,
                f" (was {current.label})" if current else "",
            )
            return loaded


    def _kept(self, current: L | None) -> L | None:
        """``current``, kept serving while the active model is refused, unless an administrator has
        since retired it: a retired model never serves (studies then wait queued, and the health
        check says why). Called with the lock held."""
        if current is None:
            return None
        try:
            status = self.registry.get(current.info.id).status
        except Exception:  # the model table does not answer: keep serving, the poll reports it
            return current
        if status != "retired":
            return current
        logger.error(
            "%s was retired while it served in place of the refused active model: no %s model serving",
            current.label, self.task,
        )
        self._current = None
        self.last_error = f"{current.label} was retired and the active model is refused: {self.last_error}"
        return None


class ModelRuntime(ActiveModel[LoadedModel]):
    """Keeps the segmentation task's active model compiled; thread-safe.

    Parameters
    ----------
    registry:
        The model table.
    task:
        ``whole_tumor`` or ``brats_regions``.
    device:
        OpenVINO device, checked with :func:`check_device` at construction.
    batch_size:
        Slices per OpenVINO request, a static batch (:class:`node.segmenter.OpenVINOSegmenter`).
    mirror:
        Test-time mirroring (``[inference] mirror``, :data:`node.segmenter.MIRROR_MODES`).
    views:
        1 or 3 slice axes of the model's grid (``[inference] views``).
    """

    def __init__(
        self,
        registry: Registry,
        task: str,
        device: str = "CPU",
        batch_size: int = DEFAULT_BATCH,
        mirror: str = "none",
        views: int = 1,
    ) -> None:
        super().__init__(registry, task, device)
        self.batch_size = batch_size
        self.mirror = mirror
        self.views = views

    def compile(self, info: ModelInfo, xml: Path) -> LoadedModel:
        """An :class:`OpenVINOSegmenter` of ``xml``."""
        assert info.card is not None
        segmenter = OpenVINOSegmenter(
            info.card, xml, device=self.device, batch_size=self.batch_size, mirror=self.mirror,
            views=self.views,
        )
        return LoadedModel(info=info, card=dict(info.card), segmenter=segmenter)

    def release_memory(self) -> None:
        """Hand the serving model's intermediate buffers back to the system (between jobs)."""
        loaded = self._current
        if loaded is not None:
            with loaded.lock:
                loaded.segmenter.release_memory()


class BrainExtractorRuntime(ActiveModel[LoadedExtractor]):
    """Keeps the active ``brain_extraction`` model compiled; thread-safe.

    Its IR files (the card's ``networks`` of its precision) must be among the model's registered,
    verified files: a network the card names elsewhere is refused, not compiled unchecked.
    """

    def __init__(self, registry: Registry, device: str = "CPU", threads: int | None = None) -> None:
        super().__init__(registry, "brain_extraction", device)
        self.threads = threads

    def compile(self, info: ModelInfo, xml: Path) -> LoadedExtractor:
        """A :class:`node.brain_extraction.BrainExtractor` of the model's directory."""
        assert info.card is not None
        # Only the files verify_files checked: the card's networks may name others (a changed copy).
        extractor = BrainExtractor(
            info.card,
            xml.parent,
            device=self.device,
            threads=self.threads,
            precision=info.precision,
            verified=[Path(f.path) for f in info.files],
        )
        return LoadedExtractor(info=info, card=dict(info.card), extractor=extractor)
