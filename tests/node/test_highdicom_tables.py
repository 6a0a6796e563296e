"""highdicom reads the node's cut tables of the standard (node/highdicom_tables.py): the shipped file is
the cut of the installed highdicom's own tables, a node process holds far less memory for them, and a
SEG and an SR built on them (single-frame and Enhanced MR sources, the four-series card's three
segments, a report without a SEG) are element for element those built on highdicom's full tables."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from typing import Any

from node.highdicom_tables import TABLES_FILE, _as_file, cut_tables
from tests.helpers.peers import REPO, require_shared

#: Builds the outputs in a fresh interpreter, with the cut tables ("cut") or highdicom's ("full"),
#: and prints each output's elements without UIDs, dates and times (which differ every build).
_BUILD = r"""
import io, json, sys
from pathlib import Path
import numpy as np, pydicom
from highdicom.legacy import LegacyConvertedEnhancedMRImage
from pydicom.uid import generate_uid
from node.memory import memory_status_mib
from node.seg import build_seg, warm_up
from node.sr import build_sr
from highdicom import _standard_utils as tables

before = memory_status_mib()["RssAnon"]
if sys.argv[1] == "cut":
    warm_up()
else:
    for getter in (tables.get_sop_class_iod_map, tables.get_iod_module_map, tables.get_module_attribute_map):
        getter()
held = memory_status_mib()["RssAnon"] - before
series = [pydicom.dcmread(p) for p in sorted(Path(sys.argv[2]).iterdir())]
converted = LegacyConvertedEnhancedMRImage(series, series_instance_uid=generate_uid(), series_number=9,
                                           sop_instance_uid=generate_uid(), instance_number=1)
buffer = io.BytesIO()
converted.save_as(buffer)
enhanced = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
wt = json.loads(Path(sys.argv[3]).read_text())
regions = json.loads(Path(sys.argv[4]).read_text())

def summary(ds):
    out = []
    for e in ds.iterall():
        if e.VR in ("UI", "DA", "TM", "DT", "SQ") or e.tag == 0x7FE00010:
            continue
        out.append(f"{e.tag} {e.VR} {e.value!r}"[:200])
    return sorted(out)

labels = np.zeros((len(series), int(series[0].Rows), int(series[0].Columns)), np.uint8)
labels[3:9, 40:80, 50:90] = 1
labels[5:7, 50:60, 60:70] = 2
labels[5, 52:55, 62:65] = 3
outputs = {}
seg = build_seg(series, (labels > 0).astype(np.uint8), wt, software_version="t")
outputs["seg"] = summary(seg)
outputs["sr"] = summary(build_sr(seg, series, [1.0], wt, brain_volume_ml=1200.0, tumour_share_percent=1.0))
outputs["sr-none"] = summary(build_sr(None, series, [0.0], wt))
outputs["seg-regions"] = summary(build_seg(series, labels, regions, software_version="t"))
whole = (labels > 0).astype(np.uint8)
outputs["seg-enhanced"] = summary(build_seg([enhanced], whole, wt, software_version="t"))
print(json.dumps({"held_mib": held, "modules": len(tables.get_module_attribute_map()), "outputs": outputs}))
"""


def _build(which: str) -> dict[str, Any]:
    series = require_shared("dicom", "siemens_t1_fl2d_sag_healthy")
    cards = [
        REPO / "models" / "default" / "model.json",
        REPO / "models" / "candidates" / "segnode-brats-regions-1.2.0" / "model.json",
    ]
    done = subprocess.run(
        [sys.executable, "-c", _BUILD, which, str(series), *map(str, cards)],
        capture_output=True, text=True, timeout=300, cwd=REPO, check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_the_shipped_file_is_the_cut_of_the_installed_highdicoms_tables() -> None:
    with gzip.open(TABLES_FILE, "rt", encoding="utf-8") as fh:
        shipped = json.load(fh)
    assert shipped == _as_file(cut_tables()), "run: python -m node.highdicom_tables"


def test_outputs_on_the_cut_tables_are_those_on_the_full_tables_with_far_less_memory() -> None:
    cut, full = _build("cut"), _build("full")
    assert cut["modules"] < 100 < full["modules"]
    assert cut["outputs"] == full["outputs"]
    assert cut["held_mib"] < full["held_mib"] - 40, (cut["held_mib"], full["held_mib"])
