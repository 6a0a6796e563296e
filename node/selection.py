"""Series selection: which series of a study is FLAIR, T1, T1 post-contrast (T1GD) or T2.

A series is taken for a modality by its acquisition attributes first, its SeriesDescription /
ProtocolName second, and a description never overrides an attribute that contradicts it:

* FLAIR: inversion recovery (``IR`` in ScanningSequence (0018,0020), or an IR option in
  ScanOptions (0018,0022)) with InversionTime (0018,0082) >= ``flair_min_ti_ms`` and EchoTime
  (0018,0081) >= ``flair_min_te_ms``. An MP-RAGE is inversion recovery too, but with TI ~ 900-1100
  ms and TE ~ 3 ms, so it is never a FLAIR, whatever its description says.
* T1GD: a T1-weighted series with ContrastBolusAgent (0018,0010) present, or whose description says
  post-contrast.
* T1: T1-weighted (short TE, and short TR or an IR with short TI) without contrast agent.
* T2: long TE, not inversion recovery.

Among the candidates for a modality an axial series wins, then the one with most slices. A series
serves at most one modality (chosen in the order FLAIR, T1GD, T1, T2).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from node.config import SelectionSettings
from node.exceptions import SelectionError

logger = logging.getLogger(__name__)


#: The rules are the ``[selection]`` section of the config.
SelectionRules = SelectionSettings


@dataclass
class SeriesInfo:
    """What selection needs to know about one series (no patient data)."""

    series_instance_uid: str
    description: str
    protocol: str
    sop_class_uid: str
    scanning_sequence: list[str]
    sequence_variant: list[str]
    scan_options: list[str]
    repetition_time: float | None
    echo_time: float | None
    inversion_time: float | None
    contrast_agent: str
    normal: tuple[float, float, float] | None
    slices: int
    paths: list[Path] = field(default_factory=list)

    @property
    def label(self) -> str:
        """Short text for log lines and reasons."""
        description = self.description or "no description"
        return f"series {self.series_instance_uid} ({description}, {self.slices} slices)"

    @property
    def inversion_recovery(self) -> bool:
        """IR in ScanningSequence or an IR scan option (e.g. GE ``IR_GEMS``)."""
        return "IR" in self.scanning_sequence or any(re.search(r"(^|_)IR(_|$)", o) for o in self.scan_options)

    @property
    def axial(self) -> bool:
        """The slice normal is closest to the patient's S axis (PS3.3 C.7.6.2.1.1)."""
        return self.normal is not None and int(np.argmax(np.abs(self.normal))) == 2

    @property
    def text(self) -> str:
        """SeriesDescription and ProtocolName together, for the patterns."""
        return f"{self.description} {self.protocol}"


def _multi(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [v.strip().upper() for v in value.split("\\") if v.strip()]
    return [str(v).strip().upper() for v in value]


def _float(value: Any) -> float | None:
    try:
        return None if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return None


def _deep_get(ds: Dataset, keyword: str) -> Any:
    """An attribute at the top level or in the first item of any (functional group) sequence."""
    if keyword in ds:
        return ds.get(keyword)
    for elem in ds:
        if elem.VR == "SQ" and elem.value:
            found = _deep_get(elem.value[0], keyword)
            if found is not None:
                return found
    return None


def series_info(ds: Dataset, paths: Sequence[Path], slices: int) -> SeriesInfo:
    """Build a :class:`SeriesInfo` from one header of the series (single- or multi-frame)."""
    iop = _deep_get(ds, "ImageOrientationPatient")
    normal = None
    if iop is not None and len(iop) == 6:
        n = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
        normal = (float(n[0]), float(n[1]), float(n[2]))
    echo = _float(_deep_get(ds, "EchoTime"))
    if echo is None:
        echo = _float(_deep_get(ds, "EffectiveEchoTime"))
    ti = _float(_deep_get(ds, "InversionTime"))
    if ti is None:
        times = _deep_get(ds, "InversionTimes")
        ti = _float(
            times[0] if isinstance(times, list | tuple | pydicom.multival.MultiValue) and times else times
        )
    scanning = _multi(_deep_get(ds, "ScanningSequence"))
    if not scanning and str(_deep_get(ds, "InversionRecovery") or "").upper() == "YES":
        scanning = ["IR"]
    agent = _deep_get(ds, "ContrastBolusAgent")
    return SeriesInfo(
        series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
        description=str(ds.get("SeriesDescription", "") or ""),
        protocol=str(ds.get("ProtocolName", "") or ""),
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        scanning_sequence=scanning,
        sequence_variant=_multi(_deep_get(ds, "SequenceVariant")),
        scan_options=_multi(_deep_get(ds, "ScanOptions")),
        repetition_time=_float(_deep_get(ds, "RepetitionTime")),
        echo_time=echo,
        inversion_time=ti,
        contrast_agent=str(agent or "").strip(),
        normal=normal,
        slices=slices,
        paths=list(paths),
    )


def scan_series(paths: Iterable[Path]) -> list[SeriesInfo]:
    """Read the headers of spooled files (no pixel data) and group them by SeriesInstanceUID."""
    groups: dict[str, tuple[Dataset, list[Path], int]] = {}
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        uid = str(ds.get("SeriesInstanceUID", ""))
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if uid in groups:
            first, files, count = groups[uid]
            files.append(Path(path))
            groups[uid] = (first, files, count + frames)
        else:
            groups[uid] = (ds, [Path(path)], frames)
    return [series_info(ds, files, count) for ds, files, count in groups.values()]


def scan_grouped_series(groups: Mapping[str, Sequence[Path]]) -> list[SeriesInfo]:
    """Like :func:`scan_series` for files already grouped by series (from the database): one header
    read per single-frame series instead of one per file."""
    out = []
    for paths in groups.values():
        first = pydicom.dcmread(paths[0], stop_before_pixels=True)
        frames = int(first.get("NumberOfFrames", 1) or 1)
        if frames > 1 or len(paths) == 1:
            frames = sum(
                int(pydicom.dcmread(p, stop_before_pixels=True).get("NumberOfFrames", 1) or 1) for p in paths
            )
        else:
            frames = len(paths)
        out.append(series_info(first, [Path(p) for p in paths], frames))
    return out


class SeriesSelector:
    """Applies :class:`SelectionRules` to the series of a study."""

    def __init__(self, rules: SelectionRules | None = None) -> None:
        self.rules = rules or SelectionRules()
        flags = re.IGNORECASE
        self._re = {
            "FLAIR": re.compile(self.rules.flair_pattern, flags),
            "T1GD": re.compile(self.rules.t1gd_pattern, flags),
            "T1": re.compile(self.rules.t1_pattern, flags),
            "T2": re.compile(self.rules.t2_pattern, flags),
            "exclude": re.compile(self.rules.exclude_pattern, flags),
        }

    # -- per-modality predicates -------------------------------------------------------------------------

    def is_flair(self, s: SeriesInfo) -> bool:
        """Long-TI, long-TE inversion recovery; a description alone never beats contradicting TI/TE."""
        r = self.rules
        ti, te = s.inversion_time, s.echo_time
        if (ti is not None and ti < r.flair_min_ti_ms) or (te is not None and te < r.flair_min_te_ms):
            return False
        if s.inversion_recovery and ti is not None and te is not None:
            return True
        return bool(self._re["FLAIR"].search(s.text))

    def _t1_weighted(self, s: SeriesInfo) -> bool:
        r = self.rules
        te, tr, ti = s.echo_time, s.repetition_time, s.inversion_time
        if te is not None and te > r.t1_max_te_ms:
            return False
        if te is not None and ((tr is not None and tr < 1000) or (s.inversion_recovery and (ti or 0) < 1500)):
            return True
        return bool(self._re["T1"].search(s.text))

    def is_t1gd(self, s: SeriesInfo) -> bool:
        """T1-weighted with a contrast agent recorded, or described as post-contrast."""
        if self.is_flair(s) or not self._t1_weighted(s):
            return False
        return bool(s.contrast_agent) or bool(self._re["T1GD"].search(s.text))

    def is_t1(self, s: SeriesInfo) -> bool:
        """T1-weighted without contrast agent."""
        return not self.is_flair(s) and self._t1_weighted(s) and not self.is_t1gd(s)

    def is_t2(self, s: SeriesInfo) -> bool:
        """Long TE, not inversion recovery, or described as T2 without contradicting TE."""
        te = s.echo_time
        if self.is_flair(s) or s.inversion_recovery:
            return False
        if te is not None:
            return te >= self.rules.t2_min_te_ms
        return bool(self._re["T2"].search(s.text))

    def matches(self, modality: str, s: SeriesInfo) -> bool:
        """Whether series ``s`` may serve as ``modality`` (FLAIR, T1, T1GD, T2)."""
        if self._re["exclude"].search(s.text):
            return False
        check = {"FLAIR": self.is_flair, "T1GD": self.is_t1gd, "T1": self.is_t1, "T2": self.is_t2}.get(
            modality
        )
        if check is None:
            raise SelectionError(f"modality {modality!r} is not one of FLAIR, T1, T1GD, T2")
        return check(s)

    def select(self, series: Sequence[SeriesInfo], modalities: Sequence[str]) -> dict[str, SeriesInfo]:
        """Choose one series per modality; axial first, then most slices.

        Raises
        ------
        SelectionError
            A modality has no candidate; the message names it and lists the series considered.
        """
        chosen: dict[str, SeriesInfo] = {}
        taken: set[str] = set()
        order = [m for m in ("FLAIR", "T1GD", "T1", "T2") if m in modalities]
        order += [m for m in modalities if m not in order]
        for modality in order:
            candidates = [
                s for s in series if s.series_instance_uid not in taken and self.matches(modality, s)
            ]
            if not candidates:
                seen = "; ".join(s.label for s in series) or "no MR series"
                raise SelectionError(f"no {modality} series in the study (considered: {seen})")
            best = max(candidates, key=lambda s: (s.axial, s.slices))
            chosen[modality] = best
            taken.add(best.series_instance_uid)
            logger.info("%s: %s", modality, best.label)
        return chosen
