"""node/instance_header.py: the receive path's few attributes read from the data set bytes.

The reader must give exactly what pydicom's decoding gives (InstanceHeader.from_dataset) or leave the
data set to pydicom (None); it may never give a different answer. Checked on real vendor series, on
data sets with nested sequences and encapsulated pixel data, on each kind of data set it must leave
alone, on random damage (hypothesis), and over a real association.
"""

from __future__ import annotations

import copy
import io
import logging
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
)
from pynetdicom import AE
from pynetdicom.dsutils import decode, encode
from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

from converters.dicom_writer import write_study
from converters.synthetic import make_synthetic_case
from db.session import make_engine, make_session_factory, upgrade
from node import dimse, reactor
from node import scp as scp_module
from node.instance_header import InstanceHeader, read_header
from node.metrics import NodeMetrics
from node.part10 import file_header
from node.scp import StorageSCP
from tests.helpers.dcmtk import storescu
from tests.helpers.node import node_settings
from tests.helpers.peers import require_shared
from tests.helpers.ports import free_port

VENDOR_SERIES = ["ge_t1_mprage_healthy", "philips_t1_sag3d_mprage_healthy", "siemens_t1_fl2d_sag_healthy"]


def _dataset_bytes(path: Path) -> tuple[bytes, str]:
    """A DICOM file's data set bytes (what a C-STORE carries) and its transfer syntax."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    with open(path, "rb") as fh:
        read_preamble(fh, False)
        meta = _read_file_meta_info(fh)
        return fh.read(), str(meta.TransferSyntaxUID)


def _by_pydicom(data: bytes, syntax: str) -> InstanceHeader:
    """What the node read before: pynetdicom's decoding (as ``event.dataset``), then the checks."""
    uid = UID(syntax)
    ds = decode(io.BytesIO(data), uid.is_implicit_VR, uid.is_little_endian, uid.is_deflated)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid
    return InstanceHeader.from_dataset(ds)


def _encoded(ds: Dataset, syntax: str) -> bytes:
    uid = UID(syntax)
    data = encode(ds, uid.is_implicit_VR, uid.is_little_endian, uid.is_deflated)
    assert data is not None
    return data


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    study = write_study(
        make_synthetic_case(3, (24, 24, 8)), tmp_path_factory.mktemp("hdr"), modalities=["FLAIR"]
    )
    return list(study.files["FLAIR"])


@pytest.fixture(scope="module")
def slice_ds(synthetic: list[Path]) -> Dataset:
    return pydicom.dcmread(synthetic[2])


@pytest.mark.parametrize("series", VENDOR_SERIES)
def test_reads_what_pydicom_reads_on_real_vendor_series(series: str) -> None:
    files = sorted(p for p in require_shared("dicom", series).iterdir() if p.is_file())
    assert files
    for path in files:
        data, syntax = _dataset_bytes(path)
        header = read_header(data, syntax)
        assert header is not None, path.name
        assert header == _by_pydicom(data, syntax), path.name
        assert header.has_pixel_data and header.short_pixel_data == ""


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
def test_nested_sequences_of_either_length(slice_ds: Dataset, syntax: str) -> None:
    """Sequences of defined and undefined length, nested, before and between the wanted elements."""
    ds = copy.deepcopy(slice_ds)
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "T-A0100", "SRT", "Brain"
    middle = Dataset()
    middle.AnatomicRegionSequence = Sequence([inner, copy.deepcopy(inner)])
    middle.ReferencedSOPInstanceUID = "1.2.3.4"
    ds.ReferencedImageSequence = Sequence([middle])  # (0008,1140), before the UIDs' group
    ds.ProcedureCodeSequence = Sequence([copy.deepcopy(inner)])  # (0008,1032)
    ds.RequestAttributesSequence = Sequence([])  # (0040,0275), empty
    for undefined in (False, True):
        for element in ds.iterall():
            if element.VR == "SQ":
                element.is_undefined_length = undefined
                for item in element.value:
                    item.is_undefined_length_sequence_item = undefined
        data = _encoded(ds, syntax)
        header = read_header(data, syntax)
        assert header is not None
        assert header == _by_pydicom(data, syntax)
        assert header.sop_instance_uid == slice_ds.SOPInstanceUID


def test_encapsulated_pixel_data(slice_ds: Dataset) -> None:
    """Compressed data sets are Explicit VR Little Endian with pixel data of undefined length; their
    length is not checked (as before)."""
    ds = copy.deepcopy(slice_ds)
    ds.PixelData = encapsulate([b"\xff\xd8fragment-one\xff\xd9", b"\xff\xd8two\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    data = _encoded(ds, JPEGBaseline8Bit)
    header = read_header(data, JPEGBaseline8Bit)
    assert header is not None
    assert header == _by_pydicom(data, JPEGBaseline8Bit)
    assert header.has_pixel_data and header.short_pixel_data == ""


def _no_sop_uid(ds: Dataset) -> None:
    del ds.SOPInstanceUID


def _bad_study_uid(ds: Dataset) -> None:
    ds.StudyInstanceUID = "1.2.abc"


def _two_series_uids(ds: Dataset) -> None:
    ds.SeriesInstanceUID = ["1.2.3", "1.2.4"]


def _short_pixels(ds: Dataset) -> None:
    ds.PixelData = ds.PixelData[:100]


def _no_rows(ds: Dataset) -> None:
    del ds.Rows


def _two_rows(ds: Dataset) -> None:
    ds.Rows = [24, 24]


def _odd_frames(ds: Dataset) -> None:
    ds.NumberOfFrames = "1.5"


@pytest.mark.parametrize(
    "change", [_no_sop_uid, _bad_study_uid, _two_series_uids, _short_pixels, _no_rows, _two_rows, _odd_frames]
)
def test_leaves_what_pydicom_must_judge(slice_ds: Dataset, change: object) -> None:
    """Missing or malformed UIDs, short pixel data, unusual pixel attributes: None, so that the node
    decodes with pydicom and answers (and words its message) exactly as before."""
    ds = copy.deepcopy(slice_ds)
    change(ds)  # type: ignore[operator]
    for syntax in (ImplicitVRLittleEndian, ExplicitVRLittleEndian):
        assert read_header(_encoded(ds, syntax), syntax) is None


def test_leaves_other_encodings_and_broken_structure(slice_ds: Dataset) -> None:
    data = _encoded(slice_ds, ExplicitVRLittleEndian)
    assert read_header(data, ExplicitVRLittleEndian) is not None
    for syntax in (ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian):
        assert read_header(_encoded(slice_ds, syntax), syntax) is None
    assert read_header(data[:-1], ExplicitVRLittleEndian) is None  # the last value cut short
    assert read_header(data + b"\x00" * 4, ExplicitVRLittleEndian) is None  # half an element header
    assert read_header(data[:4] + b"ZZ" + data[6:], ExplicitVRLittleEndian) is None  # no such VR
    # elements out of order: the first element appended again at the end
    first = 8 + int.from_bytes(data[6:8], "little")
    assert read_header(data + data[:first], ExplicitVRLittleEndian) is None


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    syntax=st.sampled_from([ImplicitVRLittleEndian, ExplicitVRLittleEndian]),
    damage=st.lists(
        st.tuples(st.sampled_from(["flip", "cut", "insert"]), st.integers(0, 10**6), st.integers(0, 255)),
        min_size=1,
        max_size=3,
    ),
)
def test_damaged_bytes_never_read_differently(slice_ds: Dataset, syntax: str, damage: list) -> None:
    """Whatever the damage (in the first 1200 bytes, where the attributes are, or anywhere): the reader
    gives pydicom's answer or leaves the data set to pydicom."""
    raw = bytearray(_encoded(slice_ds, syntax))
    for kind, where, value in damage:
        if not raw:
            return
        at = (where % 1200 if where % 2 else where) % len(raw)
        if kind == "flip":
            raw[at] ^= value or 0xFF
        elif kind == "cut":
            del raw[at:]
        else:
            raw[at:at] = bytes([value])
    header = read_header(bytes(raw), syntax)
    if header is None:
        return
    assert header == _by_pydicom(bytes(raw), syntax)


@pytest.fixture()
def scp(tmp_path: Path, db_url: str) -> Iterator[StorageSCP]:
    settings_ = node_settings(tmp_path, free_port(), db_url=db_url)
    upgrade(settings_.database.url)
    running = StorageSCP(
        settings_.node, make_session_factory(make_engine(settings_.database.url)), NodeMetrics()
    )
    running.start()
    yield running
    running.stop()


def test_an_association_reads_every_instance_without_pydicom(
    scp: StorageSCP, synthetic: list[Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Over a real association (DCMTK storescu), each instance is read from its bytes; a data set the
    reader leaves alone (here: a UID it will not vouch for) goes through pydicom and is refused as
    before."""
    decoded: list[str] = []
    original = InstanceHeader.from_dataset.__func__  # type: ignore[attr-defined]

    def counting(cls: type[InstanceHeader], ds: Dataset, *syntax: str) -> InstanceHeader:
        decoded.append(str(ds.SOPInstanceUID))
        return original(cls, ds, *syntax)

    monkeypatch.setattr(scp_module.InstanceHeader, "from_dataset", classmethod(counting))
    proc = storescu(scp.port, synthetic)
    assert proc.returncode == 0, proc.stderr
    assert decoded == []
    assert len(list(scp.spool_dir.rglob("*.dcm"))) == len(synthetic)

    odd = pydicom.dcmread(synthetic[0])
    odd.SOPInstanceUID = "1.2.840.99.7"
    odd.SeriesInstanceUID = "1.2.840.99.x"  # not a UID
    path = synthetic[0].parent.parent / "odd.dcm"
    odd.save_as(path)
    with caplog.at_level(logging.WARNING, logger="node.scp"):
        proc = storescu(scp.port, [path])
    assert proc.returncode != 0  # storescu reports the refused instance
    assert decoded == ["1.2.840.99.7"]
    assert "0xC000 (Cannot understand)" in caplog.text
    assert "SeriesInstanceUID of 12 characters (not shown: it holds characters other than" in caplog.text
    assert not any("1.2.840.99.x" in r.getMessage() for r in caplog.records if r.name == "node.scp")
    assert len(list(scp.spool_dir.rglob("*.dcm"))) == len(synthetic)


def _with_study_uid_as_un(ds: Dataset, syntax: str, path: Path) -> Path:
    """``ds`` saved as a DICOM file in ``syntax``, its StudyInstanceUID's VR written as UN (as gateways
    that do not know a tag write it): :func:`read_header` leaves such a data set to pydicom."""
    raw = _encoded(ds, syntax)
    at = raw.index(b"\x20\x00\x0d\x00UI")
    length = int.from_bytes(raw[at + 6 : at + 8], "little")
    raw = raw[:at] + b"\x20\x00\x0d\x00UN\x00\x00" + length.to_bytes(4, "little") + raw[at + 8 :]
    assert read_header(raw, syntax) is None
    path.write_bytes(file_header(ds.SOPClassUID, ds.SOPInstanceUID, syntax) + raw)
    return path


def test_a_compressed_instance_decoded_by_pydicom_is_kept(
    scp: StorageSCP, synthetic: list[Path], tmp_path: Path
) -> None:
    """A valid RLE instance that the reader leaves to pydicom: its pixel data is measured in the
    presentation context's transfer syntax (``event.dataset`` has no File Meta), so it is kept; it used
    to be taken for native pixel data and refused as truncated (0xC000)."""
    ds = pydicom.dcmread(synthetic[3])
    ds.compress(RLELossless)
    path = _with_study_uid_as_un(ds, RLELossless, tmp_path / "rle.dcm")
    ae = AE(ae_title="PACS")
    ae.add_requested_context(MRImageStorage, [RLELossless])
    assoc = reactor.associate(ae, "127.0.0.1", scp.port, "SEGNODE")
    assert assoc.is_established
    try:
        assert int(assoc.send_c_store(path).Status) == dimse.SUCCESS
    finally:
        assoc.release()
    (kept,) = scp.spool_dir.rglob("*.dcm")
    assert pydicom.dcmread(kept).pixel_array.shape == (ds.Rows, ds.Columns)


def test_a_c_store_without_a_data_set_is_refused_as_before() -> None:
    """No data set at all: nothing to read from bytes; pydicom's path refuses it (0xC000)."""
    from types import SimpleNamespace

    from node.exceptions import InvalidInstanceError

    class Event:
        request = SimpleNamespace(DataSet=None)
        context = SimpleNamespace(transfer_syntax=ExplicitVRLittleEndian)

        @property
        def dataset(self) -> Dataset:
            raise TypeError("no data set")

    with pytest.raises(InvalidInstanceError, match=r"instance 1\.2\.3: data set cannot be decoded"):
        scp_module.instance_header(Event(), "1.2.3")
