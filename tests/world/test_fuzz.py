"""Bounded fuzzing (hypothesis) of the receive-and-assemble path.

A valid FLAIR series is mutated (attributes set to odd values or deleted, pixel data cut, encoded
bytes flipped), every instance goes through the SCP's receive (decode, UID checks, pixel-data checks,
spool, row) and the accepted ones are assembled as a job does (converters.load_series, RAS). The
only acceptable outcomes: an instance is stored or refused with 0xC000 and a message; the series
assembles into a finite volume or fails with a ConverterError naming the series. Anything else (an
IndexError, a ZeroDivisionError, a NaN affine, a crash) is a bug.
"""

from __future__ import annotations

import copy
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, Phase, event, example, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, read_preamble

from converters.dicom_writer import write_study
from converters.exceptions import ConverterError
from converters.synthetic import make_synthetic_case
from db.session import make_engine, make_session_factory, upgrade
from node import dimse
from node.exceptions import InvalidInstanceError
from node.instance_header import InstanceHeader, read_header
from node.metrics import NodeMetrics
from node.scp import StorageSCP
from tests.helpers.node import node_settings

SHAPE = (24, 24, 8)

ODD_NUMBERS = st.sampled_from(
    [0, -1, 1, 2, 3, 7, 65535, 10**6, 0.0, -0.5, 1e-9, 1e9, math.nan, math.inf, -math.inf]
)
ODD_VALUES = st.one_of(
    ODD_NUMBERS,
    st.sampled_from(
        ["", "abc", "1\\2", "0\\0\\0\\0\\0\\0", "nan\\nan", "1\\0\\0\\0\\1\\0", "1\\0\\0\\0\\0\\1"]
    ),
    st.lists(ODD_NUMBERS, min_size=1, max_size=7),
)
KEYWORDS = [
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "SamplesPerPixel",
    "PixelSpacing",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "SliceThickness",
    "SpacingBetweenSlices",
    "RescaleSlope",
    "RescaleIntercept",
    "NumberOfFrames",
    "InstanceNumber",
]


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    study = write_study(make_synthetic_case(2, SHAPE), tmp_path_factory.mktemp("fuzz"), modalities=["FLAIR"])
    return [pydicom.dcmread(p) for p in study.files["FLAIR"]]


mutation = st.one_of(
    st.tuples(st.just("set"), st.integers(0, SHAPE[2] - 1), st.sampled_from(KEYWORDS), ODD_VALUES),
    st.tuples(st.just("delete"), st.integers(0, SHAPE[2] - 1), st.sampled_from(KEYWORDS), st.none()),
    st.tuples(st.just("cut-pixels"), st.integers(0, SHAPE[2] - 1), st.none(), st.integers(0, 2 * 24 * 24)),
    st.tuples(st.just("flip-byte"), st.integers(0, SHAPE[2] - 1), st.none(), st.integers(0, 10**6)),
    st.tuples(st.just("drop"), st.integers(0, SHAPE[2] - 1), st.none(), st.none()),
)


def _encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _dataset_offset(part10: bytes) -> int:
    """Where the data set of a DICOM file starts: after the File Meta Information group."""
    fh = io.BytesIO(part10)
    read_preamble(fh, False)
    _read_file_meta_info(fh)
    return fh.tell()


def _mutated(series: list[Dataset], mutations: list[tuple[str, int, Any, Any]]) -> list[bytes | None]:
    datasets: list[Dataset | None] = [copy.deepcopy(ds) for ds in series]
    flips: dict[int, int] = {}
    for kind, index, keyword, value in mutations:
        ds = datasets[index]
        if ds is None:
            continue
        if kind == "set":
            try:
                setattr(ds, keyword, value)
            except (ValueError, TypeError, OverflowError):
                continue  # pydicom itself refuses this value
        elif kind == "delete" and keyword in ds:
            delattr(ds, keyword)
        elif kind == "cut-pixels":
            ds.PixelData = ds.PixelData[:value]
        elif kind == "flip-byte":
            flips[index] = value
        elif kind == "drop":
            datasets[index] = None
    out: list[bytes | None] = []
    for n, ds in enumerate(datasets):
        if ds is None:
            out.append(None)
            continue
        try:
            raw = bytearray(_encode(ds))
        except Exception:  # pydicom cannot even write it: the PACS could not have sent it
            out.append(None)
            continue
        if n in flips:
            raw[200 + flips[n] % (len(raw) - 200)] ^= 0xFF
        out.append(bytes(raw))
    return out


@settings(
    max_examples=40,
    deadline=None,
    database=None,
    derandomize=True,  # the same examples in every run: CI stays reproducible
    phases=[Phase.explicit, Phase.generate],  # no shrinking: bounded time even when it finds something
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(mutations=st.lists(mutation, min_size=1, max_size=4))
@example(mutations=[("set", 0, "RescaleSlope", "1\\2")])  # found here: a TypeError, now a clear error
@example(mutations=[("set", 3, "RescaleIntercept", math.nan)])
@example(mutations=[("cut-pixels", 2, None, 100)])
@example(mutations=[("set", 1, "InstanceNumber", 7)])  # harmless: the series assembles
@pytest.mark.filterwarnings("ignore")
def test_receive_and_assemble_never_crash(
    series: list[Dataset],
    tmp_path_factory: pytest.TempPathFactory,
    mutations: list[tuple[str, int, Any, Any]],
) -> None:
    import shutil

    from converters.dicom_series import load_series
    from converters.reorient import volume_to_ras

    tmp = tmp_path_factory.mktemp("run")
    node = node_settings(tmp, 0).node
    template = tmp_path_factory.getbasetemp() / "fuzz-template.db"
    if not template.exists():
        upgrade(f"sqlite:///{template}")
    shutil.copyfile(template, tmp / "node.db")
    url = f"sqlite:///{tmp / 'node.db'}"
    scp = StorageSCP(node, make_session_factory(make_engine(url)), NodeMetrics())
    scp.spool_dir.mkdir(parents=True, exist_ok=True)
    stored: list[Path] = []
    try:
        for encoded in _mutated(series, mutations):
            if encoded is None:
                continue
            try:  # what pynetdicom's event.dataset does; the SCP answers 0xC000 when it fails
                ds = pydicom.dcmread(io.BytesIO(encoded), force=True)
                sop_uid = str(ds.get("SOPInstanceUID", ""))
                sop_class = str(ds.get("SOPClassUID", ""))
                header = InstanceHeader.from_dataset(ds)
            except Exception:
                continue
            try:  # the file's own meta group may be damaged too; a C-STORE carries no meta group
                data_set = encoded[_dataset_offset(encoded) :]
                syntax = str(ds.file_meta.TransferSyntaxUID)
            except Exception:
                data_set = None
            if data_set is not None:
                # The node reads the header from the data set's bytes where it can: the same answer.
                fast = read_header(data_set, syntax)
                assert fast is None or fast == header
            try:
                result = scp.receive(
                    header, encoded, sop_class, sop_uid, "PACS"
                )  # a whole file, as encoded_dataset()
            except InvalidInstanceError as exc:
                assert str(exc).startswith("instance "), str(exc)
                event("instance refused (InvalidInstanceError)")
                continue
            event(f"instance answered {result.outcome}")
            assert result.status in (dimse.SUCCESS, dimse.CANNOT_UNDERSTAND)
            if result.status == dimse.SUCCESS and result.outcome == "kept":
                stored.extend(scp.spool_dir.rglob(f"{sop_uid}.dcm"))
        if not stored:
            return
        try:
            volume = load_series(sorted(stored))
            array, affine = volume_to_ras(volume)
        except ConverterError as exc:
            assert str(exc), "a converter error without a message"
            event("series refused (ConverterError)")
            return
        event("series assembled")
        assert np.all(np.isfinite(affine)), affine
        assert array.ndim == 3 and all(n > 0 for n in array.shape)
        assert all(s > 0 and math.isfinite(s) for s in volume.spacing), volume.spacing
    finally:
        scp._io.shutdown(wait=True)
