"""PNG preview of a result: a montage of the slices with most tumour, outline drawn over the image."""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from converters.masks import surface

logger = logging.getLogger(__name__)

#: Outline colour per label value (RGB); labels beyond the table are drawn yellow.
COLOURS: dict[int, tuple[int, int, int]] = {1: (255, 40, 40), 2: (40, 220, 40), 3: (60, 120, 255)}


def _to_uint8(image: npt.NDArray[Any], lo: float, hi: float) -> npt.NDArray[np.uint8]:
    scaled = (np.asarray(image, np.float32) - lo) / max(hi - lo, 1e-6)
    return np.asarray(np.clip(scaled * 255.0, 0, 255), dtype=np.uint8)


#: Voxels the preview's grey window is taken from at most: a percentile copies what it is given.
WINDOW_SAMPLE_VOXELS = 8_000_000


def _sample(image: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """``image`` itself, or every n-th voxel of it when it holds more than :data:`WINDOW_SAMPLE_VOXELS`
    (a 0.4 mm series of 120 M voxels would be copied whole, 480 MiB, for two grey levels)."""
    step = -(-image.size // WINDOW_SAMPLE_VOXELS)
    return image if step <= 1 else np.asarray(image).reshape(-1)[::step]


def tile_size(shape: tuple[int, int], pixel_spacing: tuple[float, float], tile: int) -> tuple[int, int]:
    """(width, height) in pixels of a slice of ``shape`` (rows, columns) and ``pixel_spacing`` (mm between
    rows, between columns) drawn at its true aspect ratio inside a ``tile`` x ``tile`` square."""
    height_mm, width_mm = shape[0] * pixel_spacing[0], shape[1] * pixel_spacing[1]
    scale = tile / max(height_mm, width_mm)
    return max(1, min(tile, round(width_mm * scale))), max(1, min(tile, round(height_mm * scale)))


def _scaled(plane: npt.NDArray[np.uint8], size: tuple[int, int], shrink: bool) -> Image.Image:
    """``plane`` at ``size``: by area where any axis shrinks (every source pixel counts), else nearest."""
    filter_ = Image.Resampling.BOX if shrink else Image.Resampling.NEAREST
    return Image.fromarray(plane).resize(size, filter_)


def render_tile(
    grey: npt.NDArray[np.uint8],
    plane: npt.NDArray[Any],
    size: tuple[int, int],
    tile: int,
) -> Image.Image:
    """One ``tile`` x ``tile`` tile: ``grey`` scaled to ``size`` (width, height) and centred, each label's
    outline in its colour. The outline is found on the source grid; a tile pixel is coloured when any
    source outline pixel falls in it, so that shrinking a 512-pixel slice loses no outline or small
    lesion (nearest sampling would keep every other row and column only)."""
    shrink = size[0] < grey.shape[1] or size[1] < grey.shape[0]
    rgb = np.stack([np.asarray(_scaled(grey, size, shrink))] * 3, axis=-1)
    for value in [int(v) for v in np.unique(plane) if v > 0]:
        edge = surface(plane == value)
        covered = np.asarray(_scaled(edge.astype(np.uint8) * 255, size, shrink)) > 0
        rgb[covered] = COLOURS.get(value, (255, 220, 0))
    out = Image.new("RGB", (tile, tile))
    out.paste(Image.fromarray(rgb), ((tile - size[0]) // 2, (tile - size[1]) // 2))
    return out


def render_preview(
    image: npt.NDArray[Any],
    labels: npt.NDArray[Any],
    *,
    count: int = 6,
    columns: int = 3,
    tile: int = 256,
    pixel_spacing: tuple[float, float] = (1.0, 1.0),
) -> bytes:
    """PNG bytes: the ``count`` slices (first axis) with most tumour, outline of each label over the image.

    Parameters
    ----------
    image, labels:
        Arrays (slices, rows, columns) on the same grid; ``labels`` 0 is background.
    pixel_spacing:
        mm between rows and between columns: each slice keeps its true aspect ratio in its tile.
    """
    if image.shape != labels.shape:
        raise ValueError(f"preview: image shape {image.shape} differs from label shape {labels.shape}")
    area = (labels > 0).reshape(labels.shape[0], -1).sum(axis=1)
    if area.max() > 0:
        order = [int(i) for i in np.argsort(-area, kind="stable")[:count] if area[i] > 0]
    else:
        order = [labels.shape[0] // 2]
    order.sort()
    lo, hi = (float(v) for v in np.percentile(_sample(image), [1.0, 99.5]))
    size = tile_size((image.shape[1], image.shape[2]), pixel_spacing, tile)
    tiles = [render_tile(_to_uint8(image[index], lo, hi), labels[index], size, tile) for index in order]
    rows = (len(tiles) + columns - 1) // columns
    cols = min(columns, len(tiles))
    sheet = Image.new("RGB", (cols * tile, rows * tile))
    for n, im in enumerate(tiles):
        sheet.paste(im, ((n % columns) * tile, (n // columns) * tile))
    out = io.BytesIO()
    sheet.save(out, format="PNG")
    return out.getvalue()
