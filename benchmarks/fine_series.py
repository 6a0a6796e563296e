"""Series finer than the model's 1 mm grid through a served node: time and peak memory of the job.

Scanners reconstruct 3D series finer than they acquire them (a 3D FLAIR at 0.5 mm isotropic, GE's
ZIP512 at 0.47 mm pixels) and issue 15 names pixel spacings down to 0.4 mm: such a series holds 4 to
8 times the voxels of a 1 mm one, and every step of the node that works on the series' own grid (the
volume itself, the brain mask, the prediction put back onto its frames, the checks, the preview)
grows with it. Each row re-acquires BraTS2021_00005's FLAIR (a training case, never the holdout) with
:func:`converters.reslice.reslice_case` and sends it, alone, to ``segnode serve`` in its own process
(shipped models, early analysis on, DCMTK storescu); the node's resident set is sampled every 20 ms
(benchmarks/node_memory.py's sampler).

Usage: python benchmarks/fine_series.py [--case DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS_DIR, SHARED_DATA, markdown_table, save_result
from ingest import send
from node_memory import JOB_TARGET_MIB, Sampler

#: Name -> (orientation, pixel spacing mm, slice thickness mm).
PLANS = {
    "axial, 1 mm (the model's grid)": ("axial", 1.0, 1.0),
    "axial, 0.4 mm pixels, 1 mm slices": ("axial", 0.4, 1.0),
    "sagittal 3D, 0.5 mm isotropic": ("sagittal", 0.5, 0.5),
}
DEFAULT_CASE = SHARED_DATA / "train" / "brats" / "BraTS2021_00005"


def series_files(case_dir: Path, name: str, cache: Path) -> tuple[list[Path], int]:
    """The case's FLAIR re-acquired as ``PLANS[name]``, written once under ``cache``; files, voxels."""
    from converters.dicom_writer import write_volumes
    from converters.nifti import load_case
    from converters.reslice import SeriesPlan, reslice_case

    orientation, pixel, thickness = PLANS[name]
    out = cache / f"fine-{case_dir.name}-{orientation}-{pixel}-{thickness}"
    done = out / ".complete"
    if not done.is_file():
        shutil.rmtree(out, ignore_errors=True)
        plan = SeriesPlan(orientation, pixel_spacing_mm=pixel, slice_thickness_mm=thickness)
        volumes = reslice_case(load_case(case_dir), plan, ["FLAIR"]).volumes
        write_volumes(volumes, out, descriptions={"FLAIR": f"{plan.description} FLAIR {pixel} mm"})
        done.write_text(str(int(volumes["FLAIR"].array.size)))
    return sorted(out.rglob("*.dcm")), int(done.read_text())


def run_one(files: list[Path], work: Path) -> dict[str, Any]:
    """One series through a fresh served node: seconds to the SR, peak RSS per phase, job stages."""
    from node.config import Destination
    from tests.helpers.node import CatchingSCP
    from tests.helpers.ports import free_port
    from tests.helpers.served import ServedNode, node_toml
    from tests.helpers.waiting import wait_until

    work.mkdir(parents=True)
    catcher = CatchingSCP().start(free_port())
    port = free_port()
    config = node_toml(work, port, f"sqlite:///{work / 'node.db'}",
                       [Destination("pacs", "CATCHER", "127.0.0.1", catcher.port)], idle=1.0, bootstrap=True)
    node = ServedNode(config, work / "home", work / "node.log", port).start(timeout=300)
    assert node.proc is not None
    sampler = Sampler(node.proc.pid).start()
    try:
        sampler.phase("idle")
        time.sleep(2.0)
        sampler.phase("receive")
        start = time.perf_counter()
        receive_s = send(files, port, "SEGNODE", 1)
        sampler.phase("job")
        wait_until(lambda: any(d.Modality == "SR" for d in catcher.received), 600, "the SR")
        total_s = time.perf_counter() - start
    finally:
        sampler.stop()
        node.stop()
        catcher.stop()
    [job_file] = list(work.rglob("job.json"))
    job = json.loads(job_file.read_text())
    return {
        "receive_s": receive_s,
        "to_sr_s": total_s,
        "peak_receive_mib": sampler.peaks.get("receive", 0.0),
        "peak_job_mib": sampler.peaks.get("job", 0.0),
        "stages": job["stages"],
        "brain_volume_ml": job.get("brain_volume_ml"),
        "tumour_volume_ml": job.get("tumour_volume_ml"),
        "seg": any(d.Modality == "SEG" for d in catcher.received),
    }


def tables(rows: list[dict[str, Any]]) -> str:
    """Markdown: one row per series, then the target."""
    stage_names = ("load", "brain", "preprocess", "inference", "qc", "seg")
    table = markdown_table(
        ["series", "voxels (M)", "files", "first C-STORE to SR (s)", *(f"{s} (s)" for s in stage_names),
         "peak RSS of the job (MiB)", "brain (mL)", "tumour (mL)"],
        [[r["series"], f"{r['voxels'] / 1e6:.1f}", r["files"], f"{r['to_sr_s']:.1f}",
          *(f"{r['stages'].get(s, 0.0):.2f}" for s in stage_names), f"{r['peak_job_mib']:.0f}",
          f"{r['brain_volume_ml']:.0f}", f"{r['tumour_volume_ml']:.1f}"] for r in rows],
    )  # fmt: skip
    worst = max(r["peak_job_mib"] for r in rows)
    goal = markdown_table(["target", "measured", "met"], [[
        f"peak RSS of a job <= {JOB_TARGET_MIB:.0f} MiB (issue 15), every series above", f"{worst:.0f} MiB",
        "yes" if worst <= JOB_TARGET_MIB else "NO",
    ]])  # fmt: skip
    return table + "\n\n" + goal


def main() -> int:
    """Run every plan; print and save the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", type=Path, default=DEFAULT_CASE)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    if not args.case.is_dir():
        print(f"error: no case at {args.case}")
        return 2
    work = Path(tempfile.mkdtemp(prefix="segnode-bench-fine-"))
    rows = []
    try:
        for n, name in enumerate(PLANS):
            files, voxels = series_files(args.case, name, RESULTS_DIR)
            result = run_one(files, work / str(n))
            rows.append({"series": name, "voxels": voxels, "files": len(files), **result})
            print(f"{name}: {result['to_sr_s']:.1f} s, peak {result['peak_job_mib']:.0f} MiB", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result_data = {"case": args.case.name, "rows": rows, "markdown": tables(rows)}
    print(result_data["markdown"])
    print(f"saved {save_result('fine_series', result_data, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
