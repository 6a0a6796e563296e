"""SEG segment colours as a viewer decodes them: Recommended Display CIELab Value (PS3.3 C.8.20.2,
scaled as in C.10.7.1.1) converted back to sRGB with the standard formulas, independently of highdicom
(tests/helpers/viewer.py, where the OHIF tests find the colour they look for on screen).

Found in OHIF (tests/viewer/test_ohif.py): the node passed RGB in 0..1 to highdicom's
``CIELabColor.from_rgb``, which takes 0..255, so every segment was written near-black (L* 0.1) and
OHIF drew the tumour as a dark outline on a grey fill.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from node.preview import COLOURS
from node.seg import segment_descriptions
from tests.helpers.peers import REPO
from tests.helpers.viewer import dicom_lab_to_rgb


def _card(values: list[int]) -> dict[str, object]:
    card = json.loads((REPO / "models" / "default" / "model.json").read_text())
    template = card["labels"][0]
    card["labels"] = [{**template, "value": v, "name": f"label {v}"} for v in values]
    return card


@pytest.mark.parametrize("value", [1, 2, 3])
def test_segment_colour_decodes_to_the_preview_colour(value: int) -> None:
    [segment] = segment_descriptions(_card([value]))
    lab = [int(v) for v in segment.RecommendedDisplayCIELabValue]
    rgb = dicom_lab_to_rgb(lab)
    assert lab[0] / 65535 * 100 > 40, f"segment {value} is nearly black: L*={lab[0] / 65535 * 100:.1f}"
    assert np.allclose(rgb, COLOURS[value], atol=3), (rgb, COLOURS[value])


def test_shipped_card_segment_is_red_and_unknown_label_yellow() -> None:
    card = json.loads((REPO / "models" / "default" / "model.json").read_text())
    [tumour] = segment_descriptions(card)
    r, g, b = dicom_lab_to_rgb([int(v) for v in tumour.RecommendedDisplayCIELabValue])
    assert r > 240 and g < 60 and b < 60, (r, g, b)
    [other] = segment_descriptions(_card([7]))
    r, g, b = dicom_lab_to_rgb([int(v) for v in other.RecommendedDisplayCIELabValue])
    assert r > 240 and 200 < g < 235 and b < 20, (r, g, b)
