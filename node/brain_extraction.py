"""Brain extraction on the CPU: deepbet's two networks as OpenVINO IR, compiled once.

The algorithm around the networks is :mod:`converters.brain_mask` (deepbet's, in numpy and scipy);
this module compiles the model directory's two IR files (``models/brain_extraction``, the card's
``networks``) with static shapes and hands them to a :class:`~converters.brain_mask.BrainMasker`.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from converters.brain_mask import (
    NETWORKS,
    BrainExtractionSettings,
    BrainMasker,
    Network,
    NoBrainFoundError,
    brain_volume_ml,
)
from converters.exceptions import ModelCardError
from converters.staged_network import compile_network, foreground_only, on_grid
from db.card import check_runnable_card
from node.exceptions import ModelLoadError
from node.memory import release_compiled, trim_heap

logger = logging.getLogger(__name__)

__all__ = ["BrainExtractor", "NoBrainFoundError", "brain_volume_ml", "compile_networks"]


def compile_networks(
    card: Mapping[str, Any],
    directory: Path,
    device: str = "CPU",
    threads: int | None = None,
    precision: str = "fp32",
    verified: Collection[Path] | None = None,
) -> BrainMasker:
    """The card's two IR networks compiled by OpenVINO (static shapes), in a :class:`BrainMasker`.

    ``verified``: the files whose sha256 was checked (the model's registered files); each network's
    ``.xml`` and its ``.bin`` must be among them, else nothing is compiled. None: no such check (a
    directory the caller vouches for).

    Raises
    ------
    ModelLoadError
        An IR file is missing, not among ``verified``, or OpenVINO cannot compile it.
    ModelCardError
        The card is not a brain-extraction card or names no networks.
    """
    import openvino as ov

    check_runnable_card(card)
    if card["task"] != "brain_extraction":
        raise ModelCardError(f"model {card.get('name')!r} has task {card['task']!r}, not brain_extraction")
    settings = BrainExtractionSettings.from_card(card)
    networks = (card.get("networks") or {}).get(precision)
    if not isinstance(networks, Mapping) or any(k not in networks for k in NETWORKS):
        raise ModelCardError(
            f"model {card.get('name')!r}: networks.{precision} must name the {' and '.join(NETWORKS)} IR"
        )
    core = ov.Core()
    channel = int(card["output"].get("channel", 1))
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    grids = {"bbox": settings.bbox_grid, "brain": settings.brain_grid}
    xmls = {key: Path(directory) / str(networks[key]) for key in NETWORKS}
    checked = None if verified is None else {Path(p).resolve() for p in verified}
    for key, xml in xmls.items():
        if not xml.is_file():
            raise ModelLoadError(f"brain extractor {card.get('name')!r}: {xml} does not exist")
        if checked is None:
            continue
        unchecked = [p for p in (xml, xml.with_suffix(".bin")) if p.resolve() not in checked]
        if unchecked:
            raise ModelLoadError(
                f"brain extractor {card.get('name')!r}: networks.{precision}.{key} names {xml}, but "
                f"{', '.join(str(p) for p in unchecked)} is not among the model's registered files (their "
                "sha256 is checked before loading, this one's was not)"
            )
    nets: dict[str, Network] = {}
    for key, xml in xmls.items():
        try:
            model = core.read_model(str(xml))
            model.reshape([1, 1, *grids[key]])
            # The brain network's instance norms on its 256³ grid exact and in place, the layers around
            # them a slab at a time (converters/staged_network.py); the box network runs whole.
            cut = foreground_only(model, channel)
            network, _ = compile_network(core, cut, device, config, _release_and_trim)
        except (RuntimeError, ValueError) as exc:
            raise ModelLoadError(f"brain extractor: OpenVINO cannot compile {xml}: {exc}") from None
        # Each call leaves no network buffers behind: compile_network releases them after each stage,
        # _release_and_trim giving the freed heap back (the brain network on its 256³ grid would keep
        # ~450 MiB otherwise, between studies too); the heap the preprocessing freed (its resized
        # copies) goes back before the network adds its own.
        nets[key] = on_grid(network, before=trim_heap)
    for key, net in nets.items():
        # One call on zeros at load: OpenVINO's CPU plugin fills each network's own input buffer when
        # it compiles (64 MiB on the brain network's 256³ grid, 8 MiB on the box network's 128³) and
        # frees it at the first inference, which reads the request's tensor instead; otherwise the node
        # idles with it until its first study. 0.8 to 1.7 s more at load on 2 cores, none in a job.
        net(np.zeros(grids[key], dtype=np.float32))
    logger.info(
        "compiled brain extractor %s %s on %s (box %s, brain %s, %s)",
        card.get("name"),
        card.get("version"),
        device,
        grids["bbox"],
        grids["brain"],
        settings.interpolation,
    )
    return BrainMasker(settings, nets["bbox"], nets["brain"])


def _release_and_trim(compiled: Any) -> None:
    """After each stage of a network: its buffers released and the freed heap given back, so that the
    next stage's tensors do not stack on the last one's pages (up to ~90 MiB on the brain network)."""
    release_compiled(compiled)
    trim_heap()


class BrainExtractor:
    """The node's brain extractor: :func:`compile_networks` once, then :meth:`extract` per study.

    Parameters
    ----------
    card:
        The brain extractor's model card (task ``brain_extraction``; docs/model-card.md).
    directory:
        The directory holding the IR files the card's ``networks`` name.
    device:
        OpenVINO device.
    threads:
        ``INFERENCE_NUM_THREADS`` (None: OpenVINO's default, all cores).
    """

    def __init__(
        self,
        card: Mapping[str, Any],
        directory: Path,
        device: str = "CPU",
        threads: int | None = None,
        *,
        precision: str = "fp32",
        verified: Collection[Path] | None = None,
    ) -> None:
        self.card = dict(card)
        self.masker = compile_networks(
            card, directory, device=device, threads=threads, precision=precision, verified=verified
        )
        self.settings = self.masker.settings

    @classmethod
    def from_dir(cls, directory: Path, device: str = "CPU", threads: int | None = None) -> BrainExtractor:
        """The extractor of a model directory (``model.json`` + IR), its files verified first."""
        from db.card import load_card, verify_files

        card = load_card(directory)
        problems = verify_files(card, directory)
        if problems:
            raise ModelLoadError("; ".join(problems))
        checked = [directory / f["path"] for a in card.get("artifacts", []) for f in a.get("files", [])]
        return cls(card, directory, device=device, threads=threads, verified=checked)

    def extract(self, image: npt.NDArray[Any], affine: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
        """The brain mask of ``image`` (RAS (X, Y, Z), as :func:`node.pipeline.assemble_coregistered`
        gives) on its grid; raises :class:`NoBrainFoundError` (see
        :meth:`converters.brain_mask.BrainMasker.extract`)."""
        return self.masker.extract(image, affine)
