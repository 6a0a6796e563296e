"""Series selection: which series of a study is FLAIR, T1, T1 post-contrast (T1GD) or T2.

A series is taken for a modality by its acquisition attributes first, its SeriesDescription /
ProtocolName second, and a description never overrides an attribute that contradicts it. A ProtocolName
that is the same on series of different descriptions is the exam's (GE writes its protocol-library name,
"BRAIN TUMOR PERFUSION", on every series: :func:`exam_protocols`): it neither excludes a series nor says
whether it was given contrast; a series' own ProtocolName (Siemens, Philips) is a hint as its description:

* FLAIR: InversionTime (0018,0082) >= ``flair_min_ti_ms`` and EchoTime (0018,0081) >=
  ``flair_min_te_ms``; such a TI is an inversion even where ScanningSequence (0018,0020) and ScanOptions
  (0018,0022) do not say IR. An MP-RAGE is inversion recovery too, but with TI ~ 900-1100
  ms and TE ~ 3 ms, so it is never a FLAIR, whatever its description says.
* T1GD: a T1-weighted series given contrast by its Contrast/Bolus module (PS3.3 C.7.6.4:
  ContrastBolusAgent (0018,0010), ...Route, ...Volume, ...StartTime, ...TotalDose,
  ...Ingredient; in an Enhanced MR image ContrastBolusAgentAdministered (0018,9361) YES in the
  Contrast/Bolus Usage functional group, PS3.3 C.8.13.4); numeric ones of 0 and agent texts such as
  NONE, "no contrast", "nativ" or "ohne KM" say none was given. A series without any of them: a
  description that says post-contrast (and not pre-contrast), by whole words (``t1gd_pattern``: "post"
  in postop, posterior or "post fossa" and "t1c" in T1COR are none; "KM-" is pre-contrast by
  ``t1_pre_pattern``); else acquired after a series given
  contrast by either (AcquisitionDateTime, else AcquisitionTime, else SeriesTime): contrast stays
  for the rest of the examination. Nothing else makes a T1GD: acquisition order alone does not (two
  T1 series without contrast are common), so a study without evidence of contrast has no T1GD.
* T1: T1-weighted (short TE, and short TR or an IR with short TI) and not T1GD. A gradient echo
  (GR and no SE in ScanningSequence; EchoPulseSequence (0018,9008) GRADIENT in an Enhanced MR image)
  with TE >= ``t2star_min_te_ms`` is T2*-weighted (a T2* GRE, an SWI magnitude): its short TR would
  make it a T1, and it is none. Nor is a balanced steady-state free precession (GE FIESTA, Siemens
  CISS or TrueFISP, Philips bFFE: :meth:`SeriesSelector.balanced_ssfp`), T2/T1-weighted with a TR of a
  few ms, whose whole-brain axial 3D series won the native T1 role over a sagittal MP-RAGE; nor an
  MP2RAGE's inversion images (INV1, INV2 in the series' own text: an INV2 is proton-density-like, and
  the two tied): its UNI image is the T1 a reader uses, DERIVED by its ImageType yet ranked as an
  ORIGINAL one (:attr:`SeriesInfo.original`), and its T1 map (ImageType T1 MAP) is a derived map.
* T2: long TE, not inversion recovery, not echo-planar (EP in ScanningSequence), not a gradient echo.

A series whose ImageType (0008,0008) names a derived map (ADC, TRACE, MIP, subtraction, projection,
localizer) serves no role. Nor, whatever its description says, does a series whose attributes say it is:

* diffusion-weighted: ImageType DIFFUSION, a DiffusionBValue (0018,9087) above 0 (or any in an
  echo-planar series), Philips' private Diffusion B-Factor (2001,xx03 of "Philips Imaging DD 001")
  above 0, a DiffusionDirectionality (0018,9075) other than NONE, or a Siemens ``*ep_b`` SequenceName
  (0018,0024), in any image probed (up to ``ECHO_PROBES`` files spread over the series, or frames of a
  multi-frame one): the first image of a DWI is often its b=0, and a Philips DWI may say EP nowhere
  (ScanningSequence SE) while Philips writes a b-value of 0 on every image, diffusion or not. A DWI
  has a long TE and no inversion, so by TE alone it is a T2; a series of two b-values would then win
  the T2 role by its slice count. A b=0 series exported alone is no T2 either when it says EP (see T2
  above); a Philips one that does not is told only by its description;
* a localizer: ImageType LOCALIZER or SCOUT in any image probed, or several slice orientations (normals
  more than ``LOCALIZER_ANGLE_DEGREES`` apart) among the images probed with at most
  ``LOCALIZER_MAX_SLICES`` slices per orientation, and a like number in each
  (``LOCALIZER_PLANE_RATIO``; one stray image of another orientation does not make a stack a
  localizer): a GE 3-plane loc, whose ImageType often does not say LOCALIZER, is a T1 by its short TE
  and TR, and read whole is refused for its mixed orientations;
* an angiogram: AngioFlag (0018,0025) Y, or an Enhanced MR image flavour ANGIO. A time-of-flight
  angiogram has a short TE and TR, so by them alone it is a T1;
* a phase, real or imaginary image: ComplexImageComponent (0008,9208), or ImageType's vendor values
  P, R, I, PHASE...;
* susceptibility-weighted: an Enhanced MR AcquisitionContrast (0008,9209) T2_STAR, ImageType SWI,
  SWAN or a minimum-intensity projection (MNIP), or a Siemens ``*swi`` / GE ``swan`` SequenceName;
* dynamic: NumberOfTemporalPositions (0020,0105) above 1 (a DCE or DSC perfusion series). A DCE
  series is a T1 given contrast with many times the slices of any other; it used to win the T1GD
  role, be read whole and be refused for its repeated positions. So is a stack of more than
  :data:`MAX_REPEATED_ACQUISITIONS` images to a slice position on average (three time points or more;
  positions counted as the loader tells duplicates) when nothing splits them into acquisitions
  (below): a dynamic series whose headers do not say so (a Philips SE-EPI perfusion: ScanningSequence
  SE, no NumberOfTemporalPositions) is a T2 by its TE, and took the T2 role from the real one by its image
  count ("covers more"), to be refused by the loader for its repeated positions.

A single-frame series holding several echoes at each position (a PD/T2 dual echo: EchoNumbers
(0018,0086) and EchoTime differ between its images) is taken as one candidate per echo, each with
its own TE: the long echo may be the T2, the short one serves no role. Magnitude images are likewise
taken apart from phase, real or imaginary images reconstructed into the same series. So is each stack
of a series that holds several: an axial and a coronal stack (slice normals of ImageOrientationPatient
apart by more than :data:`STACK_NORMAL_TOLERANCE`; a vendor's "AX+COR", a 2D sequence acquired in two
planes), and, at the same positions, two acquisitions that AcquisitionNumber (0020,0012) tells apart (a
repeat after motion; three or more are a dynamic series' phases, kept whole). The loader
(converters/dicom_series.py) refuses a volume of mixed orientations or repeated positions, so such a
series read whole would serve no role; each stack is a candidate of its own (``stack``: "coronal stack",
"acquisition 2"), ranked as any other. A stack of fewer slices than a
series needs (the ``[qc]`` ``min_slices``) serves no role, and a series that is a localizer by its
orientations (above; judged on all its images) is not split: it stays one candidate that serves no
role, even with 8 or more slices a plane.

Among the candidates for a modality (:func:`ranked`) an ORIGINAL image (or an MP2RAGE's UNI) wins over a
DERIVED one, then one that covers about as much as the others over a slab, then the finer slices
(SliceThickness and SpacingBetweenSlices; 1 mm and finer alike), then an axial series, then the one with
most slices, then
one not given contrast (on the evidence that decides a T1's role, for every series:
:meth:`SeriesSelector.contrast_evidence`; a FLAIR after contrast often says so only in its description or
by its timing), then the one acquired last; the others are kept, in that order, for when the
chosen one cannot be read. A series serves at
most one modality (chosen in the order FLAIR, T1GD, T1, T2). :meth:`SeriesSelector.assign` says
which roles are missing instead of raising, and why each T1 got its role (``basis``).

The series a model uses together are of one patient: those whose patient identity (PatientID,
IssuerOfPatientID, PatientBirthDate, PatientSex: :func:`identity_differs`) differs from the reference
series' (the one the reference role ranks first), and those whose own headers disagree, serve no role
(:meth:`SeriesSelector.assign`, ``Assignment.refused``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import struct
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag

from converters.dicom_series import DUPLICATE_TOLERANCE_MM
from node.config import SelectionSettings
from node.exceptions import SelectionError

logger = logging.getLogger(__name__)

T = TypeVar("T")


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
    #: ImageType (0008,0008) values, upper case.
    image_type: list[str] = field(default_factory=list)
    #: True: the Contrast/Bolus attributes say contrast was given; False: they say none was
    #: (ContrastBolusAgentAdministered NO, or an agent of "NONE"); None: no such attribute.
    contrast: bool | None = None
    #: Seconds since the study date's midnight (days added for a later date), or None.
    acquired: float | None = None
    #: What the attributes say this series is when it is no structural image (:func:`_no_role_kind`):
    #: "localizer (...)", "diffusion", "angiography", "phase, real or imaginary image",
    #: "susceptibility-weighted", "dynamic (N time points)", or "" for a structural series; for a stack
    #: of a series holding several, "a stack of N images (fewer than M)" when it is too short to be one
    #: (:func:`_echo_series`).
    special: str = ""
    #: For one echo of a multi-echo series (e.g. a PD/T2 dual echo), which: "echo 2, TE 90 ms";
    #: "" for a series of one echo.
    echo: str = ""
    #: For one stack of a series holding several (:func:`_stacks`), which: "coronal stack",
    #: "acquisition 2", "axial stack, acquisition 1"; "" for a series of one stack.
    stack: str = ""
    #: EchoPulseSequence (0018,9008) of an Enhanced MR image: SPIN, GRADIENT or BOTH ("" when absent).
    echo_pulse: str = ""
    #: SequenceName (0018,0024), e.g. Siemens ``*tfl3d1_16ns`` (MP-RAGE), ``*ci3d1`` (CISS); "" when absent.
    sequence_name: str = ""
    #: SteadyStatePulseSequence (0018,9017) of an Enhanced MR image: FREE_PRECESSION (balanced SSFP),
    #: TRANSVERSE, TIME_REVERSED, LONGITUDINAL or NONE ("" when absent).
    steady_state: str = ""
    #: The header's slice pitch in mm: the larger of SliceThickness and SpacingBetweenSlices (slices
    #: 5 mm thick 6.5 mm apart resolve no better than 6.5 mm; 1.2 mm thick 0.6 mm apart no better than
    #: 1.2 mm), or None when it says neither.
    slice_mm: float | None = None
    #: Each of ``paths``' (inode, modification time in ns) when the series was scanned, (-1, -1) for
    #: a file gone: an instance sent again with other content replaces its file under the same path
    #: (node/scp.py), so work done on a series is reused only for the same versions (node/pipeline.py).
    versions: tuple[tuple[int, int], ...] = ()
    #: Whose images these are, from the series' first header (:func:`patient_identity`): a keyword of
    #: :data:`IDENTITY_KEYWORDS` -> a digest of its value, absent when empty. Digests, not the values:
    #: series are compared (:func:`identity_differs`), and nothing here is patient data.
    identity: dict[str, str] = field(default_factory=dict, repr=False)
    #: The identity keywords on which the headers read of this series disagree, "PatientID" or
    #: "PatientID, PatientSex" ("" when they agree): its instances are of more than one patient.
    identity_mixed: str = ""

    @property
    def label(self) -> str:
        """Short text for log lines and reasons."""
        description = self.description or "no description"
        part = ", ".join(p for p in (self.echo, self.stack) if p)
        part = f" {part}" if part else ""
        return f"series {self.series_instance_uid}{part} ({description}, {self.slices} slices)"

    @property
    def inversion_recovery(self) -> bool:
        """IR in ScanningSequence or an IR scan option (e.g. GE ``IR_GEMS``)."""
        return "IR" in self.scanning_sequence or any(re.search(r"(^|_)IR(_|$)", o) for o in self.scan_options)

    @property
    def gradient_echo(self) -> bool:
        """A gradient echo without a spin echo: GR and no SE in ScanningSequence, or EchoPulseSequence
        GRADIENT."""
        scanning = self.scanning_sequence
        return ("GR" in scanning and "SE" not in scanning) or self.echo_pulse == "GRADIENT"

    @property
    def axial(self) -> bool:
        """The slice normal is closest to the patient's S axis (PS3.3 C.7.6.2.1.1)."""
        return self.normal is not None and int(np.argmax(np.abs(self.normal))) == 2

    @property
    def derived_map(self) -> bool:
        """ImageType names a derived map that is no acquisition of its own (ADC, MIP, subtraction...)."""
        return any(v in DERIVED_MAPS for v in self.image_type)

    @property
    def serves_no_role(self) -> bool:
        """A derived map, or by its attributes a diffusion, angiography or phase series (``special``)."""
        return self.derived_map or bool(self.special)

    @property
    def original(self) -> bool:
        """ImageType's first value is ORIGINAL (or ImageType is absent), or the image is an MP2RAGE's UNI
        image (ImageType UNI): DERIVED from its two inversions, it is the acquisition's T1 image."""
        return not self.image_type or self.image_type[0] != "DERIVED" or "UNI" in self.image_type

    @property
    def extent_mm(self) -> float | None:
        """How far the series reaches along its slice normal (slices x pitch), or None."""
        return None if self.slice_mm is None else self.slices * self.slice_mm

    @property
    def text(self) -> str:
        """SeriesDescription and ProtocolName together, for the patterns; an underscore counts as a space
        (Siemens names such as ``t1_se_tra_pre`` or ``3D_T1_KM``, where ``\\b`` would see no word edge)."""
        return self.pattern_text()

    def pattern_text(self, exam: Collection[str] = ()) -> str:
        """:attr:`text`, without the ProtocolName when it is one of ``exam`` (the study's exam-wide
        ProtocolNames, :func:`exam_protocols`): then it names the exam, not this series."""
        protocol = "" if protocol_key(self.protocol) in exam else self.protocol
        return f"{self.description} {protocol}".replace("_", " ")


def protocol_key(protocol: str) -> str:
    """A ProtocolName as :func:`exam_protocols` compares it: runs of spaces as one, without case."""
    return " ".join(protocol.split()).casefold()


def exam_protocols(series: Iterable[SeriesInfo]) -> frozenset[str]:
    """The ProtocolNames (0018,1030) of a study that name the exam, not a series: one that is the same on
    series of different SeriesDescription (compared without case and surrounding spaces).

    GE writes the protocol-library name ("BRAIN TUMOR PERFUSION", "MR BRAIN W/WO CONTRAST") on every
    series of the exam: matched as a series' own words, it excluded every series, or made every T1 pre- or
    post-contrast. Siemens and Philips write a ProtocolName per series (its description, or a derived
    series' source: a description that holds it already), which stays a hint (:attr:`SeriesInfo.text`).
    """
    descriptions: dict[str, set[str]] = {}
    for s in series:
        if key := protocol_key(s.protocol):
            descriptions.setdefault(key, set()).add(protocol_key(s.description))
    return frozenset(key for key, seen in descriptions.items() if len(seen) > 1)


#: The contrast basis of a T1 that no description calls pre- or post-contrast in a study whose every T1
#: carries a contrast agent (entered at registration): acquired after a T1 described post-contrast, it
#: is post-contrast; before, it may be either, and serves as T1GD only when no T1 is known to be one.
KEPT_CONTRAST = (
    "contrast/bolus attributes on every T1 of the study, acquired after a T1 described post-contrast"
)
UNSURE_CONTRAST = (
    "contrast/bolus attributes on every T1 of the study, acquired before any T1 described post-contrast "
    "(pre or post not known)"
)


def _unsure(s: SeriesInfo, evidence: Mapping[str, tuple[bool, str]]) -> bool:
    """``s``'s contrast is :data:`UNSURE_CONTRAST`."""
    return evidence.get(s.series_instance_uid, (False, ""))[1] == UNSURE_CONTRAST


#: ImageType values (PS3.3 C.7.6.1.1.2, C.8.13.1.1.1 and vendors') of images that are maps derived from
#: another acquisition, not a contrast of their own.
DERIVED_MAPS = frozenset(
    {"ADC", "TRACEW", "TRACE", "FA", "EADC", "MIP", "MPR_THICK", "SUB", "SUBTRACTION", "PROJECTION IMAGE",
     "LOCALIZER", "MOCO", "PERFUSION", "CBF", "CBV", "MTT", "TTP", "T1 MAP"}
)  # fmt: skip

#: An MP2RAGE's inversion image by the series' own text (Siemens ``t1_mp2rage_sag_p3_INV1``, ``..._INV2``;
#: an underscore counts as a space): no T1 role unless ImageType says UNI
#: (:meth:`SeriesSelector._t1_weighted`).
MP2RAGE_INVERSION = re.compile(r"\bINV[12]\b", re.IGNORECASE)

#: A balanced steady-state free precession by the series' own text: GE FIESTA (FIESTA-C), Siemens CISS and
#: TrueFISP, Philips bFFE and bTFE.
BALANCED_SSFP_TEXT = re.compile(
    r"fiesta|\bciss|\btrue ?fisp|\btrufi|\bs?b-?(ffe|tfe)\b|\bbalanced\b|\bb-?ssfp\b", re.IGNORECASE
)

#: A balanced steady-state free precession by its Siemens SequenceName: ``*ci3d1`` (CISS), ``*tfi3d1``,
#: ``*tfi2d1`` (TrueFISP; an MP-RAGE's is ``*tfl3d1``).
BALANCED_SSFP_SEQUENCE_NAME = re.compile(r"^\*?(ci|tfi)\d|trufi|fiesta", re.IGNORECASE)

#: A steady-state gradient echo (SequenceVariant SS, neither spoiled nor magnetization-prepared) with a TR
#: and TE at most these (ms) is a balanced SSFP (TR ~ 4-10 ms, TE ~ TR / 2).
BALANCED_SSFP_MAX_TR_MS = 12.0
BALANCED_SSFP_MAX_TE_MS = 6.0

#: ImageType values (after the first two) of a phase, real or imaginary image: Siemens P/R/I, GE and
#: the standard's PHASE/REAL/IMAGINARY, Philips P/R/I and their P_xx/R_xx/I_xx forms (M is magnitude).
COMPLEX_PARTS = re.compile(r"^(P|R|I|PHASE|REAL|IMAGINARY|PHASE MAP|[PRI]_[A-Z0-9]+)$")

#: A Siemens diffusion SequenceName (0018,0024): ``*ep_b1000t``, ``ep_b0``, ``*ep_b500#1``.
DIFFUSION_SEQUENCE_NAME = re.compile(r"ep_b\d", re.IGNORECASE)

#: ImageType values of susceptibility-weighted images: Siemens SWI and its minimum-intensity projection,
#: GE SWAN.
SUSCEPTIBILITY_IMAGE_TYPES = frozenset({"SWI", "MNIP", "MINIP", "MIN IP", "SWAN"})

#: A susceptibility-weighted SequenceName: Siemens ``*swi3d1r``, GE ``swan``.
SUSCEPTIBILITY_SEQUENCE_NAME = re.compile(r"swi|swan", re.IGNORECASE)

#: Contrast/Bolus module keywords (PS3.3 C.7.6.4) whose presence says contrast was given.
CONTRAST_KEYWORDS = (
    "ContrastBolusAgent",
    "ContrastBolusRoute",
    "ContrastBolusVolume",
    "ContrastBolusStartTime",
    "ContrastBolusTotalDose",
    "ContrastBolusIngredient",
    "ContrastBolusIngredientConcentration",
)

#: Agent texts that say no contrast was given: NONE, NO, N/A, 0, "-", and texts that begin with a
#: negation ("no contrast", "none given", "not administered", "without", German "nativ", "kein KM",
#: "ohne", French "sans", Spanish "sin"). No contrast agent's name begins with one of these words.
NO_AGENT = re.compile(
    r"^(nil|n/?a|-+|0+(\.0*)?|(no|none|not|without|nativ|native|kein|keine|ohne|sans|sin)\b.*)$",
    re.IGNORECASE,
)


def _contrast(ds: Dataset) -> tuple[bool | None, str]:
    """(contrast given?, agent text) from the Contrast/Bolus attributes of ``ds``."""
    administered = str(_deep_get(ds, "ContrastBolusAgentAdministered") or "").strip().upper()
    agent = str(_deep_get(ds, "ContrastBolusAgent") or "").strip()
    if administered == "NO" or (agent and NO_AGENT.match(agent)):
        return False, ""
    if administered == "YES":
        return True, agent or "administered"
    said_none = False
    for keyword in CONTRAST_KEYWORDS:
        value = _deep_get(ds, keyword)
        if value is None or value == "":
            continue
        # A volume or dose of 0 (a DS value, read as a number) says none was given, as NONE does.
        if NO_AGENT.match(str(value).strip()) or (keyword != "ContrastBolusAgent" and _float(value) == 0):
            said_none = True
            continue
        return True, agent or keyword
    return (False, "") if said_none else (None, "")


def _seconds(date: Any, time_: Any, study_date: Any) -> float | None:
    """Seconds of DICOM DA + TM since ``study_date``'s midnight (None when the time is unreadable)."""
    text = str(time_ or "").strip()
    match = re.match(r"^(\d{2})(\d{2})?(\d{2})?(\.\d+)?$", text.replace(":", ""))
    if not match:
        return None
    hours, minutes, secs, frac = match.groups()
    seconds = int(hours) * 3600 + int(minutes or 0) * 60 + int(secs or 0) + float(frac or 0)
    day, base = str(date or "").strip(), str(study_date or "").strip()
    if len(day) == 8 and len(base) == 8 and day.isdigit() and base.isdigit():
        import datetime as dt

        try:
            days = (
                dt.date(int(day[:4]), int(day[4:6]), int(day[6:]))
                - dt.date(int(base[:4]), int(base[4:6]), int(base[6:]))
            ).days
        except ValueError:
            days = 0
        seconds += 86400 * days
    return float(seconds)


def _acquired(ds: Dataset) -> float | None:
    """When the series was acquired, in seconds (see :attr:`SeriesInfo.acquired`)."""
    study_date = ds.get("StudyDate") or ds.get("SeriesDate")
    stamp = str(_deep_get(ds, "AcquisitionDateTime") or "").strip()
    if len(stamp) >= 10 and stamp[:8].isdigit():
        return _seconds(stamp[:8], stamp[8:].split("+")[0].split("-")[0], study_date)
    for date_key, time_key in (
        ("AcquisitionDate", "AcquisitionTime"),
        ("SeriesDate", "SeriesTime"),
        ("ContentDate", "ContentTime"),
    ):
        when = _deep_get(ds, time_key)
        if when:
            return _seconds(_deep_get(ds, date_key) or study_date, when, study_date)
    return None


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


#: Philips' private block of group 2001 and its Diffusion B-Factor (2001,xx03), FL: Philips writes it (0
#: outside diffusion, as it does the standard DiffusionBValue) where a PACS may have dropped the standard one.
PHILIPS_CREATOR = "Philips Imaging DD 001"
PHILIPS_B_FACTOR = 0x03

#: ImageType values of a localizer (scout) image.
LOCALIZER_IMAGE_TYPES = frozenset({"LOCALIZER", "SCOUT"})

#: A series whose images hold several orientations is a localizer (a GE 3-plane loc: a handful of slices
#: in each of three planes, by its short TE and TR a T1) when it has at most this many slices per
#: orientation. A 2D stack that covers a brain has some 20 or more: two such stacks in one series are no
#: localizer.
LOCALIZER_MAX_SLICES = 15
#: ... and when its planes hold a like number of slices: the largest at most this many times the smallest.
LOCALIZER_PLANE_RATIO = 3
#: Slice normals more than this many degrees apart are two orientations (a 3-plane loc's are 90 apart).
LOCALIZER_ANGLE_DEGREES = 10.0


def _philips_b_value(ds: Dataset) -> float | None:
    """Philips' private Diffusion B-Factor (2001,xx03) of ``ds``, or None."""
    try:
        value = ds.private_block(0x2001, PHILIPS_CREATOR)[PHILIPS_B_FACTOR].value
    except KeyError:
        return None
    if isinstance(value, bytes) and len(value) == 4:  # VR UN: a PACS that did not know the tag
        return float(struct.unpack("<f", value)[0])
    return _float(value)


def _says_diffusion(ds: Dataset) -> bool:
    """One header (or one frame's functional groups) says diffusion (see the module notes)."""
    bvalue = _float(_deep_get(ds, "DiffusionBValue"))
    directionality = str(_deep_get(ds, "DiffusionDirectionality") or "").strip().upper()
    return (
        "DIFFUSION" in _multi(ds.get("ImageType"))
        or (bvalue is not None and (bvalue > 0 or "EP" in _multi(_deep_get(ds, "ScanningSequence"))))
        or (_philips_b_value(ds) or 0) > 0
        or directionality not in ("", "NONE")
        or bool(DIFFUSION_SEQUENCE_NAME.search(str(_deep_get(ds, "SequenceName") or "")))
    )


def _orientations(headers: Sequence[Dataset]) -> list[int]:
    """How many of the headers lie in each slice orientation they hold: slice normals (from
    ImageOrientationPatient) more than :data:`LOCALIZER_ANGLE_DEGREES` apart are two. A coarse angle,
    not the loader's tolerance: cosines that jitter in their last digits from slice to slice are one
    orientation here."""
    seen: list[np.ndarray] = []
    counts: list[int] = []
    limit = np.cos(np.radians(LOCALIZER_ANGLE_DEGREES))
    for ds in headers:
        normal = _slice_normal(_deep_get(ds, "ImageOrientationPatient"))
        length = 0.0 if normal is None else float(np.linalg.norm(normal))
        if normal is None or length == 0:
            continue
        normal = normal / length
        match = next((n for n, other in enumerate(seen) if abs(float(normal @ other)) >= limit), None)
        if match is None:
            seen.append(normal)
            counts.append(1)
        else:
            counts[match] += 1
    return counts


def _localizer(headers: Sequence[Dataset], slices: int) -> str:
    """"localizer (...)" when ``headers`` (of a series of ``slices`` images) say it is one (see the
    module notes), else ""."""
    if any(LOCALIZER_IMAGE_TYPES.intersection(_multi(h.get("ImageType"))) for h in headers):
        return "localizer (ImageType LOCALIZER or SCOUT)"
    counts = _orientations(headers)
    # ``headers`` may be probes spread over the series: each orientation's share of them, scaled to the
    # series' ``slices``, stands for its count.
    largest = max(counts, default=0) * slices / max(1, sum(counts))
    # A localizer's planes hold a like number of slices each; a stack with a stray image of another
    # orientation (a damaged series) is none.
    balanced = len(counts) > 1 and min(counts) * LOCALIZER_PLANE_RATIO >= max(counts)
    if balanced and largest <= LOCALIZER_MAX_SLICES:
        return f"localizer ({len(counts)} orientations, {slices} slices)"
    return ""


def _no_role_kind(
    ds: Dataset, image_type: Sequence[str], slices: int = 1, probes: Sequence[Dataset] = ()
) -> str:
    """What the attributes say a series is when it is no structural image: "localizer (...)",
    "diffusion", "angiography", "phase, real or imaginary image", "susceptibility-weighted", "dynamic
    (N time points)", or "" (see the module notes).

    ``ds`` is the series' first header, ``probes`` other headers of it (files spread over a single-frame
    series, frames of a multi-frame one): a series is a localizer or diffusion when any header says so
    (the first image of a DWI is often b=0, which says nothing).
    """
    headers = [ds, *probes]
    if localizer := _localizer(headers, slices):
        return localizer
    if any(_says_diffusion(h) for h in headers):
        return "diffusion"
    if str(_deep_get(ds, "AngioFlag") or "").strip().upper() == "Y" or "ANGIO" in image_type:
        return "angiography"
    component = str(_deep_get(ds, "ComplexImageComponent") or "").strip().upper()
    if component in ("PHASE", "REAL", "IMAGINARY") or any(COMPLEX_PARTS.match(v) for v in image_type[2:]):
        return "phase, real or imaginary image"
    if (
        str(_deep_get(ds, "AcquisitionContrast") or "").strip().upper() == "T2_STAR"
        or SUSCEPTIBILITY_IMAGE_TYPES.intersection(image_type)
        or SUSCEPTIBILITY_SEQUENCE_NAME.search(str(_deep_get(ds, "SequenceName") or ""))
    ):
        return "susceptibility-weighted"
    timepoints = _float(_deep_get(ds, "NumberOfTemporalPositions"))
    if timepoints is not None and timepoints > 1:
        return f"dynamic ({timepoints:g} time points)"
    return ""


#: The attributes that say whose images a series holds (PS3.3 C.7.1.1), as :func:`identity_differs`
#: compares them.
IDENTITY_KEYWORDS = ("PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex")


def patient_identity(ds: Dataset) -> dict[str, str]:
    """The patient identity of one header: keyword -> a digest of its value (surrounding spaces stripped,
    PatientSex in upper case), for each of :data:`IDENTITY_KEYWORDS` that is not empty."""
    out: dict[str, str] = {}
    for keyword in IDENTITY_KEYWORDS:
        value = str(ds.get(keyword, "") or "").strip()
        if keyword == "PatientSex":
            value = value.upper()
        if value:
            out[keyword] = hashlib.blake2b(f"{keyword}={value}".encode(), digest_size=16).hexdigest()
    return out


def identity_differs(reference: Mapping[str, str], other: Mapping[str, str]) -> list[str]:
    """The keywords on which two identities (:func:`patient_identity`) say another patient: PatientID
    always (one empty and the other not counts), IssuerOfPatientID, PatientBirthDate and PatientSex
    where both have a value."""
    return [
        k for k in IDENTITY_KEYWORDS
        if reference.get(k) != other.get(k) and (k == "PatientID" or (k in reference and k in other))
    ]  # fmt: skip


def differ(keywords: str) -> str:
    """``"PatientID differs"``, ``"PatientBirthDate, PatientSex differ"``: for reasons."""
    return f"{keywords} {'differ' if ',' in keywords else 'differs'}"


def mixed_identity(headers: Iterable[Dataset]) -> str:
    """The identity keywords on which any of ``headers`` disagrees with the first ("" when none)."""
    first: dict[str, str] | None = None
    found: set[str] = set()
    for ds in headers:
        identity = patient_identity(ds)
        if first is None:
            first = identity
        else:
            found.update(identity_differs(first, identity))
    return ", ".join(k for k in IDENTITY_KEYWORDS if k in found)


def series_info(
    ds: Dataset, paths: Sequence[Path], slices: int, probes: Sequence[Dataset] = ()
) -> SeriesInfo:
    """Build a :class:`SeriesInfo` from one header of the series (single- or multi-frame); ``probes``:
    other headers of it (at least :data:`PROBE_TAGS`), which may say it is a localizer or diffusion
    (:func:`_no_role_kind`), and a multi-frame header's frames are probed too."""
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
    contrast, agent = _contrast(ds)
    image_type = _multi(ds.get("ImageType"))
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
        contrast_agent=agent,
        normal=normal,
        slices=slices,
        paths=list(paths),
        image_type=image_type,
        contrast=contrast,
        acquired=_acquired(ds),
        special=_no_role_kind(ds, image_type, slices, [*probes, *_frame_probes(ds)]),
        echo_pulse=str(_deep_get(ds, "EchoPulseSequence") or "").strip().upper(),
        sequence_name=str(_deep_get(ds, "SequenceName") or "").strip(),
        steady_state=str(_deep_get(ds, "SteadyStatePulseSequence") or "").strip().upper(),
        slice_mm=_slice_pitch(ds),
        versions=tuple(file_version(path) for path in paths),
        identity=patient_identity(ds),
        identity_mixed=mixed_identity([ds, *probes]),
    )


def file_version(path: Path | str) -> tuple[int, int]:
    """A file's (inode, modification time in ns); (-1, -1) when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return st.st_ino, st.st_mtime_ns


def _slice_pitch(ds: Dataset) -> float | None:
    """The larger of SliceThickness and SpacingBetweenSlices (mm; GE writes the spacing negative when
    the slices go the other way), or None when neither is a positive number."""
    values = [_float(_deep_get(ds, k)) for k in ("SliceThickness", "SpacingBetweenSlices")]
    positive = [abs(v) for v in values if v is not None and abs(v) > 0]
    return max(positive) if positive else None


#: The attributes of an image's volume key: its echo (:func:`_echo_key`) and its stack (:func:`_normal`,
#: AcquisitionNumber).
ECHO_TAGS: list[str] = [
    "EchoNumbers", "EchoTime", "ImageType", "ComplexImageComponent", "ImageOrientationPatient",
    "AcquisitionNumber",
]  # fmt: skip

#: Two images are of one stack when their slice normals (the cross product of ImageOrientationPatient's
#: cosines) differ by less than this in every component (about 0.6 degrees). Stacks nearer than that are
#: one candidate, which the loader refuses as before when their cosines differ beyond its own tolerance
#: (converters/dicom_series.py ``ORIENTATION_TOLERANCE``): only clearly separate planes are split.
STACK_NORMAL_TOLERANCE = 0.01

#: The attributes a probe reads (it parses no other value): :data:`ECHO_TAGS` and those by which any one
#: image says its series is a localizer or diffusion (:func:`_no_role_kind`) or may repeat positions
#: (:func:`_may_repeat`), Philips' private b-value with its private creator, in whichever block of group
#: 2001 the file has put it.
PROBE_TAGS: list[BaseTag] = [
    *(
        Tag(keyword)
        for keyword in (
            *ECHO_TAGS,
            "ImagePositionPatient",
            "ScanningSequence",
            "SequenceName",
            "DiffusionBValue",
            "DiffusionDirectionality",
            *IDENTITY_KEYWORDS,
        )
    ),
    *(BaseTag(0x20010000 | block) for block in range(0x10, 0x100)),
    *(BaseTag(0x20010000 | block << 8 | PHILIPS_B_FACTOR) for block in range(0x10, 0x100)),
]


def _probe_header(path: Path) -> Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=PROBE_TAGS)


def _frame_probes(ds: Dataset) -> list[Dataset]:
    """Up to :data:`ECHO_PROBES` frames' functional groups spread over a multi-frame header ([] for a
    single-frame one)."""
    frames = ds.get("PerFrameFunctionalGroupsSequence") or []
    return _echo_probes(list(frames)) if len(frames) > 1 else []


def _complex_part(ds: Dataset) -> str:
    """"" for a magnitude image (or one that does not say); else what it is: ComplexImageComponent
    PHASE, REAL or IMAGINARY, or ImageType's vendor value (P, R, I, R_IR...)."""
    component = str(ds.get("ComplexImageComponent", "") or "").strip().upper()
    if component in ("PHASE", "REAL", "IMAGINARY"):
        return component.lower()
    parts = [v for v in _multi(ds.get("ImageType"))[2:] if COMPLEX_PARTS.match(v)]
    return parts[0] if parts else ""


def _echo_key(ds: Dataset) -> tuple[str, float | None, str]:
    """Which volume of its series an image is: EchoNumbers (0018,0086), EchoTime (0018,0081), and
    whether it is a magnitude or a phase, real or imaginary image (:func:`_complex_part`)."""
    return str(ds.get("EchoNumbers", "") or "").strip(), _float(ds.get("EchoTime")), _complex_part(ds)


def _normal(ds: Dataset) -> npt.NDArray[np.float64] | None:
    """The slice normal of a single-frame image (ImageOrientationPatient's cross product), or None."""
    return _slice_normal(ds.get("ImageOrientationPatient"))


def _slice_normal(iop: Any) -> npt.NDArray[np.float64] | None:
    """The cross product of ImageOrientationPatient's two cosines ``iop``, or None when they are no six
    finite numbers."""
    try:
        cosines = np.asarray([float(v) for v in iop], float) if iop is not None else None
    except (TypeError, ValueError):
        return None
    if cosines is None or cosines.shape != (6,) or not np.all(np.isfinite(cosines)):
        return None
    return np.cross(cosines[:3], cosines[3:])


def _same_stack(a: npt.NDArray[np.float64] | None, b: npt.NDArray[np.float64] | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return bool(np.max(np.abs(a - b)) < STACK_NORMAL_TOLERANCE)


def _acquisition(ds: Dataset) -> str:
    return str(ds.get("AcquisitionNumber", "") or "").strip()


def _depths(items: Sequence[tuple[Dataset, Path]], normal: npt.NDArray[np.float64]) -> list[float] | None:
    """Each image's position along ``normal``, or None when one has no usable ImagePositionPatient."""
    out = []
    for ds, _ in items:
        try:
            position = np.asarray([float(v) for v in ds.get("ImagePositionPatient")], float)
        except (TypeError, ValueError):
            return None
        if position.shape != (3,):
            return None
        out.append(float(position @ normal))
    return out


def _repeats(depths: Sequence[float]) -> bool:
    """Two of ``depths`` at the same position (as the loader tells duplicates)."""
    return bool(np.any(np.diff(np.sort(np.asarray(depths))) < DUPLICATE_TOLERANCE_MM))


#: Acquisitions at the same positions that one series may hold as candidates of their own (a repeat
#: after motion); more are a dynamic series, kept whole (:func:`_by_acquisition`), and a stack of more
#: images than this to a position is dynamic (:func:`_dynamic`).
MAX_REPEATED_ACQUISITIONS = 2


def _distinct(depths: Sequence[float]) -> int:
    """How many positions ``depths`` hold (nearer than the loader's duplicate tolerance: one)."""
    return 1 + int(np.sum(np.diff(np.sort(np.asarray(depths))) >= DUPLICATE_TOLERANCE_MM)) if depths else 0


def _dynamic(items: Sequence[tuple[Dataset, Path]]) -> str:
    """"dynamic (N images at M positions)" when the images of one stack are, on average, more than
    :data:`MAX_REPEATED_ACQUISITIONS` to a slice position (the time points of a dynamic series whose
    headers do not say so), else ""."""
    normal = _normal(items[0][0]) if items else None
    depths = _depths(items, normal) if normal is not None else None
    if not depths:
        return ""
    positions = _distinct(depths)
    if len(depths) <= MAX_REPEATED_ACQUISITIONS * positions:
        return ""
    return f"dynamic ({len(depths)} images at {positions} positions)"


def _may_repeat(first: Dataset, probes: Sequence[Dataset], files: int) -> bool:
    """Whether a single-frame series of ``files`` files may hold images at the same positions, by its
    ``first`` header and ``probes`` (spread over it): two of them at one position, or more files than
    the positions they reach could hold (their span over the smaller of SliceThickness and
    SpacingBetweenSlices) more than :data:`MAX_REPEATED_ACQUISITIONS` times. Then every header is read
    (:func:`scan_grouped_series`): probes of a series sent one position after the other (a dynamic's
    time points together) all meet different positions."""
    timepoints = _float(_deep_get(first, "NumberOfTemporalPositions"))
    if timepoints is not None and timepoints > 1:
        return False  # dynamic by its header already (:func:`_no_role_kind`)
    normal = _normal(first)
    depths = _depths([(h, Path()) for h in (first, *probes)], normal) if normal is not None else None
    if not depths:
        return False
    if _repeats(depths):
        return True
    steps = [abs(v) for k in ("SliceThickness", "SpacingBetweenSlices") if (v := _float(first.get(k)))]
    if not steps:
        return False
    reach = int((max(depths) - min(depths)) / min(steps)) + 1
    return files > MAX_REPEATED_ACQUISITIONS * reach


def _by_acquisition(
    items: list[tuple[Dataset, Path]], normal: npt.NDArray[np.float64] | None
) -> list[tuple[str, list[tuple[Dataset, Path]]]]:
    """The images of one stack as [("", items)], or one ("acquisition N", its images) per
    AcquisitionNumber when positions repeat in the stack and AcquisitionNumber separates them (no
    acquisition repeats a position of its own) into at most :data:`MAX_REPEATED_ACQUISITIONS`;
    otherwise the stack stays whole (and the loader refuses its repeated positions, as before). More
    acquisitions at the same positions are the time points of a dynamic series (a DCE whose headers
    give no NumberOfTemporalPositions), whose first phases precede the contrast its header names: no
    phase of it is to be taken for a post-contrast T1."""
    depths = _depths(items, normal) if normal is not None else None
    if depths is None or not _repeats(depths):
        return [("", items)]
    groups: dict[str, list[int]] = {}
    for n, (ds, _) in enumerate(items):
        groups.setdefault(_acquisition(ds), []).append(n)
    if not 2 <= len(groups) <= MAX_REPEATED_ACQUISITIONS or any(
        _repeats([depths[n] for n in members]) for members in groups.values()
    ):
        return [("", items)]
    return [
        (f"acquisition {number or '?'}", [items[n] for n in members]) for number, members in groups.items()
    ]


#: What a stack is called by the patient axis its slice normal is closest to (PS3.3 C.7.6.2.1.1).
PLANES = ("sagittal", "coronal", "axial")


def _stacks(items: list[tuple[Dataset, Path]]) -> list[tuple[str, list[tuple[Dataset, Path]]]]:
    """The images of one volume key (echo) as (label, images) per stack: one per orientation
    (:data:`STACK_NORMAL_TOLERANCE`), and within one orientation one per acquisition where positions
    repeat (:func:`_by_acquisition`). A series of one stack is [("", items)]."""
    planes: list[tuple[npt.NDArray[np.float64] | None, list[tuple[Dataset, Path]]]] = []
    for ds, path in items:
        normal = _normal(ds)
        for stack_normal, members in planes:
            if _same_stack(stack_normal, normal):
                members.append((ds, path))
                break
        else:
            planes.append((normal, [(ds, path)]))
    names = [
        "stack without orientation" if normal is None else f"{PLANES[int(np.argmax(np.abs(normal)))]} stack"
        for normal, _ in planes
    ]
    if len(planes) == 1:
        names = [""]
    elif len(set(names)) < len(names):  # two oblique axial stacks, say: numbered in the order received
        names = [f"{name} {n}" for n, name in enumerate(names, start=1)]
    out = []
    for name, (normal, members) in zip(names, planes, strict=True):
        for acquisition, images in _by_acquisition(members, normal):
            out.append((", ".join(p for p in (name, acquisition) if p), images))
    return out


#: A stack of a series holding several that has fewer images than this serves no role, when the caller
#: does not say (:func:`scan_grouped_series`; the node passes its ``[qc]`` ``min_slices``).
MIN_STACK_SLICES = 8


def _echo_series(
    headers: Sequence[tuple[Dataset, Path]], min_stack_slices: int = MIN_STACK_SLICES
) -> list[SeriesInfo]:
    """The single-frame images of one series as one :class:`SeriesInfo`, or one per volume when they
    hold several at each position: each echo of a PD/T2 dual echo (a contrast and a volume of its own:
    the T2 role may take the long echo alone), and the magnitude apart from the phase, real or
    imaginary images reconstructed into the same series (Philips' M and R images of an IR sequence),
    which serve no role; and within each, one per stack (:func:`_stacks`). A stack of a series holding
    several with fewer than ``min_stack_slices`` images serves no role (a localizer's plane)."""
    echoes: dict[tuple[str, float | None, str], list[tuple[Dataset, Path]]] = {}
    for ds, path in headers:
        echoes.setdefault(_echo_key(ds), []).append((ds, path))
    several = len({(number, te) for number, te, _ in echoes}) > 1
    mixed = mixed_identity(ds for ds, _ in headers)  # every header is read here: of the whole series
    out = []
    for (number, te, part), items in echoes.items():
        labels = []
        if several:
            labels.append(f"echo {number or '?'}" + (f", TE {te:g} ms" if te is not None else ""))
        if len(echoes) > 1 and part:
            labels.append(f"{part} image")
        stacks = _stacks(items)
        # Judged on the echo's images together: each plane of a 3-plane localizer would be a stack of its
        # own. A localizer stays one candidate (serving no role), named as the series it is.
        localizer = _localizer([d for d, _ in items], len(items)) if len(stacks) > 1 else ""
        if localizer:
            stacks = [("", items)]
        for stack, images in stacks:
            probes = _echo_probes([d for d, _ in images]) if len(images) > 1 else []
            info = series_info(images[0][0], [p for _, p in images], len(images), probes)
            info.echo = ", ".join(labels)
            info.stack = stack
            info.identity_mixed = mixed
            if localizer:
                info.special = localizer
            elif not info.special and (dynamic := _dynamic(images)):
                info.special = dynamic
            elif stack and len(images) < min_stack_slices and not info.special:
                info.special = f"a stack of {len(images)} images (fewer than {min_stack_slices})"
            out.append(info)
    return out


def _frames(ds: Dataset) -> int:
    return int(ds.get("NumberOfFrames", 1) or 1)


def scan_series(paths: Iterable[Path], min_stack_slices: int = MIN_STACK_SLICES) -> list[SeriesInfo]:
    """Read the headers of spooled files (no pixel data) and group them by SeriesInstanceUID, and the
    images of a multi-echo series by echo, of a series of several stacks by stack (:func:`_echo_series`)."""
    groups: dict[str, list[tuple[Dataset, Path]]] = {}
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        groups.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((ds, Path(path)))
    out: list[SeriesInfo] = []
    for headers in groups.values():
        if any(_frames(ds) > 1 for ds, _ in headers):
            frames = sum(_frames(ds) for ds, _ in headers)
            others = [d for d, _ in headers[1:]]
            out.append(series_info(headers[0][0], [p for _, p in headers], frames, others))
        else:
            out.extend(_echo_series(headers, min_stack_slices))
    return out


#: Files of a single-frame series whose echo is read to tell whether it holds several echoes.
ECHO_PROBES = 16


def _echo_probes(paths: Sequence[T]) -> list[T]:
    """Up to :data:`ECHO_PROBES` files spread evenly over ``paths`` (the last one included).

    Files come in the order they were received, which a PACS chooses: one echo after the other, the
    echoes interleaved, or any order. Two probes (the middle and last file) missed the second echo in
    one order out of five when it was random; with 16, a random order hides it from every probe with
    a chance of about 3 in 100,000, and the usual orders never do.
    """
    count = min(ECHO_PROBES, len(paths) - 1)
    return [paths[len(paths) - 1 - (n * (len(paths) - 1)) // count] for n in range(count)]


def scan_grouped_series(
    groups: Mapping[str, Sequence[Path]], min_stack_slices: int = MIN_STACK_SLICES
) -> list[SeriesInfo]:
    """Like :func:`scan_series` for files already grouped by series (from the database): one header
    read per single-frame series instead of one per file, plus up to :data:`ECHO_PROBES` that say
    whether it holds several volumes (echoes, magnitude and phase, orientations, acquisitions) or may
    repeat positions (:func:`_may_repeat`: a dynamic series); only then are all its headers read, and
    each volume's files known.

    A stack that no probe meets (3 stray images among 150) leaves the series whole, and the loader
    refuses it as before. The probes read the patient identity too (:attr:`SeriesInfo.identity_mixed`);
    the job's read of the whole series checks every instance (node/pipeline.py ``load_chosen``)."""
    out: list[SeriesInfo] = []
    for paths in groups.values():
        first = pydicom.dcmread(paths[0], stop_before_pixels=True)
        if _frames(first) > 1 or len(paths) == 1:
            others = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths[1:]]
            frames = sum(_frames(ds) for ds in (first, *others))
            out.append(series_info(first, [Path(p) for p in paths], frames, others))
            continue
        key, normal = (_echo_key(first), _acquisition(first)), _normal(first)
        probes = [_probe_header(p) for p in _echo_probes(paths)]
        if all(
            (_echo_key(h), _acquisition(h)) == key and _same_stack(_normal(h), normal) for h in probes
        ) and not _may_repeat(first, probes, len(paths)):
            out.append(series_info(first, [Path(p) for p in paths], len(paths), probes))
            continue
        headers = [(pydicom.dcmread(p, stop_before_pixels=True), Path(p)) for p in paths]
        out.extend(_echo_series(headers, min_stack_slices))
    return out


#: At most this many series are listed in a job's ``not_used`` (:meth:`SeriesSelector.not_used`).
NOT_USED_LIMIT = 50

#: Names of angiograms (TOF, MRA, angio, TWIST, TRICKS) and perfusion series (perf, DSC, DCE, PWI, ASL,
#: pASL, pCASL, eASL), matched in a series' description and its own ProtocolName with "_" read as a
#: space. A time-of-flight angiogram whose AngioFlag is not Y (Philips writes none) is a short-TE,
#: short-TR gradient echo, a T1 by its attributes: where the only other T1 was post-contrast it took the
#: native T1 role. Such a name excludes the series even beside a sequence's name ("AX 3D TOF SPGR",
#: "t1_vibe_dce_tra": the angiogram, the DCE itself), except where it follows a word of timing
#: (:data:`AFTER_ANGIO_PERFUSION`): a structural series is often named for the run it followed.
ANGIO_PERFUSION_NAMES = re.compile(
    r"\btof\b|\bmra\b|angio|\btwist\b|\btricks\b|\bperf|\bdsc\b|\bdce\b|\bpwi\b|\b(p|pc|e)?asl\b",
    re.IGNORECASE,
)
#: "T2 FLAIR post DSC", "AX T1 POST PERF", "T1_3D_TFE_pre_DCE": a timing word before an angiogram's or
#: perfusion's name says when the series was acquired, not what it is.
AFTER_ANGIO_PERFUSION = re.compile(
    r"\b(post|pre|after|before|following|nach|vor)\W+(" + ANGIO_PERFUSION_NAMES.pattern + ")", re.IGNORECASE
)
#: What :meth:`SeriesSelector.excluded` returns for a series excluded by :data:`ANGIO_PERFUSION_NAMES`.
ANGIO_PERFUSION_NAME = "angiogram or perfusion name"


class SeriesSelector:
    """Applies :class:`SelectionRules` to the series of a study."""

    def __init__(self, rules: SelectionRules | None = None) -> None:
        self.rules = rules or SelectionRules()
        flags = re.IGNORECASE
        self._re = {
            "FLAIR": re.compile(self.rules.flair_pattern, flags),
            "T1GD": re.compile(self.rules.t1gd_pattern, flags),
            "T1": re.compile(self.rules.t1_pattern, flags),
            "T1PRE": re.compile(self.rules.t1_pre_pattern, flags),
            "T2": re.compile(self.rules.t2_pattern, flags),
            "exclude": re.compile(self.rules.exclude_pattern, flags),
        }

    # -- per-modality predicates -------------------------------------------------------------------------

    def _says(self, pattern: str, s: SeriesInfo, exam: Collection[str]) -> bool:
        """Pattern ``pattern`` is in the series' text (:meth:`SeriesInfo.pattern_text`; ``exam``: the
        study's exam-wide ProtocolNames, :func:`exam_protocols`)."""
        return bool(self._re[pattern].search(s.pattern_text(exam)))

    def excluded(self, s: SeriesInfo, exam: Collection[str] = ()) -> str:
        """What excludes the series: "description" or "ProtocolName" by ``exclude_pattern``,
        :data:`ANGIO_PERFUSION_NAME` by :data:`ANGIO_PERFUSION_NAMES`, or "" (not excluded). ``exam``: the
        study's exam-wide ProtocolNames (:func:`exam_protocols`), which exclude nothing."""
        description = s.description.replace("_", " ")
        # A description naming a sequence of its own outweighs a ProtocolName alone (GE's exam-wide name
        # on a study whose PACS routes one series: exam_protocols needs two to tell it).
        names_a_sequence = any(self._re[name].search(description) for name in ("FLAIR", "T1", "T2"))
        if self._says("exclude", s, exam):
            if self._re["exclude"].search(description):
                return "description"
            if not names_a_sequence:
                return "ProtocolName"
        # An angiogram's or perfusion's name: in the description, or in its own ProtocolName too when
        # the description names no sequence (the same rule as above).
        named = description if names_a_sequence else s.pattern_text(exam)
        angio_or_perfusion = ANGIO_PERFUSION_NAMES.search(AFTER_ANGIO_PERFUSION.sub(" ", named))
        return ANGIO_PERFUSION_NAME if angio_or_perfusion else ""

    def is_flair(self, s: SeriesInfo, exam: Collection[str] = ()) -> bool:
        """Long-TI, long-TE inversion recovery; a description alone never beats contradicting TI/TE.
        ``exam`` (here and in the other predicates): the study's exam-wide ProtocolNames
        (:func:`exam_protocols`), which are not the series' words."""
        r = self.rules
        ti, te = s.inversion_time, s.echo_time
        if (ti is not None and ti < r.flair_min_ti_ms) or (te is not None and te < r.flair_min_te_ms):
            return False
        if ti is not None and te is not None:
            return True  # a TI this long is an inversion, whether or not ScanningSequence says IR
        return self._says("FLAIR", s, exam)

    def balanced_ssfp(self, s: SeriesInfo, exam: Collection[str] = ()) -> bool:
        """A balanced (or time-reversed) steady-state free precession: a gradient echo with SequenceVariant
        TRSS, or SS and neither SP nor MP with TR and TE at most :data:`BALANCED_SSFP_MAX_TR_MS` and
        :data:`BALANCED_SSFP_MAX_TE_MS`; an Enhanced MR SteadyStatePulseSequence FREE_PRECESSION or
        TIME_REVERSED; a Siemens SequenceName ``*ci3d1`` / ``*tfi3d1``; or a name in the series' own text
        (FIESTA, CISS, TrueFISP, bFFE: ``exam``'s ProtocolNames are not its own). Its TR and TE are a
        T1's, its contrast is not: T2/T1, bright fluid."""
        variant = set(s.sequence_variant)
        te, tr = s.echo_time, s.repetition_time
        if s.steady_state in ("FREE_PRECESSION", "TIME_REVERSED"):
            return True
        if s.gradient_echo and not s.inversion_recovery and (
            "TRSS" in variant
            or (
                "SS" in variant and not variant & {"SP", "MP"}
                and tr is not None and tr <= BALANCED_SSFP_MAX_TR_MS
                and te is not None and te <= BALANCED_SSFP_MAX_TE_MS
            )
        ):  # fmt: skip
            return True
        if BALANCED_SSFP_SEQUENCE_NAME.search(s.sequence_name):
            return True
        return bool(BALANCED_SSFP_TEXT.search(s.pattern_text(exam)))

    def _t1_weighted(self, s: SeriesInfo, exam: Collection[str] = ()) -> bool:
        """T1-weighted by TE and TR (or an IR's short TI), else by its description (``t1_pattern``): not
        a T2* gradient echo, a balanced SSFP (:meth:`balanced_ssfp`) or an MP2RAGE's inversion image
        (:data:`MP2RAGE_INVERSION` in the series' own text, unless ImageType says UNI). ``exam``: the
        study's exam-wide ProtocolNames (:func:`exam_protocols`), which are not the series' words."""
        r = self.rules
        te, tr, ti = s.echo_time, s.repetition_time, s.inversion_time
        if te is not None and (te > r.t1_max_te_ms or (s.gradient_echo and te >= r.t2star_min_te_ms)):
            return False
        if self.balanced_ssfp(s, exam):
            return False
        if "UNI" not in s.image_type and MP2RAGE_INVERSION.search(s.pattern_text(exam)):
            return False
        if te is not None and (
            (tr is not None and tr < 1000) or (s.inversion_recovery and (ti or 0) < r.flair_min_ti_ms)
        ):
            return True
        return self._says("T1", s, exam)

    def described_post_contrast(self, s: SeriesInfo, exam: Collection[str] = ()) -> bool:
        """The description says post-contrast and not pre-contrast (a hint, never an attribute)."""
        return self._says("T1GD", s, exam) and not self._says("T1PRE", s, exam)

    def is_t1gd(self, s: SeriesInfo, exam: Collection[str] = ()) -> bool:
        """This series alone: T1-weighted, given contrast by its Contrast/Bolus attributes, or, when it
        has none of them, described as post-contrast (:meth:`t1_roles` decides within a study)."""
        if self.is_flair(s, exam) or not self._t1_weighted(s, exam):
            return False
        if s.contrast is not None:
            return s.contrast
        return self.described_post_contrast(s, exam)

    def is_t1(self, s: SeriesInfo, exam: Collection[str] = ()) -> bool:
        """This series alone: T1-weighted and not :meth:`is_t1gd`."""
        return not self.is_flair(s, exam) and self._t1_weighted(s, exam) and not self.is_t1gd(s, exam)

    def t1_roles(
        self, series: Sequence[SeriesInfo], evidence: Mapping[str, tuple[bool, str]] | None = None
    ) -> dict[str, tuple[str, str]]:
        """SeriesInstanceUID -> (``"T1"`` or ``"T1GD"``, basis) for the T1-weighted series of a study.

        Each series' own evidence first: its Contrast/Bolus attributes, else a description that says
        post- or pre-contrast. A series with neither is post-contrast when it was acquired after a
        series that has evidence of contrast (contrast stays for the rest of the examination): a T1
        given contrast, or any series whose Contrast/Bolus attributes say so (a perfusion series, a
        post-contrast FLAIR), and native otherwise (:meth:`contrast_evidence`). Acquisition time alone
        never makes a T1GD: in a study without any evidence of contrast no series is T1GD, and a model
        that needs one is not run. ``evidence``: :meth:`contrast_evidence` of ``series``, when the
        caller has it already.
        """
        t1w = self._t1_weighted_series(series, exam_protocols(series))
        evidence = self.contrast_evidence(series) if evidence is None else evidence
        return {
            s.series_instance_uid: (
                "T1GD" if evidence[s.series_instance_uid][0] else "T1", evidence[s.series_instance_uid][1]
            )
            for s in t1w
        }

    def _t1_weighted_series(self, series: Sequence[SeriesInfo], exam: Collection[str]) -> list[SeriesInfo]:
        return [
            s for s in series
            if not self.excluded(s, exam) and not s.serves_no_role
            and not self.is_flair(s, exam) and self._t1_weighted(s, exam)
        ]  # fmt: skip

    def contrast_evidence(self, series: Sequence[SeriesInfo]) -> dict[str, tuple[bool, str]]:
        """SeriesInstanceUID -> (given contrast?, basis) for every series of a study, on the evidence
        that decides a T1's role (:meth:`t1_roles`).

        A series' own Contrast/Bolus attributes first, else a description that says post- or
        pre-contrast (a hint), else acquired after the first series with evidence of contrast (any
        series whose Contrast/Bolus attributes say so, or a T1-weighted series given contrast by its
        attributes or description): contrast stays for the rest of the examination. A FLAIR after
        contrast often says so only in its description or by its timing, and loses to a native one that is
        otherwise its equal (:func:`ranked`: after origin, coverage, slices and orientation, so a
        post-contrast 3D FLAIR still wins over a native 5 mm one on its finer slices).
        """
        exam = exam_protocols(series)
        t1w = {s.series_instance_uid for s in self._t1_weighted_series(series, exam)}
        # An agent on every T1-weighted series (entered at registration; a localizer or map without it
        # does not count) tells no T1 from another: when descriptions do, they and the timing decide,
        # except that a T1 no description calls pre-contrast keeps its attribute's contrast. Contrast was
        # certainly given, and a T1 acquired before the first one described as post-contrast may be
        # post-contrast all the same (a 3D T1 that does not say so): as native T1 it would feed the
        # four-series model two post-contrast T1s.
        t1_series = [s for s in series if s.series_instance_uid in t1w]
        everywhere = len(t1_series) > 1 and all(s.contrast is True for s in t1_series) and any(
            self._described_contrast(s, exam) is not None for s in t1_series
        )
        none = "contrast attributes on every T1 of the study" if everywhere else "no contrast attributes"
        undecided = (
            "contrast attributes on every T1 of the study, no description" if everywhere
            else "no contrast attributes or description"
        )  # fmt: skip
        own = {
            s.series_instance_uid: (
                self._described_contrast(s, exam, none) if everywhere
                else self._own_contrast_evidence(s, exam)
            )
            for s in series
        }
        # Undescribed T1s keep their attribute's contrast; not a start of contrast for timing: it is on
        # every T1 of the study, the first one too.
        kept = {s.series_instance_uid for s in t1_series if everywhere and own[s.series_instance_uid] is None}
        # Contrast given shows in any series that records it, T1 or not: a perfusion series, a
        # post-contrast FLAIR (and often only there). A description starts it only on a T1.
        given = [
            s.acquired for s in series
            if s.acquired is not None and (
                (s.contrast is True and not everywhere)
                or (
                    s.series_instance_uid in t1w and s.series_instance_uid not in kept
                    and (e := own[s.series_instance_uid]) is not None and e[0]
                )
            )
        ]  # fmt: skip
        first_given = min(given, default=None)
        for s in t1_series:
            if s.series_instance_uid in kept:
                after = first_given is not None and s.acquired is not None and s.acquired > first_given
                own[s.series_instance_uid] = (True, KEPT_CONTRAST if after else UNSURE_CONTRAST)
        out: dict[str, tuple[bool, str]] = {}
        for s in series:
            evidence = own[s.series_instance_uid]
            if evidence is not None:
                out[s.series_instance_uid] = evidence
            elif first_given is not None and s.acquired is not None and s.acquired > first_given:
                out[s.series_instance_uid] = (
                    True, f"acquired after a series given contrast ({undecided})"
                )  # fmt: skip
            else:
                out[s.series_instance_uid] = (False, undecided)
        return out

    def _own_contrast_evidence(self, s: SeriesInfo, exam: Collection[str]) -> tuple[bool, str] | None:
        """What a series says of itself: its Contrast/Bolus attributes, else its description (post- or
        pre-contrast; or its own ProtocolName, not an exam-wide one of ``exam``), else None."""
        if s.contrast is not None:
            return (True, "contrast/bolus attributes") if s.contrast else (
                False, "no contrast given (attributes)"
            )
        return self._described_contrast(s, exam)

    def _described_contrast(
        self, s: SeriesInfo, exam: Collection[str], attributes: str = "no contrast attributes"
    ) -> tuple[bool, str] | None:
        """What a series' description (or its own ProtocolName, not an exam-wide one of ``exam``) says:
        post-contrast, pre-contrast, or None; ``attributes``: what its Contrast/Bolus attributes say, for
        the basis."""
        alone = replace(s, protocol="")  # which of its names said it, for the reason
        if self.described_post_contrast(s, exam):
            where = "description" if self.described_post_contrast(alone) else "ProtocolName"
            return True, f"{where} ({attributes})"
        if self._says("T1PRE", s, exam):
            where = "description" if self._says("T1PRE", alone, ()) else "ProtocolName"
            return False, f"{where} ({attributes})"
        return None

    def is_t2(self, s: SeriesInfo, exam: Collection[str] = ()) -> bool:
        """Long TE, not inversion recovery, not echo-planar, not a gradient echo, or described as T2 without
        contradicting TE.

        A T2-weighted echo-planar series is a diffusion b=0 or a perfusion series, and a long-TE gradient
        echo is T2*-weighted: neither is the structural (turbo) spin-echo T2 the models were trained on.
        """
        te, ti = s.echo_time, s.inversion_time
        if self.is_flair(s, exam) or s.inversion_recovery or "EP" in s.scanning_sequence or s.gradient_echo:
            return False
        if ti is not None and ti >= self.rules.flair_min_ti_ms:
            return False
        if te is not None:
            return te >= self.rules.t2_min_te_ms
        return self._says("T2", s, exam)

    def matches(self, modality: str, s: SeriesInfo, exam: Collection[str] = ()) -> bool:
        """Whether series ``s`` may serve as ``modality`` (FLAIR, T1, T1GD, T2); ``exam``: the study's
        exam-wide ProtocolNames (:func:`exam_protocols`), which are not the series' words."""
        if self.excluded(s, exam):
            return False
        check = {"FLAIR": self.is_flair, "T1GD": self.is_t1gd, "T1": self.is_t1, "T2": self.is_t2}.get(
            modality
        )
        if check is None:
            raise SelectionError(f"modality {modality!r} is not one of FLAIR, T1, T1GD, T2")
        return check(s, exam)

    def assign(
        self, series: Sequence[SeriesInfo], modalities: Sequence[str], reference: str | None = None
    ) -> Assignment:
        """Choose one series per modality (:func:`ranked`); the modalities without a candidate are listed
        in ``missing`` instead of raising, the runners-up in ``alternatives``.

        One patient: every series used shares the patient identity of the series the ``reference``
        modality (the one the others are registered onto and the SEG is built on; the first of
        ``modalities`` when None or not among them) ranks first; another series is no candidate for any
        role, nor is a series whose own headers disagree on it (``refused``, :func:`identity_differs`).
        """
        out = Assignment()
        taken: set[str] = set()
        exam = exam_protocols(series)
        evidence = self.contrast_evidence(series)
        roles = self.t1_roles(series, evidence)
        given = {uid: flag for uid, (flag, _) in evidence.items()}
        order = [m for m in ("FLAIR", "T1GD", "T1", "T2") if m in modalities]
        order += [m for m in modalities if m not in order]
        lead = reference if reference in order else (order[0] if order else None)
        out.refused = self._identity_refusals(series, lead, roles, given, exam)
        for modality in order:
            matching = [
                s
                for s in series
                if s.series_instance_uid not in taken
                and not s.serves_no_role
                and self._role_matches(modality, s, roles, exam)
            ]
            candidates = [s for s in matching if s.series_instance_uid not in out.refused]
            if modality == "T1GD" and (sure := [s for s in candidates if not _unsure(s, evidence)]):
                # A T1 that may be native is no T1GD while one is known to be post-contrast.
                candidates = sure
            for s in matching:
                if s.series_instance_uid in out.refused:
                    reason = out.refused[s.series_instance_uid]
                    out.refused_candidates.setdefault(modality, []).append(f"{s.label}: {reason}")
                    logger.warning("%s candidate %s not used: %s", modality, s.label, reason)
            if not candidates:
                out.missing.append(modality)
                continue
            best_first = ranked(candidates, earliest=modality == "T1", given=given)
            best, *others = best_first
            if others:
                out.preferred[modality] = preference(
                    best_first, earliest=modality == "T1", given=given, evidence=evidence
                )
            out.chosen[modality] = best
            out.alternatives[modality] = others
            taken.add(best.series_instance_uid)
            if best.series_instance_uid in roles:
                out.basis[modality] = roles[best.series_instance_uid][1]
            elif given[best.series_instance_uid]:
                # Used all the same (a post-contrast FLAIR is better than none), but a reader is told.
                out.basis[modality] = f"given contrast: {evidence[best.series_instance_uid][1]}" + (
                    "" if any(not given[s.series_instance_uid] for s in others)
                    else f"; no {modality} candidate without contrast"
                )
            logger.info("%s: %s", modality, best.label)
        return out

    def _identity_refusals(
        self,
        series: Sequence[SeriesInfo],
        lead: str | None,
        roles: Mapping[str, tuple[str, str]],
        given: Mapping[str, bool],
        exam: Collection[str],
    ) -> dict[str, str]:
        """SeriesInstanceUID -> why it serves no role, for the series of another patient than the
        series ``lead`` ranks first, and for those whose own headers disagree (words, never values)."""
        out = {
            s.series_instance_uid: "its instances carry more than one patient identity "
            f"({differ(s.identity_mixed)} between them)"
            for s in series
            if s.identity_mixed
        }
        if lead is None:
            return out
        leads = [
            s for s in series
            if s.series_instance_uid not in out and not s.serves_no_role
            and self._role_matches(lead, s, roles, exam)
        ]  # fmt: skip
        if not leads:
            return out
        first = ranked(leads, earliest=lead == "T1", given=given)[0]
        for s in series:
            differs = identity_differs(first.identity, s.identity)
            if s.series_instance_uid not in out and differs:
                out[s.series_instance_uid] = (
                    f"another patient's identity ({differ(', '.join(differs))} from the reference series: "
                    f"{lead} series {first.series_instance_uid})"
                )
        return out

    def not_used(
        self, series: Sequence[SeriesInfo], assignment: Assignment, limit: int = NOT_USED_LIMIT
    ) -> list[dict[str, str]]:
        """Each series of the study (``series``, as scanned) that serves no input of ``assignment`` (the
        model that ran), with why: ``{"series": label, "reason": ...}``, in the order scanned. The label
        is :attr:`SeriesInfo.label` (UID, description, slices: no patient data). At most ``limit``
        entries, then one that counts the rest.

        Reasons: another patient's identity, or instances of more than one (``assignment.refused``), a
        derived map (its ImageType value), what its attributes say it is (``special``:
        diffusion, phase, susceptibility-weighted, dynamic...), excluded by its description, a balanced
        SSFP or an MP2RAGE inversion image (no T1), no role by its attributes or description, a candidate
        ranked below the chosen series (and why, as :func:`preference` says it), one that could not be
        read (``series_replaced``), or a candidate for a role the model that ran has no input for.
        """
        used = {(s.series_instance_uid, s.echo, s.stack) for s in assignment.chosen.values()}
        evidence = self.contrast_evidence(series)
        roles = self.t1_roles(series, evidence)
        given = {uid: flag for uid, (flag, _) in evidence.items()}
        exam = exam_protocols(series)
        out = [
            {"series": s.label, "reason": self._why_not_used(s, assignment, roles, given, evidence, exam)}
            for s in series
            if (s.series_instance_uid, s.echo, s.stack) not in used
        ]
        if len(out) > limit:
            rest = len(out) - limit
            more = {"series": f"{rest} more series", "reason": f"not listed (at most {limit} are)"}
            out = [*out[:limit], more]
        return out

    def _why_not_used(
        self,
        s: SeriesInfo,
        assignment: Assignment,
        roles: Mapping[str, tuple[str, str]],
        given: Mapping[str, bool],
        evidence: Mapping[str, tuple[bool, str]],
        exam: Collection[str],
    ) -> str:
        refused = assignment.refused.get(s.series_instance_uid)
        if refused is not None:
            return f"{refused}: serves no role"
        if s.derived_map:
            kind = next(v for v in s.image_type if v in DERIVED_MAPS)
            return f"derived map (ImageType {kind}): serves no role"
        if s.special:
            return f"{s.special}: serves no role"
        if (excluded := self.excluded(s, exam)) == ANGIO_PERFUSION_NAME:
            return "named as an angiogram or a perfusion series: serves no role"
        if excluded:
            return f"excluded by its {excluded} (exclude_pattern): serves no role"
        for modality in ("FLAIR", "T1GD", "T1", "T2"):
            if not self._role_matches(modality, s, roles, exam):
                continue
            chosen = assignment.chosen.get(modality)
            if chosen is None:
                return f"a {modality} candidate; the model that ran has no {modality} input"
            unreadable = f"{modality} {s.label} could not be read"
            if any(line.startswith(unreadable) for line in assignment.replaced):
                return f"the {modality} chosen first, could not be read (see series replaced)"
            pool = [chosen, *(a for a in assignment.alternatives.get(modality, []) if a is not chosen)]
            if s not in pool and _unsure(s, evidence):
                return f"a {modality} candidate only by {UNSURE_CONTRAST}; {chosen.label} is known to be one"
            if s not in pool:  # taken by no role, yet no candidate of this one: not expected
                return f"a {modality} candidate, not chosen"
            why = _why_before(chosen, s, pool, modality == "T1", given, evidence)
            return f"a {modality} candidate ranked below {chosen.label}: {why}"
        if self.balanced_ssfp(s, exam):
            return "balanced steady-state free precession (FIESTA, CISS, TrueFISP...): no T1, serves no role"
        if "UNI" not in s.image_type and MP2RAGE_INVERSION.search(s.pattern_text(exam)):
            return "an MP2RAGE inversion image (INV1, INV2): no T1, serves no role"
        return "no role: not FLAIR, T1, T1GD or T2 by its attributes or description"

    def _role_matches(
        self, modality: str, s: SeriesInfo, roles: Mapping[str, tuple[str, str]], exam: Collection[str]
    ) -> bool:
        if modality in ("T1", "T1GD"):
            if self.excluded(s, exam):
                return False
            role = roles.get(s.series_instance_uid)
            return role is not None and role[0] == modality
        return self.matches(modality, s, exam)

    def select(self, series: Sequence[SeriesInfo], modalities: Sequence[str]) -> dict[str, SeriesInfo]:
        """Choose one series per modality (see :meth:`assign`).

        Raises
        ------
        SelectionError
            A modality has no candidate; the message names it and lists the series considered.
        """
        assignment = self.assign(series, modalities)
        if assignment.missing:
            raise SelectionError(assignment.missing_message(series))
        return assignment.chosen


#: The order in which a reader is told the series used (the SR, ``segnode jobs show``).
ROLE_ORDER = ("FLAIR", "T1", "T1GD", "T2")


def role_texts(labels: Mapping[str, str], basis: Mapping[str, str]) -> list[tuple[str, str]]:
    """(modality, its series' label with what decided its role) per chosen series, in
    :data:`ROLE_ORDER`: what the SR and ``segnode jobs show`` tell a reader about the series used.

    ``labels``: modality -> :attr:`SeriesInfo.label`; ``basis``: modality -> what decided it
    (:meth:`Assignment.reasons`).
    """
    order = sorted(labels, key=lambda m: (ROLE_ORDER.index(m) if m in ROLE_ORDER else len(ROLE_ORDER), m))
    return [(m, f"{labels[m]} ({basis[m]})" if m in basis else labels[m]) for m in order]


#: Slice pitches up to this (mm) are one class when candidates are ranked: a series finer than 1 mm is
#: read on ~1 mm blocks (node/pipeline.py ``analysis_grid``), so it is no better for a model.
FINE_SLICE_MM = 1.0
#: A candidate reaching less than this share of the farthest-reaching candidate's extent (along its own
#: slice normal) ranks after every one that reaches more: a thin slab through the lesion, however fine,
#: is not a whole-brain series.
COVERAGE_SHARE = 0.8


#: What each element of :func:`ranked`'s order says when it is the one that put a series first.
PREFERENCE_REASONS = (
    "ORIGINAL, not DERIVED",
    "covers more",
    "finer slices",
    "axial",
    "more slices",
    "not given contrast",
    "acquired later",
)


def ranked(
    candidates: Sequence[SeriesInfo], earliest: bool = False, given: Mapping[str, bool] | None = None
) -> list[SeriesInfo]:
    """Candidates of one role, best first: ORIGINAL over DERIVED; then one that covers about as much as
    the farthest-reaching candidate (:data:`COVERAGE_SHARE`) over a slab; then the finer slices (pitches
    up to :data:`FINE_SLICE_MM` alike); then axial; then most slices; then one not given contrast (a
    FLAIR before and one after contrast: the native one, as BraTS has it; ``given``: SeriesInstanceUID
    -> given contrast, the study's evidence of :meth:`SeriesSelector.contrast_evidence`, which sees a
    post-contrast description and the timing too; without it, the series' own Contrast/Bolus
    attributes); then the one acquired last (a
    series repeated with the same coverage is repeated because the first one was spoiled, by motion
    most often). ``earliest`` (the native T1 role): the one acquired first instead, since a T1 series
    without evidence of contrast acquired later may have been given contrast unrecorded.

    Finer slices before axial: a 3D FLAIR of 1 mm beside a 2D axial one of 5 mm (a common glioma
    protocol) gave the better whole tumour, scored on the truth's 1 mm grid (8 BraTS training cases
    re-acquired both ways, through the node: mean Dice 0.914 against 0.899, better on every case).
    """
    return sorted(candidates, key=_rank_key(candidates, earliest, given), reverse=True)


def preference(
    order: Sequence[SeriesInfo],
    earliest: bool = False,
    given: Mapping[str, bool] | None = None,
    evidence: Mapping[str, tuple[bool, str]] | None = None,
) -> str:
    """Why the first of ``order`` (a role's candidates as :func:`ranked` returns them, with the same
    ``given``) comes before the second ("over series ...: finer slices"), or "" when there is no second.
    ``evidence`` (:meth:`SeriesSelector.contrast_evidence`): when contrast decided and the second's
    evidence is not its Contrast/Bolus attributes, what it is ("not given contrast (the other: ...)")."""
    if len(order) < 2:
        return ""
    first, second = order[:2]
    return f"over {second.label}: {_why_before(first, second, order, earliest, given, evidence)}"


def _why_before(
    first: SeriesInfo,
    second: SeriesInfo,
    candidates: Sequence[SeriesInfo],
    earliest: bool,
    given: Mapping[str, bool] | None,
    evidence: Mapping[str, tuple[bool, str]] | None,
) -> str:
    """Which element of :func:`ranked`'s order puts ``first`` before ``second`` (both of the role's
    ``candidates``), as :data:`PREFERENCE_REASONS` words it."""
    key = _rank_key(candidates, earliest, given)
    deciding = next((n for n, (a, b) in enumerate(zip(key(first), key(second), strict=True)) if a != b), None)
    reason = "ranked equal, listed first" if deciding is None else PREFERENCE_REASONS[deciding]
    if earliest and reason == PREFERENCE_REASONS[-1]:
        reason = "acquired earlier"
    why = (evidence or {}).get(second.series_instance_uid)
    if reason == "not given contrast" and why is not None and second.contrast is not True:
        reason += f" (the other: {why[1]})"
    return reason


def _rank_key(
    candidates: Sequence[SeriesInfo], earliest: bool = False, given: Mapping[str, bool] | None = None
) -> Callable[[SeriesInfo], tuple[Any, ...]]:
    """The sort key of :func:`ranked` for one role's ``candidates`` (coverage is relative to them)."""
    widest = max((e for e in (s.extent_mm for s in candidates) if e is not None), default=None)

    def key(s: SeriesInfo) -> tuple[bool, bool, float, bool, int, bool, float]:
        extent = s.extent_mm
        covers = widest is None or extent is None or extent >= COVERAGE_SHARE * widest
        pitch = -round(max(s.slice_mm, FINE_SLICE_MM), 1) if s.slice_mm is not None else float("-inf")
        acquired = s.acquired if s.acquired is not None else float("-inf")
        if earliest:
            acquired = -s.acquired if s.acquired is not None else float("-inf")
        contrast = s.contrast is True
        if given is not None:
            contrast = given.get(s.series_instance_uid, contrast)
        return (s.original, covers, pitch, s.axial, s.slices, not contrast, acquired)

    return key


@dataclass
class Assignment:
    """What :meth:`SeriesSelector.assign` found: a series per modality, the modalities without one, and
    for T1 and T1GD what decided their role (for another role, that its series was given contrast)."""

    chosen: dict[str, SeriesInfo] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    basis: dict[str, str] = field(default_factory=dict)
    #: For a modality with other candidates, why the chosen one came first (:func:`preference`).
    preferred: dict[str, str] = field(default_factory=dict)
    #: The other candidates of each chosen modality, best first: tried in turn when the chosen series
    #: cannot be read (node/pipeline.py).
    alternatives: dict[str, list[SeriesInfo]] = field(default_factory=dict)
    #: One line per chosen series that could not be read and the series used instead.
    replaced: list[str] = field(default_factory=list)
    #: SeriesInstanceUID -> why it serves no role: another patient's identity than the reference
    #: series', or instances of more than one (:meth:`SeriesSelector.assign`; no values, only keywords).
    refused: dict[str, str] = field(default_factory=dict)
    #: Modality -> its candidates refused so (``label: reason``).
    refused_candidates: dict[str, list[str]] = field(default_factory=dict)

    def missing_reason(self) -> str:
        """``T2 missing``, and for a missing modality whose candidates were refused, why:
        ``T2 missing (series ... (AX T2, 24 slices): another patient's identity (...))``."""
        lines = [line for m in self.missing for line in self.refused_candidates.get(m, [])]
        return f"{', '.join(self.missing)} missing" + (f" ({'; '.join(lines)})" if lines else "")

    def missing_message(self, series: Sequence[SeriesInfo]) -> str:
        """The selection error of the first missing modality: ``no T2 series in the study (considered:
        ...)``, and the candidates refused for it with why."""
        seen = "; ".join(s.label for s in series) or "no MR series"
        modality = self.missing[0]
        refused = self.refused_candidates.get(modality)
        why = f"; refused: {'; '.join(refused)}" if refused else ""
        return f"no {modality} series in the study (considered: {seen}{why})"

    def reasons(self) -> dict[str, str]:
        """Modality -> what decided its series: the role's basis and why it came before the others."""
        out = {}
        for modality in self.chosen:
            parts = [self.basis.get(modality, ""), self.preferred.get(modality, "")]
            if any(parts):
                out[modality] = "; ".join(p for p in parts if p)
        return out
