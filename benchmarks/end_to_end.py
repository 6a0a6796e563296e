"""End-to-end latency of the node: one four-series 155-slice MR study, C-STORE start to SEG received.

Runs the same path as ``segnode demo`` (fresh SQLite database and spool, node on a free loopback
port, a receiving SCP) on a BraTS case from the training data (../shared/data/train; the shipped demo
case when that is absent), sending with DCMTK's storescu as the PACS would (the node's own SCU when
DCMTK is not installed). Prints a table per stage and checks the targets of issue 5 on this machine:
under 15 s in all, inference under 3 s.

Usage: python benchmarks/end_to_end.py [--model DIR] [--case DIR] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TOTAL_TARGET_S = 15.0
INFERENCE_TARGET_S = 3.0


def main() -> int:
    """Run the benchmark; exit status 0 when both targets are met."""
    from rich.console import Console
    from rich.table import Table

    from node.demo import DEFAULT_CASE, DEFAULT_MODEL, run_demo

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--case", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    console = Console()
    case = args.case
    if case is None:
        train = REPO.parent / "shared" / "data" / "train" / "brats" / "BraTS2021_00005"
        case = train if train.is_dir() else DEFAULT_CASE
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="segnode-bench-"))
    storescu = shutil.which("storescu")
    from node.exceptions import NodeError

    try:
        report = run_demo(workdir, model_dir=args.model, case_dir=case, console=console, storescu=storescu)
    except NodeError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        return 2
    table = Table(
        title=f"end to end: {report.case_id}, model {report.model_label}, sender "
        f"{'DCMTK storescu' if storescu else 'pynetdicom'}"
    )
    table.add_column("Stage")
    table.add_column("Seconds", justify="right")
    for name, seconds in report.stages.items():
        table.add_row(name, f"{seconds:.2f}")
    table.add_row("[bold]total: C-STORE start to SEG received[/]", f"[bold]{report.total:.2f}[/]")
    console.print(table)
    inference = report.stages.get("job: inference", float("nan"))
    ok = report.total < TOTAL_TARGET_S and inference < INFERENCE_TARGET_S
    console.print(
        f"total {report.total:.2f} s (target < {TOTAL_TARGET_S:.0f} s), inference {inference:.2f} s "
        f"(target < {INFERENCE_TARGET_S:.0f} s): {'[green]met[/]' if ok else '[red]NOT met[/]'}; "
        f"Dice {report.dice:.4f}"
    )
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
