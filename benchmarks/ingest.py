"""C-STORE receive rate: the node against DCMTK storescp and Orthanc, the same study sent by storescu.

The study is a BraTS training case written as a four-series DICOM MR study (620 files of 240 x 240,
16-bit). For each receiver and for 1 and 4 concurrent associations (the files split into that many
equal parts, one DCMTK ``storescu`` each, all started at once), the time from the first storescu
start to the last one's exit, on a fresh receiver each run (empty storage and database), best of
``--repeat``. Every program gets ``TCP_NODELAY=1`` in its environment (DCMTK otherwise waits on
Nagle's algorithm, ~40 ms per C-STORE); the node sets TCP_NODELAY on its own sockets.

What each receiver does before it answers Success differs and is part of the comparison: the node
writes the file durably (temp file, fsync, rename, directory fsync) and commits a database row;
storescp writes the file without fsync; Orthanc writes the file and its SQLite index.

Usage: python benchmarks/ingest.py [--case DIR] [--repeat N] [--associations 1,4] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS_DIR, SHARED_DATA, markdown_table, save_result

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
DEFAULT_CASE = SHARED_DATA / "train" / "brats" / "BraTS2021_00005"
RECEIVERS = ("node", "pynetdicom-bare", "storescp", "orthanc")


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 60.0, alive: Callable[[], bool] = lambda: True) -> None:
    """Wait until something accepts connections on ``port`` (RuntimeError on timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"the receiver on port {port} exited before it listened")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout:.0f} s")


def study_files(case_dir: Path, cache: Path) -> list[Path]:
    """The case as a DICOM MR study under ``cache`` (written once), its files in series order."""
    from converters.dicom_writer import write_study
    from converters.nifti import load_case

    out = cache / f"study-{case_dir.name}"
    done = out / ".complete"
    if not done.is_file():
        shutil.rmtree(out, ignore_errors=True)
        write_study(load_case(case_dir), out)
        done.write_text("ok")
    return sorted(p for p in out.rglob("*.dcm"))


def split(files: Sequence[Path], parts: int) -> list[list[Path]]:
    """``files`` in ``parts`` contiguous, nearly equal groups (none empty)."""
    size, extra = divmod(len(files), parts)
    groups, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        if end > start:
            groups.append(list(files[start:end]))
        start = end
    return groups


def send(files: Sequence[Path], port: int, called_ae: str, associations: int) -> float:
    """Seconds for ``associations`` concurrent storescu processes to send ``files`` to 127.0.0.1:port."""
    storescu = shutil.which("storescu")
    if storescu is None:
        raise RuntimeError("DCMTK storescu is not installed (apt-get install dcmtk)")
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [storescu, "-aet", "BENCH_SCU", "-aec", called_ae, "127.0.0.1", str(port), *map(str, group)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=DCMTK_ENV,
        )
        for group in split(files, associations)
    ]
    errors = [p.communicate()[1].decode(errors="replace")[-300:] for p in procs]
    seconds = time.perf_counter() - start
    if any(p.returncode != 0 for p in procs):
        first = next(e for e, p in zip(errors, procs, strict=True) if p.returncode)
        raise RuntimeError(f"storescu failed: {first}")
    return seconds


@contextlib.contextmanager
def node_receiver(work: Path) -> Iterator[tuple[int, str, Callable[[], int]]]:
    """The node in this process: fresh SQLite database and spool, no job runs during the benchmark."""
    from db.instances import instance_counts
    from node.config import Settings
    from node.service import NodeService

    settings = Settings()
    settings.node.host, settings.node.port = "127.0.0.1", free_port()
    settings.node.spool_dir = str(work / "spool")
    settings.node.study_idle_seconds = 3600.0
    settings.node.min_free_disk_mb = 50
    settings.node.max_associations = 8
    settings.database.url = f"sqlite:///{work / 'node.db'}"
    settings.metrics.port = 0
    node = NodeService(settings)
    node.start()
    try:
        yield node.scp.port, settings.node.ae_title, lambda: instance_counts(node.sf)["kept"]
    finally:
        node.stop()


@contextlib.contextmanager
def storescp_receiver(work: Path) -> Iterator[tuple[int, str, Callable[[], int]]]:
    """DCMTK storescp (``--fork``: one process per association) writing into ``work/out``."""
    program = shutil.which("storescp")
    if program is None:
        raise RuntimeError("DCMTK storescp is not installed (apt-get install dcmtk)")
    out, port = work / "out", free_port()
    out.mkdir(parents=True)
    proc = subprocess.Popen([program, "--fork", "-aet", "STORESCP", "-od", str(out), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=DCMTK_ENV)
    try:
        wait_port(port, alive=lambda: proc.poll() is None)
        yield port, "STORESCP", lambda: sum(1 for p in out.iterdir() if p.is_file())
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def orthanc_receiver(work: Path) -> Iterator[tuple[int, str, Callable[[], int]]]:
    """Orthanc with its storage and SQLite index in ``work`` (default settings otherwise)."""
    program = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
    if program is None:
        raise RuntimeError("Orthanc is not installed (apt-get install orthanc)")
    http, dicom = free_port(), free_port()
    config = {
        "Name": "bench", "StorageDirectory": str(work / "storage"), "IndexDirectory": str(work / "index"),
        "HttpPort": http, "DicomPort": dicom, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "Plugins": [], "DicomCheckCalledAet": False,
    }
    (work / "orthanc.json").write_text(json.dumps(config))
    proc = subprocess.Popen([program, str(work / "orthanc.json")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=DCMTK_ENV)

    def count() -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/statistics", timeout=10) as rsp:
            return int(json.loads(rsp.read())["CountInstances"])

    try:
        wait_port(http, alive=lambda: proc.poll() is None)
        wait_port(dicom, alive=lambda: proc.poll() is None)
        yield dicom, "ORTHANC", count
    finally:
        proc.terminate()
        proc.wait(30)


@contextlib.contextmanager
def bare_receiver(work: Path) -> Iterator[tuple[int, str, Callable[[], int]]]:
    """pynetdicom alone, the node's network stack: answers Success to every C-STORE, stores nothing
    (polling like the node's associations). The ceiling of any pynetdicom-based receiver here."""
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

    from node.scp import DUL_LOOP_DELAY_S

    ae = AE(ae_title="BARE")
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(str(context.abstract_syntax), ALL_TRANSFER_SYNTAXES)
    received: list[int] = []

    def on_open(event: Any) -> None:
        event.assoc.dul._run_loop_delay = DUL_LOOP_DELAY_S

    def on_store(event: Any) -> int:
        received.append(1)
        return 0x0000

    server = ae.start_server(("127.0.0.1", free_port()), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_CONN_OPEN, on_open)])
    try:
        yield int(server.server_address[1]), "BARE", lambda: len(received)
    finally:
        server.shutdown()


RECEIVER_FACTORIES = {"node": node_receiver, "storescp": storescp_receiver, "orthanc": orthanc_receiver,
                      "pynetdicom-bare": bare_receiver}


def measure(receiver: str, files: Sequence[Path], associations: int, repeat: int = 1) -> dict[str, Any]:
    """Best-of-``repeat`` receive rate of ``receiver`` for ``files`` over ``associations`` associations.

    Each run checks that the receiver holds every instance afterwards.
    """
    size_mb = sum(p.stat().st_size for p in files) / 1e6
    best = float("inf")
    for _ in range(repeat):
        with tempfile.TemporaryDirectory(prefix=f"bench-{receiver}-") as tmp, \
                RECEIVER_FACTORIES[receiver](Path(tmp)) as (port, ae, count):
            seconds = send(files, port, ae, associations)
            held = count()
            if held != len(files):
                raise RuntimeError(f"{receiver} holds {held} instances after receiving {len(files)}")
            best = min(best, seconds)
    return {
        "receiver": receiver, "associations": associations, "instances": len(files), "mb": size_mb,
        "seconds": best, "instances_per_s": len(files) / best, "mb_per_s": size_mb / best,
    }


def targets(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
    """Node ingest >= 50% of storescp's rate with one association, and more than that with four."""
    by = {(r["receiver"], r["associations"]): r for r in rows}
    out = []
    if ("node", 1) in by and ("storescp", 1) in by:
        frac1 = by[("node", 1)]["instances_per_s"] / by[("storescp", 1)]["instances_per_s"]
        out.append(["node >= 50% of storescp, 1 association", f"{100 * frac1:.0f}%",
                    "yes" if frac1 >= 0.5 else f"NO (gap {100 * (0.5 - frac1):.0f} points)"])
        if ("node", 4) in by and ("storescp", 4) in by:
            four, one = by[("node", 4)]["instances_per_s"], by[("node", 1)]["instances_per_s"]
            frac4 = four / by[("storescp", 4)]["instances_per_s"]
            out.append(["node with 4 associations: more than with 1 (and its share of storescp)",
                        f"{four:.0f} vs {one:.0f} inst/s ({100 * frac4:.0f}% of storescp)",
                        "yes" if four > one else "NO"])
    return out


def tables(result: dict[str, Any]) -> str:
    """Markdown tables of a result."""
    rows = [[r["receiver"], r["associations"], r["instances"], f"{r['mb']:.1f}", f"{r['seconds']:.2f}",
             f"{r['instances_per_s']:.0f}", f"{r['mb_per_s']:.1f}"] for r in result["rows"]]
    return (markdown_table(["receiver", "associations", "instances", "MB", "seconds", "instances/s", "MB/s"],
                           rows) + "\n\n" + markdown_table(["target", "measured", "met"], result["targets"]))


def main() -> int:
    """Measure every receiver at each association count; print and save the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", type=Path, default=DEFAULT_CASE)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--associations", default="1,4")
    parser.add_argument("--receivers", default=",".join(RECEIVERS))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the node under test has no model and no destination
    if not args.case.is_dir():
        fallback = REPO / "models" / "demo_case" / "BraTS2021_00003"
        print(f"{args.case} not found; using {fallback}")
        args.case = fallback
    files = study_files(args.case, RESULTS_DIR)
    rows = []
    for receiver in args.receivers.split(","):
        for n in (int(x) for x in args.associations.split(",")):
            rows.append(measure(receiver, files, n, args.repeat))
            r = rows[-1]
            print(f"{receiver:15s} x{n}: {r['instances_per_s']:.0f} instances/s, {r['mb_per_s']:.1f} MB/s",
                  flush=True)
    result = {"case": args.case.name, "rows": rows, "targets": targets(rows)}
    result["markdown"] = tables(result)
    print(result["markdown"])
    print(f"saved {save_result('ingest', result, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
