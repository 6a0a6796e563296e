"""How many images a series' header says the series will hold, so that a series the PACS paused in the
middle of is not analysed half received (node/pipeline.py ``incomplete_series``).

Scanners write it in different places:

* ImagesInAcquisition (0020,1002), the standard attribute: the images of the acquisition (GE writes
  it; so do some others).
* Philips: NumberOfSlicesMR (2001,xx18) of the private block ``Philips Imaging DD 001``, the slices
  of the scan (one volume).
* Siemens: ``sSliceArray.lSize`` in the MrPhoenixProtocol of the CSA series header (0029,xx20, private
  block ``SIEMENS CSA HEADER``): the slices of a 2D scan (one volume). Of a 3D scan it counts slabs,
  not images, so it is read for 2D scans only.

The vendors' counts are of slices in one volume: a whole series holds at least that many images (more
with several echoes or repetitions), so fewer images than that is a series not yet whole. They
describe the scan as acquired, which a derived series (a reformat, a projection) carried over from
it does not hold, and one mosaic image of Siemens holds many slices: the vendors' counts are read
only from ORIGINAL images that are not mosaics. None of these counts any value of the patient.
"""

from __future__ import annotations

import re

from pydicom.dataset import Dataset

#: The Philips private block and the element of NumberOfSlicesMR in it.
PHILIPS_CREATOR = "Philips Imaging DD 001"
PHILIPS_SLICES = 0x18
#: The Siemens private block and the element of the CSA series header in it.
SIEMENS_CREATOR = "SIEMENS CSA HEADER"
SIEMENS_SERIES_HEADER = 0x20
#: The slice count of a Siemens 2D protocol (ASCCONV text inside the CSA series header).
SIEMENS_SLICES = re.compile(rb"sSliceArray\.lSize\s*=\s*(\d+)")


def _count(value: object) -> int | None:
    try:
        count = int(str(value).strip())
    except (TypeError, ValueError):
        return None
    return count if count > 0 else None


def _private(ds: Dataset, group: int, creator: str, element: int) -> object:
    """The value of private element ``element`` of ``creator``'s block in ``group``, or None."""
    try:
        return ds.private_block(group, creator)[element].value
    except (KeyError, ValueError):
        return None


def _original(ds: Dataset) -> bool:
    image_type = [str(v).strip().upper() for v in (ds.get("ImageType") or [])]
    return bool(image_type) and image_type[0] == "ORIGINAL" and "MOSAIC" not in image_type


def announced_images(ds: Dataset) -> tuple[int, str] | None:
    """The number of images the header ``ds`` (one single-frame image) says its series will hold at
    least, and the attribute that says it (see the module notes); None when it says nothing usable."""
    if (count := _count(ds.get("ImagesInAcquisition"))) is not None:
        return count, "ImagesInAcquisition"
    if not _original(ds):
        return None
    if (count := _count(_private(ds, 0x2001, PHILIPS_CREATOR, PHILIPS_SLICES))) is not None:
        return count, "NumberOfSlicesMR (Philips)"
    if str(ds.get("MRAcquisitionType") or "").strip().upper() != "2D":
        return None
    header = _private(ds, 0x0029, SIEMENS_CREATOR, SIEMENS_SERIES_HEADER)
    found = SIEMENS_SLICES.search(header) if isinstance(header, bytes) else None
    if found and (count := _count(found.group(1).decode())) is not None:
        return count, "sSliceArray.lSize (Siemens)"
    return None
