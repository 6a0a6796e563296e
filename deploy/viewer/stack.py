"""The viewer stack on loopback: Orthanc with its DICOMweb plugin as the PACS, the node sending its SEG and
SR there, and OHIF's built viewer served by a small HTTP server that also proxies /dicom-web to Orthanc.

``python deploy/viewer/stack.py`` (``make viewer``) starts it for a person: the shipped demo case goes
PACS -> node -> PACS, and the URL of the study in OHIF is printed; Ctrl-C stops everything.
The tests in tests/viewer/ start the same pieces and drive Chromium through them.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import logging
import mimetypes
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from converters.dicom_writer import StudyInfo

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
OHIF_DIST = HERE / "ohif"
APP_CONFIG = HERE / "app-config.js"
#: The shipped whole-tumour model, and the ``brats_regions`` candidate an administrator may add to it.
DEFAULT_MODEL = REPO / "models" / "default"
REGIONS_MODEL = REPO / "models" / "candidates" / "segnode-brats-regions-1.2.0"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
#: Paths the viewer server forwards to Orthanc (DICOMweb: QIDO-RS, WADO-RS, STOW-RS; WADO-URI).
PROXIED = ("/dicom-web/", "/wado")

logger = logging.getLogger(__name__)

mimetypes.add_type("application/wasm", ".wasm")
mimetypes.add_type("text/javascript", ".js")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until truthy (returns its value); TimeoutError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class OrthancWeb:
    """Orthanc on loopback with the DICOMweb plugin, its storage in ``workdir``.

    Parameters
    ----------
    workdir:
        Directory for the configuration, storage, index and log.
    program:
        The Orthanc executable.
    node_port:
        Port of the segnode SCP, registered as modality ``segnode`` (AE SEGNODE).
    """

    def __init__(self, workdir: Path, program: str, node_port: int) -> None:
        if not DICOMWEB_PLUGIN.is_file():
            raise FileNotFoundError(
                f"{DICOMWEB_PLUGIN} is missing: install the Debian package orthanc-dicomweb"
            )
        self.http, self.dicom = free_port(), free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "segnode-viewer",
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"),
            "HttpPort": self.http,
            "DicomPort": self.dicom,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": {"segnode": ["SEGNODE", "127.0.0.1", node_port]},
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado"},
        }
        path = workdir / "orthanc.json"
        path.write_text(json.dumps(config))
        self.log_path = workdir / "orthanc.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([program, str(path)], stdout=self._log, stderr=subprocess.STDOUT)
        try:
            wait_for(self._up, 60, "Orthanc REST API and DICOMweb", interval=0.2)
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        """Base URL of the REST API."""
        return f"http://127.0.0.1:{self.http}"

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"Orthanc exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}"
            )
        try:
            return self.get("/system") is not None and self.get("/dicom-web/studies") is not None
        except OSError:
            return False

    def get(self, path: str) -> Any:
        """GET a JSON document from the REST API."""
        with urllib.request.urlopen(f"{self.url}{path}", timeout=30) as rsp:
            return json.loads(rsp.read())

    def post(self, path: str, body: bytes) -> Any:
        """POST ``body`` to the REST API; the JSON answer."""
        request = urllib.request.Request(f"{self.url}{path}", data=body, method="POST")
        with urllib.request.urlopen(request, timeout=300) as rsp:
            return json.loads(rsp.read())

    def series_by_modality(self, study: str) -> dict[str, list[dict[str, Any]]]:
        """The series of Orthanc study ``study`` (Orthanc id) grouped by Modality."""
        out: dict[str, list[dict[str, Any]]] = {}
        for series in self.get(f"/studies/{study}/series"):
            out.setdefault(series["MainDicomTags"].get("Modality", ""), []).append(series)
        return out

    def stop(self) -> None:
        """Terminate Orthanc."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


class _ViewerHandler(SimpleHTTPRequestHandler):
    """OHIF's dist as static files (index.html for the app's own routes), our app-config.js in place of
    dist's, and the DICOMweb paths forwarded to Orthanc."""

    orthanc_port = 0
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("viewer http: " + format, *args)

    def _proxy(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() in {"accept", "content-type"}}
        conn = http.client.HTTPConnection("127.0.0.1", self.orthanc_port, timeout=300)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            rsp = conn.getresponse()
            data = rsp.read()
        finally:
            conn.close()
        self.send_response(rsp.status)
        for key in ("Content-Type", "ETag"):
            if rsp.getheader(key):
                self.send_header(key, str(rsp.getheader(key)))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_file(self, path: Path) -> None:
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", mimetypes.guess_type(path.name)[0] or "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        route = self.path.split("?", 1)[0]
        if route.startswith(PROXIED):
            self._proxy()
        elif route == "/app-config.js":
            self._send_file(APP_CONFIG)
        else:
            candidate = (OHIF_DIST / route.lstrip("/")).resolve()
            inside = candidate.is_relative_to(OHIF_DIST.resolve())
            self._send_file(candidate if inside and candidate.is_file() else OHIF_DIST / "index.html")

    def do_POST(self) -> None:
        if self.path.startswith(PROXIED):
            self._proxy()
        else:
            self.send_error(405, "only DICOMweb paths take POST")


class _QuietServer(ThreadingHTTPServer):
    """A browser that leaves mid-response (a closed tab, a cancelled prefetch) is a log line, not a
    traceback on stderr."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("viewer http: %s went away: %s", client_address, sys.exc_info()[1])


class ViewerServer:
    """OHIF on http://127.0.0.1:PORT/, DICOMweb proxied to Orthanc's HTTP port, in a thread of its own."""

    def __init__(self, orthanc_port: int, port: int = 0) -> None:
        if not (OHIF_DIST / "index.html").is_file():
            raise FileNotFoundError(f"{OHIF_DIST} has no OHIF build: run deploy/viewer/install.sh")
        handler = type("Handler", (_ViewerHandler,), {"orthanc_port": orthanc_port})
        self.httpd = _QuietServer(("127.0.0.1", port), handler)
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="viewer-http", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        """Base URL of the viewer."""
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


def start_node(workdir: Path, node_port: int, orthanc_dicom_port: int, model_dirs: Sequence[Path]) -> Any:
    """A segnode NodeService on loopback (AE SEGNODE) with each of ``model_dirs``' IR (INT8 first)
    promoted, sending SEG and SR to Orthanc; started. The node routes a study to the most capable of
    them whose series are present (a four-series study to a ``brats_regions`` model, when one is given)."""
    from node.bootstrap import install_and_promote
    from node.config import Destination, Settings
    from node.service import NodeService

    settings = Settings()
    settings.node.port = node_port
    settings.node.host = "127.0.0.1"
    settings.node.spool_dir = str(workdir / "spool")
    settings.node.study_idle_seconds = 0.5
    settings.node.poll_seconds = 0.05
    settings.node.min_free_disk_mb = 50
    settings.database.url = f"sqlite:///{workdir / 'segnode.db'}"
    settings.metrics.port = 0
    settings.destinations = [Destination("orthanc", "ORTHANC", "127.0.0.1", orthanc_dicom_port)]
    node = NodeService(settings)
    for model_dir in model_dirs:
        install_and_promote(node.registry, model_dir, by="viewer stack", reason="viewer stack")
    node.start()
    return node


def push_case(
    orthanc: OrthancWeb, case_dir: Path, out: Path, modalities: Sequence[str] | None, timeout: float = 300
) -> tuple[str, str]:
    """Convert ``case_dir`` to a DICOM study and :func:`push_study` it. Returns (StudyInstanceUID,
    Orthanc study id)."""
    from converters.dicom_writer import write_study
    from converters.nifti import load_case

    return push_study(orthanc, write_study(load_case(case_dir), out, modalities=modalities), timeout)


def push_study(orthanc: OrthancWeb, study: StudyInfo, timeout: float = 300) -> tuple[str, str]:
    """Upload ``study``'s files to Orthanc and have Orthanc C-STORE the study to the node; wait until the
    node's SEG and SR are in Orthanc. Returns (StudyInstanceUID, Orthanc study id)."""
    paths = [path for files in study.files.values() for path in files]
    with ThreadPoolExecutor(max_workers=4) as pool:  # Orthanc stores uploads in parallel; one by one is slow
        list(pool.map(lambda path: orthanc.post("/instances", path.read_bytes()), paths))
    [orthanc_study] = orthanc.post("/tools/lookup", study.study_instance_uid.encode())
    study_id = str(orthanc_study["ID"])
    result = orthanc.post("/modalities/segnode/store", study_id.encode())
    if result.get("FailedInstancesCount", 0):
        raise RuntimeError(f"Orthanc could not C-STORE the study to the node: {result}")
    wait_for(
        lambda: {"SEG", "SR"} <= set(orthanc.series_by_modality(study_id)),
        timeout,
        "the node's SEG and SR in Orthanc",
        interval=0.25,
    )
    return str(study.study_instance_uid), study_id


@contextlib.contextmanager
def running_stack(
    workdir: Path,
    *,
    orthanc_program: str = "Orthanc",
    viewer_port: int = 0,
    models: Sequence[Path] = (DEFAULT_MODEL,),
) -> Iterator[tuple[OrthancWeb, ViewerServer, Any]]:
    """Orthanc (DICOMweb) + the viewer server + the node with ``models`` (default: the shipped model)
    promoted, all stopped on exit."""
    # The node's port stays bound here while Orthanc and the viewer start (they pick free ports and
    # open connections too), so that none of them can take it before the node listens on it: a CI run
    # once failed with "Address already in use" when the port was only picked, not held.
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    node_port = int(holder.getsockname()[1])
    viewer = node = None
    try:
        orthanc = OrthancWeb(workdir / "orthanc", orthanc_program, node_port)
    except BaseException:
        holder.close()
        raise
    try:
        viewer = ViewerServer(orthanc.http, viewer_port)
        holder.close()
        node = start_node(workdir / "node", node_port, orthanc.dicom, models)
        yield orthanc, viewer, node
    finally:
        holder.close()
        if node is not None:
            node.stop()
        if viewer is not None:
            viewer.stop()
        orthanc.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """``make viewer``: start the stack, send the demo case through it, print the URL, wait for Ctrl-C."""
    from node.demo import DEFAULT_CASE

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=9042, help="viewer HTTP port (default 9042)")
    parser.add_argument("--case", type=Path, default=DEFAULT_CASE)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument(
        "--regions",
        action="store_true",
        help=f"also promote the brats_regions candidate ({REGIONS_MODEL.relative_to(REPO)}): the four-series "
        "study gets a segment per tissue",
    )
    args = parser.parse_args(argv)
    from db.exceptions import RegistryError
    from node.exceptions import NodeError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    orthanc_program = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin")
    if orthanc_program is None:
        print("viewer: Orthanc is not installed (Debian packages orthanc, orthanc-dicomweb)", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="segnode-viewer-"))
    try:
        models = (DEFAULT_MODEL, REGIONS_MODEL) if args.regions else (DEFAULT_MODEL,)
        with running_stack(
            workdir, orthanc_program=orthanc_program, viewer_port=args.port, models=models
        ) as stack:
            orthanc, viewer, _ = stack
            print(f"viewer: Orthanc {orthanc.url} (DICOM port {orthanc.dicom}); OHIF {viewer.url}/")
            print(f"viewer: sending {args.case.name} PACS -> node -> PACS ...", flush=True)
            uid, _ = push_case(orthanc, args.case, workdir / "study", None)
            print(f"viewer: open {viewer.url}/viewer?StudyInstanceUIDs={uid}")
            print("viewer: double-click the SEG thumbnail to load the segmentation; Ctrl-C stops everything")
            stop.wait()
    except KeyboardInterrupt:
        pass
    except (OSError, RuntimeError, TimeoutError, NodeError, RegistryError) as exc:
        print(f"viewer: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print("viewer: stopped")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
