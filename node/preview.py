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


def render_preview(
    image: npt.NDArray[Any],
    labels: npt.NDArray[Any],
    *,
    count: int = 6,
    columns: int = 3,
    tile: int = 256,
) -> bytes:
    """PNG bytes: the ``count`` slices (first axis) with most tumour, outline of each label over the image.

    Parameters
    ----------
    image, labels:
        Arrays (slices, rows, columns) on the same grid; ``labels`` 0 is background.
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
    tiles = []
    for index in order:
        grey = _to_uint8(image[index], lo, hi)
        rgb = np.stack([grey] * 3, axis=-1)
        plane = labels[index]
        for value in [int(v) for v in np.unique(plane) if v > 0]:
            mask = plane == value
            edge = surface(mask)
            rgb[edge] = COLOURS.get(value, (255, 220, 0))
        tiles.append(Image.fromarray(rgb).resize((tile, tile), Image.Resampling.NEAREST))
    rows = (len(tiles) + columns - 1) // columns
    cols = min(columns, len(tiles))
    sheet = Image.new("RGB", (cols * tile, rows * tile))
    for n, im in enumerate(tiles):
        sheet.paste(im, ((n % columns) * tile, (n // columns) * tile))
    out = io.BytesIO()
    sheet.save(out, format="PNG")
    return out.getvalue()
