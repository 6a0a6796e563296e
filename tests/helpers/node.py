"""The node in-process: a tiny real OpenVINO model and its installation, settings for a node on
loopback, a started node (``running_node``), and a catching storage SCP as its destination.

(tests/helpers/served.py runs ``segnode serve`` in a subprocess instead.)
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.config import Destination, Settings

if TYPE_CHECKING:
    from node.service import NodeService

WHOLE_TUMOUR_LABEL = {
    "value": 1,
    "name": "Whole tumour",
    "category": {"scheme": "SCT", "code": "49755003", "meaning": "Morphologically abnormal structure"},
    "type": {"scheme": "SCT", "code": "108369006", "meaning": "Neoplasm"},
}


def _sha(path: Path) -> dict[str, Any]:
    return {
        "path": path.name,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "size": path.stat().st_size,
    }


def make_threshold_model(
    out_dir: Path,
    *,
    name: str = "test-threshold",
    version: str = "1.0.0",
    threshold: float = 1.5,
    gain: float = 8.0,
    crop: tuple[int, int] = (64, 64),
    modalities: tuple[str, ...] = ("FLAIR",),
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> Path:
    """A real OpenVINO IR: logits = gain * (x - threshold) of the first channel, with its model.json.

    Deterministic and independent of any training: a voxel is tumour when its z-scored first
    channel exceeds ``threshold``.
    """
    import openvino as ov
    import openvino.opset13 as ops

    out_dir.mkdir(parents=True, exist_ok=True)
    x = ops.parameter([-1, len(modalities), crop[0], crop[1]], np.float32, name="image")
    first = (
        ops.slice(x, np.array([0]), np.array([1]), np.array([1]), np.array([1])) if len(modalities) > 1 else x
    )
    logits = ops.multiply(
        ops.subtract(first, ops.constant(np.float32(threshold))), ops.constant(np.float32(gain))
    )
    model = ov.Model([logits], [x], name)
    xml = out_dir / "model_fp32.xml"
    ov.save_model(model, str(xml), compress_to_fp16=False)
    mean = {"dice": 0.8, "jaccard": 0.7, "sensitivity": 0.8, "specificity": 0.99, "hd95": 5.0}
    card = _test_card(name, version, "whole_tumor", modalities, crop, spacing, xml, mean)
    card["output"] = {"activation": "sigmoid", "threshold": 0.5}
    card["labels"] = [WHOLE_TUMOUR_LABEL]
    card["training"] = {"note": "test model: a fixed threshold, not trained"}
    (out_dir / "model.json").write_text(json.dumps(card, indent=2))
    return out_dir


def _test_card(
    name: str,
    version: str,
    task: str,
    modalities: Sequence[str],
    crop: tuple[int, int],
    spacing: Sequence[float],
    xml: Path,
    mean: dict[str, float],
) -> dict[str, Any]:
    """The model.json of a test model: one IR FP32 artifact (``xml``) with made-up validation metrics;
    the caller adds ``output``, ``labels`` and ``training``."""
    return {
        "format_version": 1,
        "name": name,
        "version": version,
        "task": task,
        "modalities": list(modalities),
        "preprocessing": {
            "orientation": "RAS",
            "spacing_mm": list(spacing),
            "crop_size": list(crop),
            "normalization": "zscore_nonzero",
            "slice_axis": 2,
        },
        "artifacts": [
            {
                "key": "ir_fp32",
                "kind": "ir",
                "precision": "fp32",
                "parent": None,
                "files": [_sha(xml), _sha(xml.with_suffix(".bin"))],
                "metrics": {"cases": ["synthetic-0"], "split": "validation", "mean": mean},
            }
        ],
        "data_provenance": [],
    }


#: The Decathlon tissues of a ``brats_regions`` card, with the codes of db/card.py.
def regions_labels() -> list[dict[str, Any]]:
    """The card labels of a ``brats_regions`` model (db.card.TASK_LABELS)."""
    from db.card import TASK_LABELS

    return [dict(label) for label in TASK_LABELS["brats_regions"]]


#: Per class 1..3 (edema, non-enhancing/necrotic, enhancing): the weights of the z-scored input channels
#: and the level above which their sum wins over the background (logit 0), in :func:`make_regions_model`.
RegionRules = dict[int, tuple[dict[str, float], float]]
REGIONS_RULES: RegionRules = {1: ({"FLAIR": 1.0}, 1.5), 2: ({"T2": 1.0}, 2.5), 3: ({"T1GD": 1.0}, 2.5)}


def make_regions_model(
    out_dir: Path,
    *,
    name: str = "test-regions",
    version: str = "1.0.0",
    gain: float = 8.0,
    crop: tuple[int, int] = (192, 192),
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    rules: RegionRules | None = None,
    batch: int = -1,
) -> Path:
    """A real 4-channel ``brats_regions`` OpenVINO IR (FLAIR, T1, T1GD, T2 -> 4 softmax classes).

    One 1x1 convolution: the logit of class ``k`` is ``gain * (sum_c w_c x_c - level_k)`` for the
    channel weights and level of ``rules[k]`` (default :data:`REGIONS_RULES`), the background's is 0;
    so a voxel gets the class whose weighted sum exceeds its level most, deterministically.
    ``batch``: the input's batch dimension (-1: dynamic).
    """
    import openvino as ov
    import openvino.opset13 as ops

    rules = rules or REGIONS_RULES
    modalities = ("FLAIR", "T1", "T1GD", "T2")
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = np.zeros((4, 4, 1, 1), dtype=np.float32)
    bias = np.zeros((1, 4, 1, 1), dtype=np.float32)
    for label, (channel_weights, level) in rules.items():
        for channel, weight in channel_weights.items():
            weights[label, modalities.index(channel), 0, 0] = gain * weight
        bias[0, label, 0, 0] = -gain * level
    x = ops.parameter([batch, 4, crop[0], crop[1]], np.float32, name="image")
    conv = ops.convolution(x, ops.constant(weights), [1, 1], [0, 0], [0, 0], [1, 1])
    logits = ops.add(conv, ops.constant(bias))
    xml = out_dir / "model_fp32.xml"
    ov.save_model(ov.Model([logits], [x], name), str(xml), compress_to_fp16=False)
    mean = {"dice": 0.5, "jaccard": 0.4, "sensitivity": 0.5, "specificity": 0.99, "hd95": 9.0}
    card = _test_card(name, version, "brats_regions", modalities, crop, spacing, xml, mean)
    card["output"] = {"activation": "softmax"}
    card["labels"] = regions_labels()
    card["training"] = {"note": "test model: fixed per-channel thresholds (a 1x1 convolution), not trained"}
    (out_dir / "model.json").write_text(json.dumps(card, indent=2))
    return out_dir


def install_model(registry: Any, model_dir: Path) -> Any:
    """Import ``model_dir`` into ``registry`` and promote its IR; returns the promoted ModelInfo."""
    infos = registry.import_dir(model_dir)
    ir = next(i for i in infos if i.kind == "ir")
    return registry.promote(ir.id, by="test", reason="test model")


@contextmanager
def running_node(settings: Settings, model_dir: Path) -> Iterator[NodeService]:
    """A started node serving ``model_dir``'s IR as its active model; stopped on leaving."""
    from node.service import NodeService

    node = NodeService(settings)
    install_model(node.registry, model_dir)
    node.start()
    try:
        yield node
    finally:
        node.stop()


@functools.cache
def _catcher_contexts(sop_classes: frozenset[str] | None, transfer_syntaxes: tuple[str, ...]) -> AE:
    """An AE with a :class:`CatchingSCP`'s contexts, built once per process and argument (copied into each
    catcher's AE: adding 180 contexts validates ~8000 UIDs, ~0.25 s)."""
    ae = AE()
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        if sop_classes is None or str(context.abstract_syntax) in sop_classes:
            syntaxes = list(transfer_syntaxes or ALL_TRANSFER_SYNTAXES)
            ae.add_supported_context(str(context.abstract_syntax), syntaxes)
    return ae


class CatchingSCP:
    """A storage SCP that keeps every data set it receives (the destination PACS of the tests).

    ``status``: what it answers each C-STORE (a Warning such as 0xB000 still keeps the data set);
    ``sop_classes``: the storage SOP classes it accepts (default: every one); ``stall_seconds``: how
    long it waits before answering its first C-STORE (a PACS that hangs); ``transfer_syntaxes``: the
    transfer syntaxes it accepts (default: every one; ``[ImplicitVRLittleEndian]`` is ``storescp +xi``);
    ``abort_at``: the C-STORE (1 is the first) at which it aborts the association instead of answering.
    """

    def __init__(
        self,
        ae_title: str = "CATCHER",
        *,
        status: int = 0x0000,
        sop_classes: Collection[str] | None = None,
        stall_seconds: float = 0.0,
        transfer_syntaxes: Sequence[str] | None = None,
        abort_at: int = 0,
    ) -> None:
        self.ae_title = ae_title
        self.status = status
        self.abort_at = abort_at
        self.stores = 0
        self.stall_seconds = stall_seconds
        self.received: list[Dataset] = []
        self.changed = threading.Condition()
        from node.scp import copy_supported_contexts  # here: importing this module stays light

        self.ae = AE(ae_title=ae_title)
        accepted = None if sop_classes is None else frozenset(map(str, sop_classes))
        copy_supported_contexts(_catcher_contexts(accepted, tuple(transfer_syntaxes or ())), self.ae)
        self.server: Any = None
        self.port = 0

    def _on_store(self, event: Any) -> int:
        self.stores += 1
        if self.stores == self.abort_at:
            event.assoc.abort()
            return self.status  # never sent: the association is gone
        if self.stall_seconds and not self.received:
            time.sleep(self.stall_seconds)
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self.changed:
            self.received.append(ds)
            self.changed.notify_all()
        return self.status

    def start(self, port: int) -> CatchingSCP:
        """Listen on 127.0.0.1:``port``."""
        self.port = port
        self.server = self.ae.start_server(
            ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        return self

    def stop(self) -> None:
        """Stop listening."""
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def wait_for(self, predicate: Callable[[list[Dataset]], bool], timeout: float) -> list[Dataset]:
        """Wait until ``predicate(received)`` holds; AssertionError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not predicate(self.received):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"timed out after {timeout} s; received {len(self.received)} objects"
                    )
                self.changed.wait(left)
            return list(self.received)

    def of_modality(self, modality: str) -> list[Dataset]:
        """Received data sets with this Modality (SEG, SR)."""
        with self.changed:
            return [ds for ds in self.received if ds.get("Modality") == modality]


#: How often a test node's worker, sender and early-analysis loops look for work no event announced (the
#: node's default is 1 s). Jobs, results and settled series wake them at once; at 0.05 s their database
#: queries were about a tenth of the suite's CPU.
TEST_POLL_SECONDS = 0.25


def node_settings(
    tmp: Path,
    port: int,
    destinations: list[Destination] | None = None,
    *,
    idle: float = 0.3,
    db_url: str | None = None,
) -> Settings:
    """Settings for an in-process node on loopback with fast polling."""
    settings = Settings()
    settings.node.port = port
    settings.node.host = "127.0.0.1"
    settings.node.spool_dir = str(tmp / "spool")
    settings.node.study_idle_seconds = idle
    settings.node.poll_seconds = TEST_POLL_SECONDS
    settings.node.min_free_disk_mb = 1
    settings.node.send_retry_base_seconds = 0.2
    settings.node.send_retry_max_seconds = 1.0
    settings.database.url = db_url or f"sqlite:///{tmp / 'node.db'}"
    settings.metrics.port = 0
    settings.node.bootstrap_default_model = False  # each test installs the model it needs
    settings.destinations = destinations or []
    return settings



def count_direct_responses(monkeypatch: Any) -> list[int]:
    """Record the context ID of every C-STORE response the quick path writes straight to the socket
    (node/store_response.py ``encode_p_data_tf``); the returned list fills as they are sent."""
    from node import store_response

    direct: list[int] = []
    encode = store_response.encode_p_data_tf

    def counting(context_id: int, pdv: bytes) -> bytes:
        direct.append(context_id)
        return encode(context_id, pdv)

    monkeypatch.setattr(store_response, "encode_p_data_tf", counting)
    return direct
