"""``segnode serve``: the SCP, worker threads, the sender and the metrics endpoint in one process
(with ``[node] receivers`` > 1, more processes receive on the same port: node/receivers.py).

Start-up order: the inference device checked (an absent device is a start-up error, and leaves the
database untouched), database upgraded to head, jobs left running by a dead process queued again, the
active model loaded (none is not an error: jobs wait queued until one is promoted), then the SCP,
workers, sender and HTTP.
"""

from __future__ import annotations

import importlib
import logging
import math
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from pydicom.dataset import Dataset

from db import instances, job_queue, send_queue
from db.exceptions import DatabaseOperationError, DatabaseUnavailableError
from db.registry import Registry
from db.session import make_engine, make_session_factory, upgrade
from node.bootstrap import bootstrap_default_model
from node.config import Settings
from node.early import EarlyAnalysis
from node.exceptions import NodeError
from node.memory import trim_heap
from node.metrics import MetricsServer, NodeMetrics
from node.pipeline import JobContext, run_job
from node.priority import lower_native_threads, lower_this_thread
from node.read_ahead import ReadAhead
from node.receivers import ReceiverPool
from node.runtime import BrainExtractorRuntime, ModelRuntime, check_device
from node.scp import StorageSCP
from node.selection import SeriesSelector, exam_protocols, protocol_key, series_info
from node.sender import Sender, client_tls_context
from node.spool_retention import (
    RETENTION_CHECK_SECONDS,
    STALE_SWEEP_SECONDS,
    apply_retention,
    sweep_stale_temporaries,
)

logger = logging.getLogger(__name__)

#: Seconds between checks for jobs whose owner stopped heart-beating (other hosts).
STALE_CHECK_SECONDS = 30.0
#: Shortest wait of an idle worker (a study due now, or the start-up quiet period just ending).
MIN_WAIT_SECONDS = 0.01
#: How often early analysis looks for settled series (at most; ``poll_seconds`` when shorter); the SCP
#: also wakes it when a study's instances move on to another series.
EARLY_POLL_SECONDS = 0.25
#: The most a stop (SIGTERM, SIGHUP, SIGINT) waits in all for the running job, early analysis and the
#: deliveries: below the Helm chart's terminationGracePeriodSeconds (60), so that the node closes its
#: database and logs before the kubelet's SIGKILL.
STOP_SECONDS = 45.0


class _Outage:
    """Logs a database outage once when it starts (one line, no traceback) and once when it ends."""

    def __init__(self) -> None:
        self.since: float | None = None

    def failed(self, loop: str, exc: DatabaseUnavailableError, poll: float) -> None:
        if self.since is None:
            self.since = time.monotonic()
            # The message is one line naming the driver's error ("OperationalError: connection failed").
            logger.error("%s: database unreachable (%s); retrying every %.1f s", loop, exc, poll)

    def recovered(self, loop: str) -> None:
        if self.since is not None:
            logger.warning("%s: database reachable again after %.1f s", loop, time.monotonic() - self.since)
            self.since = None


class NodeService:
    """The running node.

    Parameters
    ----------
    settings:
        The whole configuration.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        check_device(settings.node.inference_device)  # before the database is created or migrated
        url = settings.database.resolved_url()
        upgrade(url)
        self.engine = make_engine(url)
        self.sf = make_session_factory(self.engine)
        self.metrics = NodeMetrics()
        self.registry = Registry(self.sf)
        node = settings.node
        # One runtime per task of [routing] order; ``runtime`` is [node] task's (the shipped model's).
        self.runtimes = {
            task: ModelRuntime(
                self.registry, task, node.inference_device, mirror=settings.inference.mirror,
                views=3 if task in settings.inference.three_views else 1,
            )
            for task in settings.routing.tasks(node.task)
        }
        self.runtime = self.runtimes[node.task]
        self.brain_runtime = BrainExtractorRuntime(self.registry, node.inference_device)
        self.scp = StorageSCP(node, self.sf, self.metrics, settings.tls, shared_port=node.receivers > 1)
        self.receivers: ReceiverPool | None = None
        self.sender = Sender(
            self.sf,
            self.metrics,
            node.ae_title,
            node.send_retry_base_seconds,
            node.send_retry_max_seconds,
            tls=client_tls_context(settings.tls),
            max_refusals=node.send_max_refusals,
            server_names={d.name: d.tls_server_name for d in settings.destinations if d.tls_server_name},
            addresses={d.name: (d.ae_title, d.host, d.port) for d in settings.destinations},
        )
        self.context = JobContext(
            sf=self.sf,
            selector=SeriesSelector(settings.selection),
            jobs_dir=node.jobs_path(),
            destinations=list(settings.destinations),
            metrics=self.metrics,
            models=lambda: [(task, runtime.current) for task, runtime in self.runtimes.items()],
            qc=settings.qc,
            brain=lambda: self.brain_runtime.current,
            registration=settings.registration,
            incomplete_series_wait=settings.node.incomplete_series_wait_seconds,
        )
        # Set when an association that delivered instances ends: the workers time the study's job.
        self._studies_received = threading.Event()
        self.scp.on_studies_received = self._studies_received.set
        # Set when a job queued outputs: the sender delivers them now, not at its next poll.
        self._outputs_queued = threading.Event()
        self.context.outputs_queued = self._outputs_queued.set
        self.early: EarlyAnalysis | None = None
        # Set when a study's instances move on to another series: early analysis looks at once.
        self._series_changed = threading.Event()
        # Set by either of the above and by each instance spooled: the early-analysis loop wakes.
        self._early_wake = threading.Event()
        self.read_ahead: ReadAhead | None = None
        if node.early_analysis:
            self.early = EarlyAnalysis(
                self.context,
                node.early_quiet_seconds,
                # The engines' worker pools, new ones included, yield to receiving (node/priority.py).
                before_run=lambda: lower_native_threads(node.analysis_nice),
            )
            self.context.early = self.early.take
            self.scp.on_series_changed = self._series_changed_now
            # What no run or job took by twice the idle wait (a series no model chose) is dropped.
            self.read_ahead = ReadAhead(
                max_age_s=2 * node.study_idle_seconds + 30.0,
                wanted=self._may_be_read,
                wake=self._early_wake.set,
            )
            self.context.read = self.read_ahead.read
            self.scp.on_stored = self.read_ahead.note
        # Jobs of this process that a database fault cut short (id -> claim attempt, error): still
        # running, they are queued again by the next worker loop that reaches the database.
        self._interrupted: dict[int, tuple[int, str]] = {}
        self._interrupted_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.http: MetricsServer | None = None
        self.started_at = time.monotonic()  # the quiet period and uptime: a wall-clock step moves neither

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start every component in the background.

        The metrics port is bound first: when it is taken, :class:`NodeError` names it and nothing has
        started (no SCP, no threads).
        """
        self.started_at = time.monotonic()  # the quiet period and uptime: a wall-clock step moves neither
        self.http = self._bind_metrics()
        try:
            self._start_components()
        except BaseException:
            if self.http:
                self.http.stop()
                self.http = None
            self.scp.stop()
            if self.receivers:
                self.receivers.stop()
            raise
        if self.http:
            self.http.start()
            logger.info("metrics on http://%s:%d/metrics", self.settings.metrics.host, self.http.port)

    def _bind_metrics(self) -> MetricsServer | None:
        """The /metrics and /healthz server, bound but not yet serving (None when metrics.port is 0)."""
        metrics = self.settings.metrics
        if not metrics.port:
            return None
        try:
            return MetricsServer(metrics.host, metrics.port, self.metrics, self.refresh_gauges, self.health)
        except OSError as exc:
            raise NodeError(
                f"metrics.port: cannot listen on {metrics.host}:{metrics.port}: {exc.strerror or exc}; "
                "set [metrics] port in node.toml (or SEGNODE_METRICS_PORT) to a free port, 0 to turn it off"
            ) from None

    def _start_components(self) -> None:
        requeued = job_queue.requeue_stale(self.sf, self.settings.node.stale_job_seconds, at_start=True)
        if requeued:
            logger.warning(
                "re-queued %d job(s) left running by a stopped process: %s", len(requeued), requeued
            )
        node = self.settings.node
        if node.bootstrap_default_model:
            bootstrap_default_model(self.registry, node.task, node.default_model_path())
            bootstrap_default_model(self.registry, "brain_extraction", node.brain_extractor_path())
        for runtime in self.runtimes.values():
            runtime.refresh()
        self.brain_runtime.refresh()
        # The job's output modules (highdicom alone takes ~0.7 s to import) load now rather than
        # during the first study's SEG stage.
        for module in ("node.seg", "node.sr", "node.preview"):
            importlib.import_module(module)
        importlib.import_module("node.seg").warm_up()
        if all(r.current is None for r in self.runtimes.values()):
            logger.warning("%s; received studies wait queued", self.runtime.last_error)
        if not self.settings.destinations:
            logger.warning(
                "no [[destinations]] configured: results stay in %s until removed by hand (spool "
                "retention removes the received files, not these)",
                self.settings.node.jobs_path(),
            )
        self.scp.start()
        if self.settings.node.receivers > 1:
            assert self.scp.server is not None and self.scp.server.socket is not None
            self.receivers = ReceiverPool(self.settings, self.scp.server.socket.fileno(), self.metrics)
            self.receivers.start()
        for n in range(max(1, self.settings.node.workers)):
            self._spawn(self._work_loop, f"segnode-worker-{n}")
        self._spawn(self._send_loop, "segnode-sender")
        if self.early is not None:
            self._spawn(self._early_loop, "segnode-early")

    def _spawn(self, target: Any, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self, timeout: float = STOP_SECONDS) -> None:
        """Stop accepting, let the running job and deliveries finish, then stop everything; all of it
        within ``timeout`` seconds in total (what is still running then is taken up again at the next
        start: the job re-queued, the sends when their lease ends)."""
        deadline = time.monotonic() + timeout

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        self.scp.stop()
        if self.receivers:
            self.receivers.stop(left())
        self._stop.set()
        self._outputs_queued.set()  # the sender's, the workers' and early analysis's waits end now
        self._studies_received.set()
        self._series_changed.set()
        self._early_wake.set()
        for thread in self._threads:
            thread.join(left())
        self.sender.shutdown(left())
        if self.http:
            self.http.stop()
        self.engine.dispose()

    def request_stop(self) -> None:
        """Make :meth:`wait` return (safe to call from a signal handler)."""
        self._stop.set()

    def wait(self) -> None:
        """Block until :meth:`stop` is called (from a signal handler)."""
        while not self._stop.wait(1.0):
            pass

    # -- loops -------------------------------------------------------------------------------------------

    def _work_loop(self) -> None:
        poll = self.settings.node.poll_seconds
        last_stale_check = time.monotonic()
        last_retention = time.monotonic() - RETENTION_CHECK_SECONDS  # a first pass at start
        last_sweep = time.monotonic() - STALE_SWEEP_SECONDS  # and a first sweep
        outage = _Outage()
        while not self._stop.is_set():
            busy = False
            try:
                self.requeue_interrupted()
                busy = self.work_once()
                if time.monotonic() - last_stale_check > STALE_CHECK_SECONDS:
                    job_queue.requeue_stale(self.sf, self.settings.node.stale_job_seconds)
                    last_stale_check = time.monotonic()
                if time.monotonic() - last_retention > RETENTION_CHECK_SECONDS:
                    last_retention = time.monotonic()
                    self.apply_retention()
                if time.monotonic() - last_sweep > STALE_SWEEP_SECONDS:
                    last_sweep = time.monotonic()
                    sweep_stale_temporaries(self.scp.spool_dir)
            except DatabaseUnavailableError as exc:  # one line per outage, not a traceback per poll
                outage.failed("worker", exc, poll)
            except Exception:  # the worker must survive anything and retry
                logger.exception("worker loop error; retrying in %.1f s", poll)
            else:
                outage.recovered("worker")
            if not busy:
                self._wait_for_work(poll)

    def requeue_interrupted(self) -> None:
        """Queue again the jobs a database fault cut short (:meth:`work_once`); raises while the
        database still fails, keeping the jobs for the next try."""
        with self._interrupted_lock:
            jobs, self._interrupted = self._interrupted, {}
        try:
            while jobs:
                job_id, (attempts, error) = next(iter(jobs.items()))
                job_queue.requeue_interrupted(self.sf, job_id, error, attempts=attempts)
                del jobs[job_id]
        finally:
            if jobs:
                with self._interrupted_lock:
                    self._interrupted.update(jobs)

    def apply_retention(self, now: datetime | None = None) -> int:
        """One spool-retention pass (node/spool_retention.py): the files of studies delivered more
        than ``[node] spool_keep_hours`` ago, and of studies whose analysis failed or was skipped more
        than ``[node] failed_keep_hours`` ago, leave the spool with their jobs' outputs; returns how
        many spool files were removed."""
        node = self.settings.node
        return apply_retention(
            self.sf,
            self.scp.spool_dir,
            node.spool_keep_hours,
            node.failed_keep_hours,
            self.metrics,
            now=now,
            jobs_dir=node.jobs_path(),
        )

    def _wait_for_work(self, poll: float) -> None:
        """Wait until the next study is due, an association delivered instances, or ``poll`` seconds
        passed, whichever comes first (a study is taken up when it becomes due, not at a later poll)."""
        self._studies_received.clear()  # before looking: an association ending meanwhile ends the wait
        wait = poll
        idle = self.settings.node.study_idle_seconds
        try:
            due_in = instances.seconds_until_due(self.sf, idle, receiving=self.scp.studies_in_flight())
        except Exception as exc:  # the loop's next work_once reports a database fault; here, just poll
            logger.debug("worker: next due study unknown (%s); polling", exc)
            due_in = None
        if due_in is not None:
            # Not before the start-up quiet period ends (work_once makes nothing due within it).
            due_in = max(due_in, idle - (time.monotonic() - self.started_at))
            wait = min(poll, max(due_in, MIN_WAIT_SECONDS))
        if not self._stop.is_set():
            self._studies_received.wait(wait)

    def work_once(self) -> bool:
        """Queue due studies, swap the model if needed, run one job; True when a job ran.

        For the first ``study_idle_seconds`` after start no study becomes due: while the node was
        down no PACS could send, so silence from before the start says nothing about a study being
        complete (a PACS re-sending after a crash would otherwise get a half-study run first).
        """
        idle = self.settings.node.study_idle_seconds
        self.scp.refresh_idle_timers()
        if time.monotonic() - self.started_at >= idle:
            instances.schedule_due_studies(self.sf, idle, receiving=self.scp.studies_in_flight())
        active = self.registry.active_ids([*self.runtimes, self.brain_runtime.task])
        serving = [runtime.refresh_to(active.get(task)) for task, runtime in self.runtimes.items()]
        if all(model is None for model in serving):
            return False
        if self.brain_runtime.refresh_to(active.get(self.brain_runtime.task)) is None and (
            self.brain_runtime.active_refused
        ):
            # Segmenting without the active extractor would send results with no brain mask (no
            # brain-only normalisation, no removal of tumour outside the brain): studies wait queued,
            # and /healthz says why (brain_extractor_error).
            return False
        claimed = job_queue.claim(self.sf)
        if claimed is None:
            return False
        job_id = claimed.job_id
        logger.info("job %d claimed (attempt %d)", job_id, claimed.attempt)
        lower_native_threads(self.settings.node.analysis_nice)  # the engines' pools, new ones included
        try:
            # The claim's attempt: should the job be re-queued and claimed again meanwhile (a stale
            # heartbeat; by another worker of this very process, same owner), this run ends nothing.
            run_job(self.context, job_id, claimed.attempt)
        except (DatabaseUnavailableError, DatabaseOperationError) as exc:
            # No fault of the study: the job stays running, ours, until the database answers again;
            # then :meth:`requeue_interrupted` queues it (the worker loop reports the outage).
            with self._interrupted_lock:
                self._interrupted[job_id] = (claimed.attempt, str(exc))
            raise
        for runtime in self.runtimes.values():  # idle until the next study: give the buffers back
            runtime.release_memory()
        trim_heap()
        return True

    def _may_be_read(self, first: Dataset, others: Sequence[Dataset] = ()) -> bool:
        """Whether a series (its first file's data set) may serve some active model's modalities, by the
        job's rule for a ProtocolName (node/selection.py :func:`exam_protocols`): one that the study's
        series judged before it (``others``, their first files) share under other descriptions names the
        exam, not the series. With none judged yet the rule cannot tell, and the series is judged as
        though its ProtocolName were the exam's: a GE exam-wide "BRAIN TUMOR PERFUSION" skipped every
        series, while a series read ahead in vain only costs a read."""
        infos = [series_info(ds, [], 1) for ds in (first, *others)]
        exam = exam_protocols(infos) if others else frozenset({protocol_key(infos[0].protocol)})
        models = [model for _, model in self.context.models() if model is not None]
        needed = {m for model in models for m in model.card["modalities"]}
        return any(self.context.selector.matches(m, infos[0], exam) for m in needed)

    def _series_changed_now(self) -> None:
        self._series_changed.set()
        self._early_wake.set()

    def _early_loop(self) -> None:
        """Early analysis of the studies being received (node/early.py): a look at the settled series
        whenever a study moves on to another series (and every poll), and between looks the files
        just spooled read ahead (node/read_ahead.py)."""
        assert self.early is not None and self.read_ahead is not None
        poll = min(self.settings.node.poll_seconds, EARLY_POLL_SECONDS)
        lower_this_thread(self.settings.node.analysis_nice)  # and the threads it starts (the brain network's)
        looked_at = -math.inf
        while not self._stop.is_set():
            self._early_wake.clear()  # before looking: anything meanwhile ends the wait below
            if self._series_changed.is_set() or time.monotonic() - looked_at >= poll:
                self._series_changed.clear()
                looked_at = time.monotonic()
                try:
                    if any(r.current is not None for r in self.runtimes.values()) and self.early.run_once():
                        continue
                except Exception:  # early analysis only saves time: never let it stop the node
                    logger.exception("early analysis loop error; retrying in %.1f s", poll)
            self.read_ahead.work(until=self._series_changed.is_set)
            self.read_ahead.expire()
            self._early_wake.wait(max(0.0, poll - (time.monotonic() - looked_at)))

    def _send_loop(self) -> None:
        poll = self.settings.node.poll_seconds
        outage = _Outage()
        while not self._stop.is_set():
            self._outputs_queued.clear()  # before looking: a job finishing meanwhile wakes the wait below
            try:
                # Deliveries run in the background, one per destination: a destination that hangs
                # holds its own sends only, and new results to the others go out at the next poll.
                self.sender.run_once(wait=False)
            except DatabaseUnavailableError as exc:  # also one raised inside a background delivery
                outage.failed("sender", exc, poll)
            except Exception:
                logger.exception("sender loop error; retrying in %.1f s", poll)
            else:
                outage.recovered("sender")
            self._outputs_queued.wait(poll)

    # -- observability -----------------------------------------------------------------------------------

    def refresh_gauges(self) -> None:
        """Update the database-derived gauges (jobs by state, queue depth, jobs held in review, pending
        and refused sends)."""
        counts = job_queue.job_counts(self.sf)
        for state, value in counts.items():
            self.metrics.jobs.labels(state).set(value)
        self.metrics.queue_depth.set(counts.get("queued", 0))
        self.metrics.jobs_in_review.set(job_queue.held_job_count(self.sf))
        self.metrics.pending_sends.set(send_queue.pending_send_count(self.sf))
        self.metrics.refused_sends.set(send_queue.refused_send_count(self.sf))
        self.metrics.studies.set(instances.instance_counts(self.sf)["studies"])

    def health(self) -> tuple[bool, dict[str, Any]]:
        """``/healthz``: ok when the database answers, the SCP listens and the workers live.

        Sends refused for good and jobs held in review are reported (``refused_sends``,
        ``jobs_in_review``, and a ``warnings`` line each) but leave it ok: the probes of deploy/helm
        restart a pod that is not, and a restart neither makes a destination accept what it refuses
        nor reviews a result.
        """
        details: dict[str, Any] = {}
        ok = True
        try:
            details["jobs"] = job_queue.job_counts(self.sf)
            refused = send_queue.refused_send_count(self.sf)
            held = job_queue.held_job_count(self.sf)
        except Exception as exc:
            ok = False
            details["database"] = f"error: {type(exc).__name__}"
        else:
            details["refused_sends"] = refused
            details["jobs_in_review"] = held
            warnings = []
            if refused:
                warnings.append(
                    f"{refused} sends refused for good by their destination, not delivered: "
                    "segnode jobs list shows their jobs, segnode jobs show ID why; segnode jobs retry ID "
                    "sends again, segnode jobs dismiss ID acknowledges them"
                )
            if held:
                # Spool retention keeps a held study's files: left unreviewed, they fill the disk.
                warnings.append(
                    f"{held} jobs held in review by a QC check, their results not sent and their studies "
                    "kept in the spool: segnode jobs list --status review lists them, segnode jobs show ID "
                    "why; segnode jobs retry ID --send-anyway sends the result as it is, segnode jobs retry "
                    "ID runs the study again, segnode jobs dismiss ID drops the result unsent"
                )
            if warnings:
                details["warnings"] = warnings
        model = self.runtime.current
        details["model"] = model.label if model else None
        if self.runtime.last_error:
            details["model_error"] = self.runtime.last_error
        details["models"] = {
            task: (r.current.label if r.current else None) for task, r in self.runtimes.items()
        }
        brain = self.brain_runtime.current
        details["brain_extractor"] = brain.label if brain else None
        if self.brain_runtime.last_error:
            details["brain_extractor_error"] = self.brain_runtime.last_error
        details["scp"] = self.scp.server is not None
        details["threads_alive"] = all(t.is_alive() for t in self._threads)
        if self.receivers:
            details["receivers"] = self.receivers.describe()
        ok = ok and details["scp"] and details["threads_alive"]
        ok = ok and (self.receivers is None or self.receivers.alive())
        details["uptime_s"] = round(time.monotonic() - self.started_at, 1)
        return ok, details
