"""What a brain without tumour gets back: training cases made tumour-free by mirroring, through the node.

There is no healthy FLAIR in ../shared/data. The nearest thing on training data: each BraTS case of
``--data`` (never the holdout) with the hemisphere that holds less of its tumour mirrored onto the other
about the brain's centre (the mean x of its non-zero voxels; the cases are on an atlas grid, RAS), the
label mirrored the same way. What the tumour had on that hemisphere comes back twice (the table gives
that labelled volume); a case whose tumour crosses the midline keeps much of it and says little. Each
is re-acquired as the acquisitions of ``--acquisitions`` (benchmarks/holdout_node.py's), written as a
FLAIR study and sent to an in-process node serving ``--model`` (brain extraction on); the SEG is read
back onto the case's grid. **False tumour** is what the SEG holds beyond the mirrored label grown by 2
voxels (2 mm), counted in mL and in 3D pieces (26-connected); "within 3 mm of the seam" is the part
of it next to the mirror plane, where the two copies meet (an artefact of the method, not of the
model). A study without a SEG got an SR of 0 mL. The QC cautions the node sent in the SR are listed
(node/qc.py: ``small_tumour`` under 5 mL).

The mirrored brains keep each case's own anatomy, including whatever FLAIR-bright tissue BraTS does not
label as tumour (vessels, caps, small-vessel disease) and the mass effect of the tumour on the kept side;
they are skull-stripped BraTS images, not a scanner's whole head.

Usage: python benchmarks/tumour_free.py --data DIR [--model DIR] [--precision int8]
       [--acquisitions axial_1mm,axial_5mm,degraded] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, markdown_table, save_result
from holdout_node import send_and_read, serving

#: Voxels (1 mm on the case grid) by which the mirrored label is grown before tumour beyond it is false.
LABEL_MARGIN_VOXELS = 2
#: Distance (mm) from the mirror plane within which false tumour is reported as at the seam.
SEAM_MM = 3


def mirror_x(array: npt.NDArray[Any], centre: int, keep_high: bool) -> npt.NDArray[Any]:
    """``array`` (X, Y, Z) with the side of x index ``centre`` that ``keep_high`` names kept and mirrored
    onto the other (zero where the mirror falls outside the grid)."""
    out = np.zeros_like(array)
    n = array.shape[0]
    for i in range(n):
        source = i if (i >= centre) == keep_high else 2 * centre - i
        if 0 <= source < n:
            out[i] = array[source]
    return out


def tumour_free(case: Any) -> tuple[Any, int, float]:
    """``case`` with its less-affected hemisphere mirrored onto the other (FLAIR and label); the mirror
    plane's x index and the share of the labelled tumour on the kept hemisphere."""
    flair, label = case.images["FLAIR"], case.label
    centre = round(float(np.nonzero(flair > 0)[0].mean()))
    tumour_x = np.nonzero(label > 0)[0]
    high_share = float((tumour_x > centre).mean()) if tumour_x.size else 0.0
    keep_high = high_share < 0.5
    mirrored = dataclasses.replace(
        case,
        case_id=f"{case.case_id}-mirrored",
        images={"FLAIR": mirror_x(flair, centre, keep_high)},
        label=mirror_x(label, centre, keep_high),
    )
    return mirrored, centre, high_share if keep_high else 1.0 - high_share


def false_tumour(
    predicted: npt.NDArray[np.bool_], label: npt.NDArray[np.bool_], centre: int
) -> tuple[float, int, float]:
    """On the case grid (1 mm voxels): mL of ``predicted`` beyond ``label`` grown by
    :data:`LABEL_MARGIN_VOXELS`, its 3D pieces, and the mL of it within :data:`SEAM_MM` of the mirror
    plane."""
    grown = ndimage.binary_dilation(label, np.ones((3, 3, 3), bool), iterations=LABEL_MARGIN_VOXELS)
    beyond = predicted & ~grown
    pieces = int(ndimage.label(beyond, np.ones((3, 3, 3), bool))[1])
    x = np.nonzero(beyond)[0]
    return float(beyond.sum()) / 1000.0, pieces, float((np.abs(x - centre) <= SEAM_MM).sum()) / 1000.0


def run(data: Path, model: Path, precision: str, acquisitions: list[str]) -> list[dict[str, Any]]:
    """One row per (case, acquisition)."""
    from converters.nifti import list_cases

    refs = list_cases(data, require_labels=True)  # refuses the holdout: this is no final evaluation
    rows = []
    with serving(model, precision) as (node, receiver, workdir):
        for ref in refs:
            mirrored, centre, kept = tumour_free(ref.load())
            labelled_ml = float(np.count_nonzero(mirrored.label)) / 1000.0
            for name in acquisitions:
                sent = send_and_read(node, receiver, mirrored, name, workdir)
                row: dict[str, Any] = {
                    "case": ref.case_id,
                    "acquisition": name,
                    "tumour_on_kept_side_percent": round(100 * kept, 2),
                    "labelled_ml": round(labelled_ml, 2),
                }
                if isinstance(sent, str):
                    no_seg = sent.endswith("job done without a SEG")
                    row.update({"seg": False, "false_ml": 0.0 if no_seg else None, "pieces": 0, "note": sent})
                else:
                    false_ml, pieces, seam_ml = false_tumour(sent.on_case, mirrored.label > 0, centre)
                    qc = ((sent.job.result or {}) if sent.job is not None else {}).get("qc") or {}
                    row.update({
                        "seg": True, "called_ml": round(float(sent.on_case.sum()) / 1000.0, 2),
                        "false_ml": round(false_ml, 2), "pieces": pieces, "seam_ml": round(seam_ml, 2),
                        "cautions": [c["name"] for c in qc.get("cautions", [])],
                        **({"held": sent.held} if sent.held else {}),
                    })  # fmt: skip
                print(f"{ref.case_id} {name}: {row}", flush=True)
                rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table."""
    return markdown_table(
        ["case", "acquisition", "tumour on the kept side", "labelled tumour (mL)", "SEG",
         "false tumour (mL)", "pieces", "of it at the seam (mL)", "QC cautions in the SR"],
        [[r["case"], r["acquisition"], f"{r['tumour_on_kept_side_percent']:.2f} %", f"{r['labelled_ml']:.2f}",
          "yes" if r["seg"] else ("no (SR 0 mL)" if r["false_ml"] == 0.0 else f"no ({r.get('note', '')})"),
          "-" if r["false_ml"] is None else f"{r['false_ml']:.2f}", r["pieces"],
          f"{r['seam_ml']:.2f}" if "seam_ml" in r else "-", ", ".join(r.get("cautions", [])) or "-"]
         for r in rows],
    )  # fmt: skip


def main() -> int:
    """Run the measurement and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=REPO / "models" / "default")
    parser.add_argument("--precision", choices=["fp32", "int8"], default="int8")
    parser.add_argument("--acquisitions", default="axial_1mm,axial_5mm,degraded")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = run(args.data, args.model, args.precision, args.acquisitions.split(","))
    markdown = table(rows)
    print(markdown)
    print(f"results in {save_result('tumour_free', {'rows': rows, 'markdown': markdown}, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
