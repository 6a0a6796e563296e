"""The node's resident memory as an operator runs it: ``segnode serve`` in its own process, the shipped
models bootstrapped, three studies received and segmented one after the other.

The resident set of the node's process (``/proc/PID/status``, sampled every 20 ms) is recorded per
phase: started and idle (models compiled, highdicom tables loaded); receiving a study over one
association; its job (brain extraction, whole-tumour model, SEG and SR sent); idle after the job;
then a second study over one association (what a node that has already run a job holds while the
next study arrives: the first study's receive starts from a node that never ran one), its job and
idle; then the last study over four associations, its job, idle after it. Issue 17 bounds the node's
peak while receiving (<= 500 MiB); issue 16 the peak of a job (<= 1.5 GiB, four-series studies:
benchmarks/registration.py). benchmarks/ingest.py runs its nodes inside the benchmark's own process,
one after another, so its resident set also counts the benchmark and every earlier node; this one does
not.

Usage: python benchmarks/node_memory.py [--cases A,B] [--out DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS_DIR, SHARED_DATA, markdown_table, save_result
from ingest import send, study_files

#: Issue 17's bound while receiving, issue 16's for a job.
RECEIVE_TARGET_MIB = 500.0
JOB_TARGET_MIB = 1.5 * 1024
DEFAULT_CASES = ("BraTS2021_00005", "BraTS2021_00002", "BraTS2021_00006")


class Sampler:
    """Samples a process's resident set every ``every_s``; :meth:`phase` starts a new named phase.

    Sampling can miss a peak shorter than ``every_s``, so each phase also keeps the kernel's own
    high-water mark (``VmHWM``), reset at the phase's start by writing 5 to ``/proc/PID/clear_refs``
    (Linux 4.0+); where the reset is refused, ``hwm`` stays empty and the table says so."""

    def __init__(self, pid: int, every_s: float = 0.02) -> None:
        self.pid = pid
        self.every_s = every_s
        self.peaks: dict[str, float] = {}
        #: At each phase's peak: the resident set's file-backed part (mapped model weights, libraries).
        self.file_backed: dict[str, float] = {}
        #: The kernel's peak resident set during each phase (VmHWM since the phase's reset).
        self.hwm: dict[str, float] = {}
        self.current = "start"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        from node.memory import memory_status_mib

        fields = memory_status_mib(self.pid)
        name = self.current
        if fields.get("VmRSS", 0.0) > self.peaks.get(name, 0.0):
            self.peaks[name] = fields["VmRSS"]
            self.file_backed[name] = fields.get("RssFile", 0.0)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def _close_phase(self) -> None:
        from node.memory import memory_status_mib

        if self.current in self.hwm:
            self.hwm[self.current] = memory_status_mib(self.pid).get("VmHWM", 0.0)

    def _reset_hwm(self) -> bool:
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def phase(self, name: str) -> None:
        """From now on samples count for ``name``; one sample is taken at once."""
        self._sample()
        self._close_phase()
        self.current = name
        if self._reset_hwm():
            self.hwm[name] = 0.0
        self._sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self._close_phase()


def associations_for(studies: int) -> tuple[int, ...]:
    """Associations per study: one for each, four for the last when there is more than one."""
    return tuple(4 if studies > 1 and number == studies - 1 else 1 for number in range(studies))


def run(cases: list[Path], work: Path, early_analysis: bool = True) -> dict[str, Any]:
    """The studies through a served node, one after the other; peak resident set per phase.
    ``early_analysis``: the node's ``[node] early_analysis`` (on: the job's work on a study's FLAIR
    series starts while its other series arrive, so part of the job's memory shows in the receiving
    phase)."""
    from node.config import Destination
    from tests.helpers.node import CatchingSCP
    from tests.helpers.ports import free_port
    from tests.helpers.served import ServedNode, node_toml
    from tests.helpers.waiting import wait_until

    work.mkdir(parents=True, exist_ok=True)
    studies = [study_files(case, RESULTS_DIR) for case in cases]
    catcher = CatchingSCP().start(free_port())
    port = free_port()
    config = node_toml(work, port, f"sqlite:///{work / 'node.db'}",
                       [Destination("pacs", "CATCHER", "127.0.0.1", catcher.port)],
                       idle=1.0, bootstrap=True,
                       extra_node=f"early_analysis = {str(early_analysis).lower()}")
    node = ServedNode(config, work / "home", work / "node.log", port).start(timeout=300)
    assert node.proc is not None
    sampler = Sampler(node.proc.pid).start()
    phases: list[tuple[str, str]] = [("started, idle", "idle")]
    try:
        sampler.phase("started, idle")
        time.sleep(3.0)
        for number, (files, associations) in enumerate(zip(studies, associations_for(len(studies)),
                                                           strict=True), start=1):
            name = f"receiving study {number} ({len(files)} instances, {associations} association(s))"
            sampler.phase(name)
            phases.append((name, "receive"))
            send(files, port, "SEGNODE", associations)
            job = f"job {number} (brain extraction, whole tumour, SEG + SR sent)"
            sampler.phase(job)
            phases.append((job, "job"))
            def seg_count_reached(n: int = number) -> bool:
                return sum(d.Modality == "SEG" for d in catcher.received) >= n

            wait_until(seg_count_reached, 300, f"the SEG of study {number}")
            time.sleep(0.5)  # the worker releases the models' buffers after the job
            idle = f"idle after job {number}"
            sampler.phase(idle)
            phases.append((idle, "idle"))
            time.sleep(2.0)
    finally:
        sampler.stop()
        node.stop()
        catcher.stop()
    rows = [{"phase": name, "kind": kind, "peak_rss_mib": sampler.peaks[name],
             "file_backed_mib": sampler.file_backed.get(name, 0.0),
             "hwm_mib": sampler.hwm.get(name)} for name, kind in phases]
    return {"cases": [c.name for c in cases], "rows": rows, "early_analysis": early_analysis}


def _peak(row: dict[str, Any]) -> float:
    """A phase's peak: the kernel's high-water mark where it was reset for the phase, else the
    highest sample (results saved before the mark was kept have no ``hwm_mib``)."""
    hwm = row.get("hwm_mib")
    return float(max(row["peak_rss_mib"], hwm or 0.0))


def tables(result: dict[str, Any]) -> str:
    """Markdown: the phases of each run (early analysis off, then on), then the targets."""
    runs = [result["without_early_analysis"], result]
    names = [r["phase"] for r in result["rows"]]
    cell = {id(run): {r["phase"]: r for r in run["rows"]} for run in runs}

    def hwm(row: dict[str, Any]) -> str:
        return "n/a" if row.get("hwm_mib") is None else f"{row['hwm_mib']:.0f}"

    phases = markdown_table(
        ["phase", "early analysis off: sampled peak RSS (MiB)", "VmHWM", "file-backed",
         "on (default): sampled", "VmHWM", "file-backed"],
        [[name, *(value for run in runs for value in (
            f"{cell[id(run)][name]['peak_rss_mib']:.0f}", hwm(cell[id(run)][name]),
            f"{cell[id(run)][name]['file_backed_mib']:.0f}"))] for name in names])

    def peak(run: dict[str, Any], kind: str) -> float:
        return max(_peak(r) for r in run["rows"] if r["kind"] == kind)

    off_receive, on_receive = peak(runs[0], "receive"), peak(runs[1], "receive")
    job = max(peak(run, "job") for run in runs)
    goals = markdown_table(["target", "measured", "met"], [
        [f"peak RSS while receiving <= {RECEIVE_TARGET_MIB:.0f} MiB (issue 17), early analysis off",
         f"{off_receive:.0f} MiB", "yes" if off_receive <= RECEIVE_TARGET_MIB else "NO"],
        [f"peak RSS while receiving <= {RECEIVE_TARGET_MIB:.0f} MiB (issue 17), early analysis on (the "
         "default: the job's brain extraction and inference run while the study arrives)",
         f"{on_receive:.0f} MiB", "yes" if on_receive <= RECEIVE_TARGET_MIB else "NO"],
        [f"peak RSS of a whole-tumour job <= {JOB_TARGET_MIB:.0f} MiB (either run)", f"{job:.0f} MiB",
         "yes" if job <= JOB_TARGET_MIB else "NO"],
    ])
    return (f"`segnode serve` in its own process, shipped models; studies {', '.join(result['cases'])}; "
            "one run with `[node] early_analysis` off, then one with it on. Sampled: the highest of "
            "`VmRSS` read every 20 ms; VmHWM: the kernel's high-water mark, reset at each phase's start "
            "(`/proc/PID/clear_refs`), which no short peak escapes; a target takes the higher.\n\n"
            + phases + "\n\n" + goals)


def main() -> int:
    """Run it; print and save the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    cases = [SHARED_DATA / "train" / "brats" / name for name in args.cases.split(",")]
    missing = [str(c) for c in cases if not c.is_dir()]
    if missing:
        print(f"error: no case at {', '.join(missing)}")
        return 2
    work = Path(tempfile.mkdtemp(prefix="segnode-bench-memory-"))
    try:
        off = run(cases, work / "off", early_analysis=False)
        result = run(cases, work / "on", early_analysis=True)
        result["without_early_analysis"] = off
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["markdown"] = tables(result)
    print(result["markdown"])
    print(f"saved {save_result('node_memory', result, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
