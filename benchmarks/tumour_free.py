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

``--figure PNG`` draws, for the four nearly tumour-free studies (at most :data:`NEARLY_FREE_PERCENT` of
the tumour on the kept side) with the most false tumour, the axial slice through the largest false
piece: the mirrored FLAIR, the false tumour in red, the mirrored label in blue.

``--folds`` (cross-validation, as benchmarks/holdout_node.py's) sends each case through its own fold's
model only, the one that did not train on it; given again, another recipe's folds.

Usage: python benchmarks/tumour_free.py --data DIR [--model DIR] [--precision int8]
       [--acquisitions axial_1mm,axial_5mm,degraded] [--out DIR] [--figure PNG]
       python benchmarks/tumour_free.py --data DIR --folds runs/a-f0/export ... [--folds runs/b-f0/export ..]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, markdown_table, save_result
from holdout_node import fold_cases, folds_label, send_and_read, serving

from trainer.false_tumour import beyond_label, tumour_free

#: Distance (mm) from the mirror plane within which false tumour is reported as at the seam.
SEAM_MM = 3
#: A mirrored case whose kept side held at most this share of its tumour (%) counts as nearly tumour-free.
NEARLY_FREE_PERCENT = 1.2


def false_tumour(
    predicted: npt.NDArray[np.bool_], label: npt.NDArray[np.bool_], centre: int
) -> tuple[float, int, float]:
    """On the case grid (1 mm voxels): mL of ``predicted`` beyond ``label`` grown by
    :data:`LABEL_MARGIN_VOXELS`, its 3D pieces, and the mL of it within :data:`SEAM_MM` of the mirror
    plane."""
    beyond = beyond_label(predicted, label)
    pieces = int(ndimage.label(beyond, np.ones((3, 3, 3), bool))[1])
    x = np.nonzero(beyond)[0]
    return float(beyond.sum()) / 1000.0, pieces, float((np.abs(x - centre) <= SEAM_MM).sum()) / 1000.0


def largest_piece_slice(
    image: npt.NDArray[Any], predicted: npt.NDArray[np.bool_], label: npt.NDArray[np.bool_]
) -> dict[str, Any] | None:
    """The axial slice (case grid, X, Y, Z) through the centre of the largest false piece: image, false
    tumour and label on it, the piece's mL and slice index; None without false tumour."""
    beyond = beyond_label(predicted, label)
    pieces, count = ndimage.label(beyond, np.ones((3, 3, 3), bool))
    if count == 0:
        return None
    sizes = np.bincount(pieces.ravel())[1:]
    largest = int(np.argmax(sizes)) + 1
    z = round(float(np.nonzero(pieces == largest)[2].mean()))
    return {
        "image": np.asarray(image[:, :, z]), "false": beyond[:, :, z], "label": np.asarray(label[:, :, z]),
        "piece_ml": float(sizes[largest - 1]) / 1000.0, "z": z,
    }  # fmt: skip


def _radiological(axial: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """An axial RAS slice (X right, Y anterior) as shown on screen: rows from anterior down, the
    patient's right on the left."""
    return np.flipud(np.fliplr(np.asarray(axial).T))


def draw(slices: list[dict[str, Any]], out: Path) -> None:
    """The slices of :func:`largest_piece_slice` side by side (radiological view: the patient's right on
    the left, anterior up), each titled with its study and piece."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(slices), figsize=(4 * len(slices), 4.6), squeeze=False)
    for ax, item in zip(axes[0], slices, strict=True):
        image = _radiological(item["image"])
        high = float(np.percentile(image[image > 0], 99.5)) if np.any(image > 0) else 1.0
        ax.imshow(np.clip(image / high, 0, 1), cmap="gray")
        for key, colours, alpha in (("label", "winter", 0.6), ("false", "autumn", 0.85)):
            mask = _radiological(item[key])
            ax.imshow(np.ma.masked_where(~mask, mask), cmap=colours, alpha=alpha)
        title = f"{item['study']}\nlargest false piece {item['piece_ml']:.2f} mL (z {item['z']})"
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle("Brains made tumour-free by mirroring, through the node: false tumour red, label blue")
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 0.92))  # room for the title above the panels' own
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)


def run(
    data: Path,
    model: Path,
    precision: str,
    acquisitions: list[str],
    slices: list[dict[str, Any]] | None = None,
    views: int = 1,
    only: set[str] | None = None,
) -> list[dict[str, Any]]:
    """One row per (case, acquisition) of ``data``'s cases (those named in ``only`` when given), the
    node's network along ``views`` 1 or 3 axes; with ``slices``, each nearly tumour-free study's
    :func:`largest_piece_slice` (and its row's false mL) appended to it."""
    from converters.nifti import list_cases

    refs = list_cases(data, require_labels=True)  # refuses the holdout: this is no final evaluation
    refs = [r for r in refs if only is None or r.case_id in only]
    rows = []
    with serving(model, precision, views=views) as (node, receiver, workdir):
        for ref in refs:
            mirrored, centre, kept = tumour_free(ref.load())
            assert mirrored.label is not None  # list_cases(require_labels=True)
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
                    if slices is not None and 100 * kept <= NEARLY_FREE_PERCENT:
                        image, label = mirrored.images["FLAIR"], mirrored.label > 0
                        piece = largest_piece_slice(image, sent.on_case, label)
                        if piece is not None:
                            slices.append({**piece, "study": f"{ref.case_id} {name}", "false_ml": false_ml})
                    qc = ((sent.job.result or {}) if sent.job is not None else {}).get("qc") or {}
                    row.update({
                        "seg": True, "called_ml": round(float(sent.on_case.sum()) / 1000.0, 2),
                        "false_ml": round(false_ml, 2), "pieces": pieces, "seam_ml": round(seam_ml, 2),
                        "cautions": [c["name"] for c in qc.get("cautions", [])],
                        **({"held": sent.held} if sent.held else {}),
                    })  # fmt: skip
                print(f"views={views} {ref.case_id} {name}: {row}", flush=True)
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


def summary(rows: list[dict[str, Any]]) -> str:
    """How many studies got a SEG and the false tumour summed over them, for every study and for the
    nearly tumour-free ones (at most :data:`NEARLY_FREE_PERCENT` of the tumour on the kept side)."""

    def counted(chosen: list[dict[str, Any]]) -> tuple[int, float]:
        return sum(1 for r in chosen if r["seg"]), sum(r["false_ml"] or 0.0 for r in chosen)

    seg, false_ml = counted(rows)
    free = [r for r in rows if r["tumour_on_kept_side_percent"] <= NEARLY_FREE_PERCENT]
    free_seg, free_ml = counted(free)
    return (
        f"{seg} of {len(rows)} studies sent a SEG; false tumour summed over them all: {false_ml:.2f} mL; "
        f"nearly tumour-free: {free_seg} of {len(free)} sent a SEG, {free_ml:.2f} mL"
    )


def run_folds(
    data: Path,
    models: list[Path],
    precision: str,
    acquisitions: list[str],
    slices: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Cross-validation: each fold's export (:func:`holdout_node.fold_cases`) on its own validation cases
    under ``data``, the rows pooled, each naming its ``fold``."""
    rows = []
    for model, val in zip(models, fold_cases(models, data), strict=True):
        rows += [
            {"fold": str(model), **r}
            for r in run(data, model, precision, acquisitions, slices, only=set(val))
        ]
    return rows


def main() -> int:
    """Run the measurement and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    models = parser.add_mutually_exclusive_group()
    models.add_argument("--model", type=Path, default=REPO / "models" / "default")
    models.add_argument(
        "--folds", type=Path, nargs="+", action="append", metavar="MODEL",
        help="one recipe's cross-validation folds, each export on its validation cases under --data "
        "(one network view); given again for another recipe",
    )  # fmt: skip
    parser.add_argument("--precision", choices=["fp32", "int8"], default="int8")
    parser.add_argument("--acquisitions", default="axial_1mm,axial_5mm,degraded")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--figure", type=Path, default=None, help="a PNG of the largest false pieces")
    parser.add_argument(
        "--views", action="append", type=int, choices=[1, 3],
        help="3: [inference] three_views names every task (default 1: none); given twice, the node is "
        "served once with each",
    )  # fmt: skip
    args = parser.parse_args()
    acquisitions = args.acquisitions.split(",")
    if args.folds and args.views:
        parser.error("--folds runs each fold's network along one view; leave out --views")
    configurations = [f"views_{views}" for views in args.views or [1]]
    if args.folds:
        configurations = [folds_label(group) for group in args.folds]
    results = {}
    for index, name in enumerate(configurations):
        slices: list[dict[str, Any]] | None = [] if args.figure else None
        if args.folds:
            rows = run_folds(args.data, args.folds[index], args.precision, acquisitions, slices)
        else:
            views = (args.views or [1])[index]
            rows = run(args.data, args.model, args.precision, acquisitions, slices, views)
        markdown = table(rows)
        print(f"\n{name}\n\n{markdown}\n\n{summary(rows)}")
        if args.figure and slices:
            suffix = f"recipe{index}" if args.folds else name.replace("_", "")  # views1, views3
            figure = (
                args.figure.with_stem(f"{args.figure.stem}-{suffix}")
                if len(configurations) > 1
                else args.figure
            )
            draw(sorted(slices, key=lambda item: -item["false_ml"])[:4], figure)
            print(f"figure {figure}")
        results[name] = {"rows": rows, "markdown": markdown, "summary": summary(rows)}
    single = results[next(iter(results))] if len(results) == 1 else results
    print(f"results in {save_result('tumour_free', single, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
