"""The OHIF viewer tests' shared parts (tests/viewer/test_ohif*.py): the peers they need, the node's objects
as stored in Orthanc, the driver (deploy/viewer/drive.mjs) and its report, and judging a screenshot of the
viewport against the SEG: where cornerstone puts the source image on screen, and which screen pixels have
a segment's colour.

Segment colours are what a viewer decodes from the SEG: Recommended Display CIELab Value (PS3.3 C.8.20.2,
scaled as in C.10.7.1.1) converted to sRGB with the standard formulas, independently of highdicom.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from PIL import Image
from scipy import ndimage

from deploy.viewer import stack
from tests.helpers.peers import missing, require_program

DRIVER = stack.HERE / "drive.mjs"
#: A screen pixel has a segment's colour when its colour minus its grey part (the source image underneath
#: is grey, R = G = B; a segment is blended over it) is at least this long (0..255 per channel) ...
COLOUR_MARGIN = 40.0
#: ... and points the way of the segment colour's own (cosine at least this: within about 18 degrees).
COLOUR_COSINE = 0.95

#: Colour pixels count within this many source pixels of the image's non-zero part (see check_drawn).
HEAD_MARGIN = 3

#: D65 white (PS3.3 C.10.7.1.1: CIELab values are relative to the D65 illuminant).
D65 = np.array([0.95047, 1.0, 1.08883])
XYZ_TO_LINEAR_SRGB = np.array(
    [[3.2406, -1.5372, -0.4986], [-0.9689, 1.8758, 0.0415], [0.0557, -0.2040, 1.0570]]
)

Shot = npt.NDArray[np.float64]
Mask = npt.NDArray[np.bool_]


def need_viewer_parts() -> str:
    """The Orthanc program, after checking every part of the viewer stack is installed (skip, or fail
    under SEGNODE_REQUIRE_PEERS=1, naming the missing one)."""
    orthanc = require_program("Orthanc", "/usr/sbin")
    require_program("chromium")
    require_program("node")
    if not stack.DICOMWEB_PLUGIN.is_file():
        missing(f"{stack.DICOMWEB_PLUGIN} is missing (Debian package orthanc-dicomweb; .ci/run installs it)")
    if (
        not (stack.OHIF_DIST / "index.html").is_file()
        or not (stack.HERE / "node_modules" / "playwright-core").is_dir()
    ):
        missing("OHIF dist or playwright-core is not installed (run deploy/viewer/install.sh; .ci/run does)")
    return orthanc


def stored(orthanc: stack.OrthancWeb, instance: str) -> pydicom.Dataset:
    """Orthanc instance ``instance`` (Orthanc id) as stored: its DICOM file, read by pydicom."""
    with urllib.request.urlopen(f"{orthanc.url}/instances/{instance}/file", timeout=30) as rsp:
        return pydicom.dcmread(BytesIO(rsp.read()))


def seg_masks(seg: pydicom.Dataset) -> dict[int, dict[str, Mask]]:
    """Segment number -> referenced source SOPInstanceUID -> that segment's mask, decoded from the stored
    SEG (BINARY, one frame per segment and source image; frames left out are empty)."""
    frames = np.asarray(seg.pixel_array, dtype=bool).reshape(-1, seg.Rows, seg.Columns)
    out: dict[int, dict[str, Mask]] = {}
    shared = seg.SharedFunctionalGroupsSequence[0]
    for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        # One segment: highdicom puts its identification among the shared functional groups.
        identification = group.get("SegmentIdentificationSequence") or shared.SegmentIdentificationSequence
        number = int(identification[0].ReferencedSegmentNumber)
        source = str(group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        masks = out.setdefault(number, {})
        masks[source] = masks.get(source, np.zeros_like(frame)) | frame
    return out


def voxel_ml(seg: pydicom.Dataset) -> float:
    """The volume of one SEG voxel in mL (pixel spacing times the spacing between slices)."""
    pixel = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    thickness = float(pixel.get("SpacingBetweenSlices") or pixel.SliceThickness)
    return float(np.prod([float(v) for v in pixel.PixelSpacing])) * thickness / 1000


def dicom_lab_to_rgb(value: Sequence[int]) -> tuple[float, float, float]:
    """A DICOM-scaled CIELab triplet (0..65535 each) as sRGB in 0..255."""
    lightness = value[0] / 65535 * 100
    a, b = value[1] / 65535 * 255 - 128, value[2] / 65535 * 255 - 128
    fy = (lightness + 16) / 116
    f = np.array([fy + a / 500, fy, fy - b / 200])
    delta = 6 / 29
    xyz = D65 * np.where(f > delta, f**3, 3 * delta**2 * (f - 4 / 29))
    linear = np.clip(XYZ_TO_LINEAR_SRGB @ xyz, 0, 1)
    srgb = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    r, g, bl = (float(c) * 255 for c in srgb)
    return r, g, bl


def segment_colours(seg: pydicom.Dataset) -> dict[int, tuple[float, float, float]]:
    """Segment number -> its display colour (sRGB 0..255) as the SEG recommends it."""
    return {
        int(s.SegmentNumber): dicom_lab_to_rgb([int(v) for v in s.RecommendedDisplayCIELabValue])
        for s in seg.SegmentSequence
    }


def run_driver(
    viewer_url: str, study_uid: str, out: Path, instances: Sequence[int], *, sr: bool = True
) -> Any:
    """Drive OHIF through the study (deploy/viewer/drive.mjs; the SR part only when ``sr``) and return its
    report, after checking the driver succeeded and the page raised no error."""
    command = [shutil.which("node") or "node", str(DRIVER), *([] if sr else ["--no-sr"])]
    run = subprocess.run(
        [*command, viewer_url, study_uid, str(out), *map(str, instances)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=stack.HERE,
        check=False,
    )
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else {}
    print(f"viewer screenshots in {out}; browser timings (s): {report.get('timings')}")
    assert run.returncode == 0, f"driver failed: {report.get('error') or run.stderr[-2000:]}"
    assert not report["pageErrors"], report["pageErrors"]
    shots = sorted(s["instance"] for s in report["slices"])
    assert shots == sorted(instances), (shots, instances)
    return report


def screenshots(report: Any) -> dict[int, Shot]:
    """InstanceNumber -> the driver's screenshot of the viewport on that slice (RGB, float)."""
    return {
        int(s["instance"]): np.asarray(Image.open(s["png"]).convert("RGB"), dtype=np.float64)
        for s in report["slices"]
    }


def registration(shot: Shot, image: npt.NDArray[Any]) -> tuple[float, float, float, float]:
    """The screen placement (scale, x0, y0) of ``image`` when fitted into the viewport and centred, as
    cornerstone does, and the correlation of that placement's grey values with the screenshot.

    Coloured screen pixels (a segment drawn over the image, the viewer's chrome) are left out of the
    correlation: they are not the image's grey values, and on a slice with little brain and a lot of
    segment they pulled a correct placement below the bar (0.77 on a top slice of the demo case)."""
    height, width = shot.shape[:2]
    rows, cols = image.shape
    scale = min(width / cols, height / rows)
    x0, y0 = (width - cols * scale) / 2, (height - rows * scale) / 2
    predicted = to_screen(image.astype(np.float64), shot.shape[:2], scale, x0, y0)
    grey = shot.mean(axis=2)
    uncoloured = (shot.max(axis=2) - shot.min(axis=2)) < COLOUR_MARGIN
    correlation = float(np.corrcoef(predicted[uncoloured], grey[uncoloured])[0, 1])
    return scale, x0, y0, correlation


def to_screen(
    image: npt.NDArray[Any], shape: tuple[int, ...], scale: float, x0: float, y0: float
) -> npt.NDArray[Any]:
    """``image`` resampled (nearest) onto the screenshot's pixel grid; zero outside it."""
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]]
    col = np.floor((xs + 0.5 - x0) / scale).astype(int)
    row = np.floor((ys + 0.5 - y0) / scale).astype(int)
    inside = (col >= 0) & (col < image.shape[1]) & (row >= 0) & (row < image.shape[0])
    out = np.zeros(shape, dtype=image.dtype)
    out[inside] = image[row[inside], col[inside]]
    return out


def colour_pixels(shot: Shot, rgb: Sequence[float]) -> Mask:
    """Screen pixels of segment colour ``rgb``: their chroma (colour minus its grey part, min(R, G, B))
    is at least :data:`COLOUR_MARGIN` long and within :data:`COLOUR_COSINE` of ``rgb``'s own, whatever the
    grey underneath and the opacity the viewer blends the segment with."""
    colour = np.asarray(rgb, dtype=np.float64)
    direction = colour - colour.min()
    direction /= np.linalg.norm(direction)
    chroma = shot - shot.min(axis=2, keepdims=True)
    along = chroma @ direction
    length = np.linalg.norm(chroma, axis=2)
    return np.asarray((along >= COLOUR_MARGIN) & (along >= COLOUR_COSINE * length))


def check_drawn(
    shot: Shot, image: npt.NDArray[Any], mask: Mask, rgb: Sequence[float], label: str, *, cover: float = 0.8
) -> None:
    """The source slice ``image`` is on screen where expected; pixels of colour ``rgb`` lie inside
    ``mask``'s outline (dilated by about a source pixel) and fill at least ``cover`` of it.

    Colour pixels are counted over the image's non-zero part (the skull-stripped head, dilated by
    :data:`HEAD_MARGIN` source pixels): OHIF's own chrome there (the active viewport's border, the
    overlay text in the corners) is light blue, the colour of many a segment.
    """
    scale, x0, y0, correlation = registration(shot, image)
    assert correlation > 0.8, f"the viewport does not show {label} (grey-value correlation {correlation:.2f})"
    expected = to_screen(mask, shot.shape[:2], scale, x0, y0)
    head = ndimage.binary_dilation(
        to_screen(image > 0, shot.shape[:2], scale, x0, y0), iterations=HEAD_MARGIN * max(1, round(scale))
    )
    coloured = colour_pixels(shot, rgb)
    drawn = coloured & head
    near = ndimage.binary_dilation(expected, iterations=max(2, round(scale)))
    inside = (drawn & near).sum() / max(int(drawn.sum()), 1)
    covered = (drawn & expected).sum() / max(int(expected.sum()), 1)
    print(
        f"{label}: {int(mask.sum())} pixels in the SEG, {int(drawn.sum())} screen pixels of its colour "
        f"{tuple(round(c) for c in rgb)} on the head ({int((coloured & ~head).sum())} elsewhere), "
        f"{inside:.1%} of them inside the outline, {covered:.1%} of the segment coloured"
    )
    assert drawn.sum() > 0.5 * expected.sum(), f"the segmentation is not drawn on {label}"
    assert inside > 0.95, f"{label}: only {inside:.1%} of the segment-coloured pixels lie inside the outline"
    assert covered > cover, f"{label}: only {covered:.1%} of the segment is drawn in its colour"


def check_not_drawn(
    shot: Shot, image: npt.NDArray[Any], rgb: Sequence[float], label: str, *, registered: bool
) -> None:
    """No pixel of colour ``rgb`` (and, where ``registered``, the slice's brain on screen)."""
    if registered:
        correlation = registration(shot, image)[3]
        assert correlation > 0.8, f"the viewport does not show {label} (correlation {correlation:.2f})"
    drawn = int(colour_pixels(shot, rgb).sum())
    print(f"{label}: {drawn} screen pixels of the segment colour")
    assert drawn == 0, f"segment colour drawn on {label}"
