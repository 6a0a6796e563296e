"""How many images a series' header announces (node/announced_images.py), on the real vendors' series
in data/dicom, and the incomplete-series check that reads it (node/pipeline.py ``incomplete_series``)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest

from node.announced_images import announced_images
from node.pipeline import incomplete_series
from tests.helpers.peers import require_shared

#: The real series and the attribute each announces its count in.
VENDORS = {
    "ge_t1_mprage_healthy": "ImagesInAcquisition",
    "philips_t1_sag3d_mprage_healthy": "NumberOfSlicesMR (Philips)",
    "siemens_t1_fl2d_sag_healthy": "sSliceArray.lSize (Siemens)",
}


def _files(name: str) -> list[Path]:
    return sorted(p for p in require_shared("dicom", name).iterdir() if p.is_file())


def _plan(uid: str) -> SimpleNamespace:
    """A routing plan whose one route reads series ``uid`` (all that ``incomplete_series`` looks at)."""
    chosen = {"FLAIR": SimpleNamespace(series_instance_uid=uid)}
    return SimpleNamespace(routes=[SimpleNamespace(assignment=SimpleNamespace(chosen=chosen))])


@pytest.mark.parametrize("name", sorted(VENDORS))
def test_each_vendors_series_announces_its_own_image_count(name: str) -> None:
    """GE writes ImagesInAcquisition; Philips and Siemens write only their own slice counts, which the
    incomplete-series wait did not read, so a Philips or Siemens series paused within was analysed
    half received."""
    files = _files(name)
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert announced_images(ds) == (len(files), VENDORS[name])


@pytest.mark.parametrize("name", ["philips_t1_sag3d_mprage_healthy", "siemens_t1_fl2d_sag_healthy"])
def test_a_vendor_series_short_of_its_slices_is_incomplete_and_a_whole_one_is_not(name: str) -> None:
    files = _files(name)
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    cut = len(files) // 2
    assert incomplete_series(_plan(uid), {uid: files[:cut]}) == [  # type: ignore[arg-type]
        f"series {uid}: {cut} of {len(files)} images received"
    ]
    assert incomplete_series(_plan(uid), {uid: files}) == []  # type: ignore[arg-type]


def test_a_derived_mosaic_or_3d_siemens_header_announces_nothing_of_the_vendors() -> None:
    """A reformat carries its source scan's protocol, a mosaic holds many slices in one image, and a 3D
    protocol's lSize counts slabs: none of them says how many images the series holds."""
    siemens = pydicom.dcmread(_files("siemens_t1_fl2d_sag_healthy")[0], stop_before_pixels=True)
    philips = pydicom.dcmread(_files("philips_t1_sag3d_mprage_healthy")[0], stop_before_pixels=True)
    for ds in (siemens, philips):
        derived = ds.copy()
        derived.ImageType = ["DERIVED", "SECONDARY", "MPR"]
        assert announced_images(derived) is None
    mosaic = siemens.copy()
    mosaic.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"]
    assert announced_images(mosaic) is None
    three_d = siemens.copy()
    three_d.MRAcquisitionType = "3D"
    assert announced_images(three_d) is None
    # The standard attribute still counts, as before, whatever the image type.
    derived.ImagesInAcquisition = 12
    assert announced_images(derived) == (12, "ImagesInAcquisition")
