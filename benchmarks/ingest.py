"""C-STORE receive rate: the node against DCMTK storescp and Orthanc, the same study sent by storescu.

The study is a BraTS training case written as a four-series DICOM MR study (620 files of 240 x 240,
16-bit). For each receiver and for 1 and 4 concurrent associations (the files split into that many
equal parts, one DCMTK ``storescu`` each, all started at once), the time from the first storescu
start to the last one's exit, on a fresh receiver each run (empty storage and database, file systems
synced before it starts). The rounds are interleaved (every row once per round, ``--repeat`` rounds,
each round starting one receiver further on) so that the load of the machine's other users falls on
all rows alike; a row reports its best round and its median. Every program gets
``TCP_NODELAY=1`` in its environment (DCMTK otherwise waits on Nagle's algorithm, ~40 ms per
C-STORE); the node sets TCP_NODELAY on its own sockets.

``node:LEVER[+LEVER]`` rows are the node with levers of issue 17 turned off (NODE_WITHOUT), so each
lever is measured against the node in the same run; ``node:prompt+group+header`` is the node before
them. Two diagnostic rows, never levers to ship, take one association's time per instance apart (printed
with the targets): ``node:store``, the node's network stack and checks alone (answered, nothing stored),
and ``node:fsync+walsync``, file and row stored without any sync. ``node@N`` rows are the node with
``[node] receivers = N``: N processes accept on its port (node/receivers.py). The node runs in this
process (its extra receivers in their own); this process's resident set is sampled while it receives.

Each row's storage (the receiver's files, database and spool) is a fresh directory. ``main`` keeps
them under one folder until the benchmark ends and empties a row's files when the row ends instead of
deleting them, and asks ext4 to give each row directory an allocation group of its own
(:func:`common.spread_subdirectories`): on ext4 without a journal (this project's VMs), creating a file
checks every inode of its group freed in the last minutes first. Before 2026-12-07 each row deleted its
files and the next ones were made in the same group of /tmp, where creating an empty file then cost
165-900 us against 14-19 us in a group of its own; storescp, which only writes, lost the most (1,278
against 2,825 inst/s in one hour). The cost of creating a file in a row directory and in a new folder
of the system's temporary directory is measured first and printed with the targets.

What each receiver does before it answers Success differs and is part of the comparison: the node
writes the file durably (temp file, fsync, rename, directory fsync) and commits a database row;
storescp writes the file without fsync; Orthanc writes the file and its SQLite index.

Usage: python benchmarks/ingest.py [--case DIR] [--repeat N] [--associations 1,4] [--receivers A,B]
       [--rows-in DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import unittest.mock
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, SHARED_DATA, markdown_table, save_result, spread_subdirectories

from node.dcmtk_programs import dcmtk_program

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
DEFAULT_CASE = SHARED_DATA / "train" / "brats" / "BraTS2021_00005"
RECEIVERS = ("node", "node@2", "node@3", "node:store", "node:fsync+walsync", "node:driver", "node:response",
             "node:contexts", "node:reader", "node:wait", "node:guard", "node:prompt+group+header",
             "node:prompt", "node:group", "node:header", "pynetdicom-bare", "storescp", "orthanc")


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
    storescu = dcmtk_program("storescu")
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


#: Highest resident set of this process (the node runs in it) seen while a node row was receiving, and
#: the highest seen when a node had started (models loaded) and not yet received anything.
NODE_PEAK_RSS_MIB = [0.0]
NODE_IDLE_RSS_MIB = [0.0]


def rss_mib() -> float:
    """This process's resident set now, MiB."""
    from node.memory import rss_mib as node_rss_mib

    return node_rss_mib()


def _sample_rss(stop: threading.Event, every_s: float = 0.02) -> None:
    """Record this process's resident set in NODE_PEAK_RSS_MIB until ``stop`` is set."""
    while not stop.wait(every_s):
        NODE_PEAK_RSS_MIB[0] = max(NODE_PEAK_RSS_MIB[0], rss_mib())


@contextlib.contextmanager
def node_receiver(work: Path, receivers: int = 1) -> Iterator[tuple[int, str, Callable[[], int]]]:
    """The node in this process (with ``receivers`` - 1 more receiving processes, node/receivers.py):
    fresh SQLite database and spool, no job runs during the benchmark, and no early analysis
    (node/early.py would start segmenting the study's FLAIR series while the rest arrives: the
    receive path is measured alone here, the two together by benchmarks/end_to_end.py)."""
    from db.instances import instance_counts
    from node.config import Settings
    from node.service import NodeService

    settings = Settings()
    settings.node.host, settings.node.port = "127.0.0.1", free_port()
    settings.node.spool_dir = str(work / "spool")
    settings.node.study_idle_seconds = 3600.0
    settings.node.early_analysis = False
    settings.node.min_free_disk_mb = 50
    settings.node.max_associations = 8
    settings.node.receivers = receivers
    settings.database.url = f"sqlite:///{work / 'node.db'}"
    settings.metrics.port = 0
    node = NodeService(settings)
    node.start()
    NODE_IDLE_RSS_MIB[0] = max(NODE_IDLE_RSS_MIB[0], rss_mib())
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_rss, args=(stop,), daemon=True)
    sampler.start()
    try:
        yield node.scp.port, settings.node.ae_title, lambda: instance_counts(node.sf)["kept"]
    finally:
        stop.set()
        sampler.join()
        node.stop()


@contextlib.contextmanager
def storescp_receiver(work: Path) -> Iterator[tuple[int, str, Callable[[], int]]]:
    """DCMTK storescp (``--fork``: one process per association) writing into ``work/out``."""
    program = dcmtk_program("storescp")
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
    (its DUL polling every 0.2 ms, as the node's did before node.reactor.make_waiting). The ceiling of a
    receiver on pynetdicom's own loops here."""
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

    from node.reactor import DUL_POLL_S

    ae = AE(ae_title="BARE")
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(str(context.abstract_syntax), ALL_TRANSFER_SYNTAXES)
    received: list[int] = []

    def on_open(event: Any) -> None:
        event.assoc.dul._run_loop_delay = DUL_POLL_S

    def on_store(event: Any) -> int:
        received.append(1)
        return 0x0000

    server = ae.start_server(("127.0.0.1", free_port()), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_CONN_OPEN, on_open)])
    assert server is not None  # block=False returns the running server
    try:
        yield int(server.server_address[1]), "BARE", lambda: len(received)
    finally:
        server.shutdown()


def _without_prompt_loop() -> contextlib.AbstractContextManager[Any]:
    """The node with pynetdicom's own acceptor loop (1 ms sleep per turn) instead of node.reactor's."""
    return unittest.mock.patch("node.scp.make_prompt", lambda assoc: None)


def _without_group_commit() -> contextlib.AbstractContextManager[Any]:
    """The node with one transaction per C-STORE, each association on its own."""
    from db.instances import ReceivedInstance, record_instances

    def alone(self: Any, row: ReceivedInstance) -> bool:
        return record_instances(self.sf, [row])[0]

    return unittest.mock.patch("node.committer.GroupCommitter.record", alone)


def _without_own_file_header() -> contextlib.AbstractContextManager[Any]:
    """The node with pynetdicom's ``encoded_dataset()`` (File Meta Information through pydicom)."""
    return unittest.mock.patch("node.scp.as_file", lambda event, *_: event.encoded_dataset())


def _without_driver_record() -> contextlib.AbstractContextManager[Any]:
    """The node recording each C-STORE through SQLAlchemy's session instead of the driver."""
    from db.instances import record_instances_through_session

    return unittest.mock.patch("db.instances.record_instances", record_instances_through_session)


def _without_quick_response() -> contextlib.AbstractContextManager[Any]:
    """The node answering each C-STORE through pynetdicom's own response encoding."""
    return unittest.mock.patch("node.scp.make_quick_store_response", lambda assoc: None)


def _without_cheap_contexts() -> contextlib.AbstractContextManager[Any]:
    """The node letting pynetdicom deep-copy its presentation contexts for each association."""
    return unittest.mock.patch("node.scp.PresentationContexts", list)


def _without_header_reader() -> contextlib.AbstractContextManager[Any]:
    """The node decoding every data set with pydicom to read its UIDs and pixel attributes, instead of
    reading them from the bytes (node/instance_header.py)."""
    return unittest.mock.patch("node.scp.read_header", lambda data, syntax: None)


def _without_waiting_dul() -> contextlib.AbstractContextManager[Any]:
    """The node's DUL threads looking at their sockets and sleeping 0.2 ms between looks, with C-STORE
    responses queued for them, instead of waiting on the socket and sending responses directly
    (node/reactor.py make_waiting, node/store_response.py)."""
    from node.reactor import DUL_POLL_S

    stack = contextlib.ExitStack()
    stack.enter_context(
        unittest.mock.patch("node.scp.make_waiting", lambda dul: setattr(dul, "_run_loop_delay", DUL_POLL_S))
    )
    stack.enter_context(unittest.mock.patch("node.store_response._locked_sends", lambda dul: None))
    return stack


def _without_fsync() -> contextlib.AbstractContextManager[Any]:
    """Diagnostic only, never a lever to ship: the node's spool without fdatasync and directory fsync,
    to show what durability costs against receivers that do not sync (storescp, Orthanc)."""
    stack = contextlib.ExitStack()
    stack.enter_context(unittest.mock.patch("node.spool.os.fdatasync", lambda fd: None))
    stack.enter_context(unittest.mock.patch("node.spool._fsync_dir", lambda directory: None))
    return stack


def _without_wal_sync() -> contextlib.AbstractContextManager[Any]:
    """The node's SQLite database with ``synchronous = NORMAL`` (as before 2026-12-04): commits do not
    sync the write-ahead log, so an acknowledged row can roll back after a power loss. Measures what
    the WAL's sync at every commit costs; never a lever to ship."""
    return unittest.mock.patch("db.session.SQLITE_SYNCHRONOUS", "NORMAL")


#: C-STOREs the node:store row's node answered (it keeps no file and no row to count them by).
ANSWERED_UNSTORED = [0]


def _without_storing() -> contextlib.AbstractContextManager[Any]:
    """Diagnostic only, never a lever to ship: the node's network stack and checks alone. Each C-STORE
    is answered Success once its header is read, with no spool file and no database row, to show what
    the node's receive path on pynetdicom costs before it stores anything."""
    from node.scp import ReceiveResult

    def answer(self: Any, *args: Any) -> ReceiveResult:
        ANSWERED_UNSTORED[0] += 1
        return ReceiveResult(0x0000, "kept")

    return unittest.mock.patch("node.scp.StorageSCP.receive", answer)


def _without_pdu_guard() -> contextlib.AbstractContextManager[Any]:
    """Security, not speed: the node reading PDUs with pynetdicom's own reader (no length limit, no
    whole-PDU deadline) instead of node/pdu_guard.py's, to show what the bounded reader costs."""
    return unittest.mock.patch("node.scp.pdu_guard.install", lambda dul: None)


#: Levers of the node's receive path a row can turn off: ``node:prompt`` is the node without the
#: prompt association loop, ``node:prompt+group`` without two levers.
NODE_WITHOUT: dict[str, Callable[[], contextlib.AbstractContextManager[Any]]] = {
    "prompt": _without_prompt_loop,
    "group": _without_group_commit,
    "header": _without_own_file_header,
    "driver": _without_driver_record,
    "response": _without_quick_response,
    "contexts": _without_cheap_contexts,
    "reader": _without_header_reader,
    "wait": _without_waiting_dul,
    "fsync": _without_fsync,
    "walsync": _without_wal_sync,
    "guard": _without_pdu_guard,
    "store": _without_storing,
}


RECEIVER_FACTORIES = {"node": node_receiver, "storescp": storescp_receiver, "orthanc": orthanc_receiver,
                      "pynetdicom-bare": bare_receiver}


#: The folder that keeps every row's storage until the benchmark ends (``main`` sets it); empty: each
#: row's storage is deleted when the row ends (the tests' small studies).
ROWS_KEPT_IN: list[Path] = []


@contextlib.contextmanager
def row_directory(prefix: str) -> Iterator[Path]:
    """A fresh directory for one row's storage. Under :data:`ROWS_KEPT_IN` its files are emptied (their
    inodes kept) when the row ends, so that no row meets inodes another row freed (module docstring);
    otherwise it is deleted."""
    if not ROWS_KEPT_IN:
        with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
            yield Path(tmp)
        return
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=ROWS_KEPT_IN[0]))
    try:
        yield path
    finally:
        for child in path.rglob("*"):
            if child.is_file() and not child.is_symlink():
                os.truncate(child, 0)


@contextlib.contextmanager
def rows_kept_in(parent: Path) -> Iterator[Path]:
    """Keep every row's storage in a new folder under ``parent``, whose subdirectories ext4 places in
    groups of their own, until the block ends; then delete it."""
    parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="segnode-ingest-rows-", dir=parent))
    spread_subdirectories(folder)
    ROWS_KEPT_IN[:] = [folder]
    try:
        yield folder
    finally:
        ROWS_KEPT_IN.clear()
        shutil.rmtree(folder, ignore_errors=True)


def file_create_us(parent: Path, count: int = 200) -> float:
    """Microseconds to create (and close) one empty file in a new directory under ``parent``; the files
    stay until ``parent`` is removed (see :func:`row_directory`)."""
    directory = Path(tempfile.mkdtemp(prefix="create-", dir=parent))
    start = time.perf_counter()
    for i in range(count):
        os.close(os.open(directory / f"f{i}", os.O_CREAT | os.O_WRONLY, 0o644))
    return (time.perf_counter() - start) / count * 1e6


def measure_once(receiver: str, files: Sequence[Path], associations: int) -> float:
    """Seconds for one run of ``receiver`` (fresh storage and database) over ``associations``
    associations; checks that the receiver holds every instance afterwards."""
    base, _, variant = receiver.partition(":")
    base, _, processes = base.partition("@")  # node@N: the node with [node] receivers = N
    # The previous row's unsynced files (storescp and Orthanc do not fsync) would otherwise be written
    # back during this row, and on ext4 (data=ordered) the node's fsyncs wait for them.
    os.sync()
    with row_directory(f"bench-{base}-") as tmp, contextlib.ExitStack() as stack:
        for lever in filter(None, variant.split("+")):
            stack.enter_context(NODE_WITHOUT[lever]())
        factory = RECEIVER_FACTORIES[base]
        if processes:
            factory = functools.partial(node_receiver, receivers=int(processes))
        port, ae, count = stack.enter_context(factory(tmp))
        ANSWERED_UNSTORED[0] = 0
        seconds = send(files, port, ae, associations)
        held = ANSWERED_UNSTORED[0] if "store" in variant.split("+") else count()
    if held != len(files):
        raise RuntimeError(f"{receiver} holds {held} instances after receiving {len(files)}")
    return seconds


def row(receiver: str, files: Sequence[Path], associations: int, seconds: Sequence[float]) -> dict[str, Any]:
    """The table row of ``receiver``: its best run (and the median, to show the spread)."""
    size_mb = sum(p.stat().st_size for p in files) / 1e6
    best = min(seconds)
    return {
        "receiver": receiver, "associations": associations, "instances": len(files), "mb": size_mb,
        "seconds": best, "median_seconds": statistics.median(seconds), "runs": len(seconds),
        "instances_per_s": len(files) / best, "mb_per_s": size_mb / best,
    }


def measure(receiver: str, files: Sequence[Path], associations: int, repeat: int = 1) -> dict[str, Any]:
    """Best-of-``repeat`` receive rate of ``receiver`` for ``files`` over ``associations`` associations."""
    runs = [measure_once(receiver, files, associations) for _ in range(repeat)]
    return row(receiver, files, associations, runs)


def measure_all(receivers: Sequence[str], files: Sequence[Path], counts: Sequence[int],
                repeat: int) -> list[dict[str, Any]]:
    """Every receiver at every association count, ``repeat`` rounds interleaved (each round runs
    every row once, each round starting one receiver further on), so that the neighbours' load on this
    shared machine and the position in a round fall on all rows alike."""
    runs: dict[tuple[str, int], list[float]] = {(r, n): [] for r in receivers for n in counts}
    for round_ in range(repeat):
        shift = round_ % len(receivers)
        for receiver in [*receivers[shift:], *receivers[:shift]]:
            for n in counts:
                runs[(receiver, n)].append(measure_once(receiver, files, n))
                print(f"round {round_ + 1}: {receiver:28s} x{n}: "
                      f"{len(files) / runs[(receiver, n)][-1]:.0f} instances/s", flush=True)
    return [row(r, files, n, runs[(r, n)]) for r in receivers for n in counts]


#: Issue 17's bound on the node's resident memory while it receives.
RSS_TARGET_MIB = 500.0


def targets(rows: Sequence[dict[str, Any]], peak_rss_mib: float = 0.0, idle_rss_mib: float = 0.0
            ) -> list[list[str]]:
    """Issue 17: with one association the node >= Orthanc and >= 50 % of storescp; with four the node
    >= 1.5 x its own one-association rate; peak RSS while receiving <= 500 MiB. Ratios of rows of the
    same run only."""
    rate = {(r["receiver"], r["associations"]): r["instances_per_s"] for r in rows}
    out = []
    node1 = rate.get(("node", 1))
    if node1 and ("orthanc", 1) in rate:
        ratio = node1 / rate[("orthanc", 1)]
        out.append(["node >= Orthanc, 1 association", f"{node1:.0f} vs {rate[('orthanc', 1)]:.0f} inst/s "
                    f"({ratio:.2f}x)", "yes" if ratio >= 1 else "NO"])
    if node1 and ("storescp", 1) in rate:
        frac = node1 / rate[("storescp", 1)]
        out.append(["node >= 50% of storescp, 1 association", f"{100 * frac:.0f}%",
                    "yes" if frac >= 0.5 else f"NO (gap {100 * (0.5 - frac):.0f} points)"])
    out += where_the_time_goes(rate)
    if node1 and ("node", 4) in rate:
        ratio = rate[("node", 4)] / node1
        out.append(["node, 4 associations >= 1.5x its 1-association rate",
                    f"{rate[('node', 4)]:.0f} vs {node1:.0f} inst/s ({ratio:.2f}x)",
                    "yes" if ratio >= 1.5 else "NO"])
    for receiver, n4 in sorted(rate):
        if not receiver.startswith("node@") or n4 != 4 or (receiver, 1) not in rate:
            continue
        own1 = rate[(receiver, 1)]
        ratio = rate[(receiver, 4)] / own1
        out.append([f"{receiver} ([node] receivers = {receiver[5:]}), 4 associations >= 1.5x its "
                    "1-association rate", f"{rate[(receiver, 4)]:.0f} vs {own1:.0f} inst/s ({ratio:.2f}x)",
                    "yes" if ratio >= 1.5 else "NO"])
        if node1:
            out.append([f"{receiver}, 4 associations against the node (receivers = 1), 1 association",
                        f"{rate[(receiver, 4)] / node1:.2f}x", "(for reading)"])
    if peak_rss_mib:
        # The nodes here share this process with the rest of the benchmark, so its resident set is no
        # node's: the 500 MiB target is judged on `segnode serve` in its own process (node_memory.py).
        out.append([f"peak RSS while receiving (the {RSS_TARGET_MIB:.0f} MiB target is judged on the node's "
                    "own process by benchmarks/node_memory.py; here the whole benchmark process, every "
                    "node row of the run in it)",
                    f"{peak_rss_mib:.0f} MiB ({idle_rss_mib:.0f} MiB started and idle, "
                    f"+{peak_rss_mib - idle_rss_mib:.0f} MiB receiving)", "(for reading)"])
    return out


def where_the_time_goes(rate: dict[tuple[str, int], float]) -> list[list[str]]:
    """Rows for reading: one association's time per instance against what the 50 % of storescp bar
    leaves, taken apart by the diagnostic rows of the same run: the node's stack alone (``node:store``),
    then storing without syncs (``node:fsync+walsync``), then the syncs (the node)."""
    needed = [("storescp", 1), ("node:store", 1), ("node:fsync+walsync", 1), ("node", 1)]
    if not all(key in rate for key in needed):
        return []
    storescp, stack, unsynced, node = (1000 / rate[key] for key in needed)
    out = [["one association, ms per instance (storescu's part included): storescp / at 50 % of its rate",
            f"{storescp:.2f} / {2 * storescp:.2f}", "(for reading)"]]
    for what, ms, total in (("the node's stack alone, nothing stored (node:store)", stack, stack),
                            ("+ the spool file and the row, unsynced (node:fsync+walsync)", unsynced - stack,
                             unsynced),
                            ("+ the syncs (the node)", node - unsynced, node)):
        out.append([f"one association, ms per instance: {what}", f"{ms:+.2f} (so far {total:.2f}, "
                    f"{100 * storescp / total:.0f} % of storescp's rate)", "(for reading)"])
    return out


def create_rows(create_us: dict[str, float]) -> list[list[str]]:
    """Rows for reading: what creating a file cost before the rows, in a row directory and in a new
    folder of the system's temporary directory (module docstring)."""
    return [[f"creating an empty file in a {where} (before the rows)", f"{us:.0f} us", "(for reading)"]
            for where, us in create_us.items()]


#: What each lever of NODE_WITHOUT is, for the table of what it moved.
LEVER_NAMES = {
    "prompt": "association loop waits on its message queue, not a 1 ms sleep (node/reactor.py)",
    "group": "group commit: concurrent C-STOREs share a transaction (node/committer.py)",
    "header": "file header packed directly, data set bytes as received (node/part10.py)",
    "driver": "each C-STORE's row written through the driver, not SQLAlchemy's session (db/instances.py)",
    "response": "C-STORE responses packed directly, not through pydicom (node/store_response.py)",
    "contexts": "presentation contexts copied per association without deepcopy (node/scp.py)",
    "reader": "UIDs and pixel attributes read from the data set bytes, not by pydicom (instance_header.py)",
    "wait": "DUL threads wait on their sockets, C-STORE responses sent directly (reactor, store_response)",
    "prompt+group+header": "all three (the node before issue 17)",
    "fsync": "(diagnostic, not shippable) fdatasync of the file and fsync of its directory",
    "walsync": "(diagnostic, not shippable) SQLite's write-ahead log synced at every commit",
    "fsync+walsync": "(diagnostic, not shippable) every sync: the file's, its directory's and the log's",
    "store": "(diagnostic, not shippable) storing: the spool file and the database row, synced",
    "guard": "(security, not speed) PDUs read by node/pdu_guard.py's bounded reader, not pynetdicom's",
}


def lever_rows(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
    """For each ``node:LEVERS`` row, the node without those levers against the node with them, same run
    (best and median of the rounds)."""
    by = {(r["receiver"], r["associations"]): r for r in rows}
    out = []
    for (receiver, n), without in by.items():
        base, _, levers = receiver.partition(":")
        full = by.get((base, n))
        if base != "node" or not levers or full is None:
            continue
        best = full["instances_per_s"] / without["instances_per_s"] - 1
        median = full["median_seconds"] and (without["median_seconds"] / full["median_seconds"] - 1)
        out.append([LEVER_NAMES.get(levers, levers), str(n), f"{without['instances_per_s']:.0f}",
                    f"{full['instances_per_s']:.0f}", f"{100 * best:+.0f}%", f"{100 * median:+.0f}%"])
    return out


def tables(result: dict[str, Any]) -> str:
    """Markdown tables of a result."""
    rows = [[r["receiver"], r["associations"], r["instances"], f"{r['mb']:.1f}", f"{r['seconds']:.2f}",
             f"{r['instances_per_s']:.0f}", f"{r['instances'] / r.get('median_seconds', r['seconds']):.0f}",
             f"{r['mb_per_s']:.1f}"] for r in result["rows"]]
    head = ["receiver", "associations", "instances", "MB", "seconds", "instances/s", "median inst/s", "MB/s"]
    goals = markdown_table(["target", "measured", "met"], result["targets"])
    levers = lever_rows(result["rows"])
    moved = "\n\n" + markdown_table(
        ["lever (turned off in the row node:LEVER)", "associations", "inst/s without", "inst/s with",
         "change (best)", "change (median)"], levers) if levers else ""
    return markdown_table(head, rows) + "\n\n" + goals + moved


def main() -> int:
    """Measure every receiver at each association count; print and save the tables."""
    from node.memory import tune_malloc

    tune_malloc()  # the node rows run in this process: its allocator as `segnode serve` sets it
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", type=Path, default=DEFAULT_CASE)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--associations", default="1,4")
    parser.add_argument("--receivers", default=",".join(RECEIVERS))
    parser.add_argument("--rows-in", type=Path, default=Path(tempfile.gettempdir()),
                        help="folder under which every row's storage is kept until the end")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the node under test has no model and no destination
    if not args.case.is_dir():
        from node.demo import DEFAULT_CASE as DEMO_CASE

        print(f"{args.case} not found; using {DEMO_CASE}")
        args.case = DEMO_CASE
    files = study_files(args.case, RESULTS_DIR)
    counts = [int(x) for x in args.associations.split(",")]
    with tempfile.TemporaryDirectory() as plain, rows_kept_in(args.rows_in) as folder:
        create_us = {"new folder of the temporary directory": file_create_us(Path(plain)),
                     "row directory": file_create_us(folder)}
        rows = measure_all(args.receivers.split(","), files, counts, args.repeat)
    result = {"case": args.case.name, "rows": rows, "repeat": args.repeat, "file_create_us": create_us,
              "targets": targets(rows, NODE_PEAK_RSS_MIB[0], NODE_IDLE_RSS_MIB[0]) + create_rows(create_us),
              "node_peak_rss_mib": NODE_PEAK_RSS_MIB[0], "node_idle_rss_mib": NODE_IDLE_RSS_MIB[0]}
    result["markdown"] = tables(result)
    print(result["markdown"])
    print(f"saved {save_result('ingest', result, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
