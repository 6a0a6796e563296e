"""Node configuration: ``node.toml`` with a default for every key, overridden by ``SEGNODE_*``.

Environment:

* ``SEGNODE_HOME`` — the var dir (database, spool, logs, models); default ``./var``.
* ``SEGNODE_CONFIG`` — path of the config file when ``--config`` is not given.
* ``SEGNODE_DATABASE_URL`` — overrides ``[database] url`` (set but empty: ignored, as db/url.py does).
* ``SEGNODE_<SECTION>_<KEY>`` — overrides any scalar key, e.g. ``SEGNODE_NODE_PORT=11113``; one naming no
  key is logged as a warning and ignored.
"""

from __future__ import annotations

import difflib
import ipaddress
import logging
import math
import os
import re
import ssl
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from db.url import default_url, var_dir
from node.dimse import ae_title_problem
from node.exceptions import ConfigError

if TYPE_CHECKING:
    from converters.registration import RegistrationSettings

logger = logging.getLogger(__name__)


@dataclass
class NodeSettings:
    """``[node]``: the SCP's identity, limits and spool."""

    ae_title: str = "SEGNODE"
    host: str = "127.0.0.1"
    port: int = 11112
    spool_dir: str = ""  # empty: <var>/spool
    study_idle_seconds: float = 10.0
    # A chosen series with fewer images than its headers announce (ImagesInAcquisition; a pause in the
    # PACS's sending longer than study_idle_seconds) waits for the rest this long after its job was
    # queued, then is analysed as received (node/pipeline.py). 0: never waits.
    incomplete_series_wait_seconds: float = 120.0
    allowed_calling_aes: list[str] = field(default_factory=list)
    max_associations: int = 10  # per receiving process
    # Processes accepting C-STOREs on the port (node/receivers.py): 1 is the node's own process only;
    # more let several associations use more cores, each extra process ~85 MiB.
    receivers: int = 1
    min_free_disk_mb: int = 500
    # A study's received files leave the spool this long after its result was delivered (job done,
    # every send acknowledged; node/spool_retention.py). 0: kept for ever (until the disk floor).
    spool_keep_hours: float = 168.0
    # A study whose latest run failed or was skipped (nothing was sent: no FLAIR, an unreadable series)
    # leaves the spool this long after that run ended: time for `segnode jobs retry`. The rows of
    # instances acknowledged and not kept (non-MR, no file) are forgotten this long after they arrived.
    # 0: kept for ever.
    failed_keep_hours: float = 720.0
    inference_device: str = "CPU"
    workers: int = 1
    # The task whose shipped model bootstrap_default_model installs; also the last resort of
    # [routing] order (appended there when absent), which decides per study which model runs.
    task: str = "whole_tumor"
    poll_seconds: float = 1.0  # how often workers and sender look for work that no event announced
    # Early analysis (node/early.py): read, mask and segment a series once the PACS has moved on to the
    # next series of the study (or none of its instances came for early_quiet_seconds), so that the job
    # finds the work done when the study is complete. Off: every step waits for study_idle_seconds.
    early_analysis: bool = True
    early_quiet_seconds: float = 2.0
    # Nice value of the analysis threads (early analysis, the inference engines' and registration's
    # worker pools; node/priority.py): receiving keeps the CPU when both want it. 0: same as receiving.
    analysis_nice: int = 10
    send_retry_base_seconds: float = 5.0  # first retry delay of a failed C-STORE; doubles each attempt
    send_retry_max_seconds: float = 600.0
    # A send the destination refused this many times for good (SOP class not supported or not
    # accepted, data set refused) ends `refused` and is not tried again; 0: never give up. Connection
    # failures and timeouts are retried for ever.
    send_max_refusals: int = 10
    stale_job_seconds: float = 300.0  # a running job whose heartbeat is older is re-queued
    # At start, when the task has no active model: import and promote the shipped model (node/bootstrap.py).
    bootstrap_default_model: bool = True
    default_model_dir: str = ""  # empty: the shipped models/default
    # The brain extractor (task brain_extraction) bootstrap_default_model installs: empty, the shipped
    # models/brain_extraction.
    brain_extractor_dir: str = ""

    def spool_path(self) -> Path:
        """Absolute spool directory."""
        return Path(self.spool_dir).absolute() if self.spool_dir else var_dir() / "spool"

    def default_model_path(self) -> Path:
        """The model that :attr:`bootstrap_default_model` installs."""
        from node.bootstrap import SHIPPED_MODEL_DIR

        return Path(self.default_model_dir).absolute() if self.default_model_dir else SHIPPED_MODEL_DIR

    def brain_extractor_path(self) -> Path:
        """The brain extractor that :attr:`bootstrap_default_model` installs."""
        from node.bootstrap import SHIPPED_BRAIN_EXTRACTOR_DIR

        if self.brain_extractor_dir:
            return Path(self.brain_extractor_dir).absolute()
        return SHIPPED_BRAIN_EXTRACTOR_DIR

    def jobs_path(self) -> Path:
        """Where each job keeps its outputs (SEG, SR, preview): beside the spool."""
        return self.spool_path().parent / "jobs"


@dataclass
class SelectionSettings:
    """``[selection]``: series-selection rules (node/selection.py); regexes are case-insensitive."""

    flair_pattern: str = r"flair|\bdark.?fluid|\btirm"
    # Descriptions are hints (attributes decide first); English, German (KM, Kontrast), Italian (mdc),
    # French and Spanish words, GE's "C+". Words, not parts of words: "post" is no post-contrast in
    # postop, post-op, "post op", posterior or "post fossa" (posterior fossa), nor is "t1c" in T1COR
    # (coronal). A native T1 read as post-contrast runs the four-series model on a T1GD without contrast.
    t1gd_pattern: str = (
        r"\bpost\b(?![-. ]*(op(?![a-z])|operat|surg|fossa))|\bpost(gd|gad|c|ce|km|mdc)\b|\+ ?c\b|\bc ?\+"
        r"|\bgd\b|gado|contrast|kontrast|\bkm\b|\bmdc\b|\bce\b|t1(c|ce|gd)\b"
    )
    t1_pattern: str = r"\bt1|mprage|mp-rage|spgr|bravo|tfl"
    # A description that says pre-contrast is never taken for post-contrast ("T1 pre contrast", "T1 KM-",
    # "T1 -KM", "KM neg", "ohne KM", "kein KM", "KM-frei"); "pre-op" says nothing of contrast.
    t1_pre_pattern: str = (
        r"\bpre\b(?![-. ]*(op(?![a-z])|operat|surg))|pre[- ]?(contrast|gd|gado)|\bnativ|without|\bw/?o\b"
        r"|non[- ]?contrast|\bvor\b|\bohne\b|\bkeine?\b|\bkm-(?!\w)|(^|\s)-km\b|\bkm ?neg|km[- ]?frei"
        r"|\bsenza\b|\bsans\b|\bsin\b"
    )
    t2_pattern: str = r"\bt2(?!\*)|\btse\b|\bfse\b"
    # A double inversion recovery (DIR: white matter nulled as well as fluid) has a FLAIR's long TI and
    # TE, and is no FLAIR; its TIs are not told apart in the header, so its name says it. Angiogram and
    # perfusion names exclude a series only where its description names no sequence of a role
    # (node/selection.py ANGIO_PERFUSION_NAMES): "T2 FLAIR post DSC" is a FLAIR.
    exclude_pattern: str = (
        r"localizer|scout|survey|calibration|\bdwi\b|\badc\b|perfusion|\bswi|\bswan\b|susceptib|\bt2\*"
        r"|\bdir\b|double.?(ir|inv)"
    )
    flair_min_ti_ms: float = 1500.0
    flair_min_te_ms: float = 80.0
    t1_max_te_ms: float = 30.0
    t2_min_te_ms: float = 60.0
    # A gradient echo with a TE this long is T2*-weighted (T2* GRE, SWI), never a T1 (node/selection.py).
    t2star_min_te_ms: float = 12.0


@dataclass
class QCSettings:
    """``[qc]``: limits of the checks a result passes before anything is sent (node/qc.py).

    A study that fails one ends ``review`` and sends nothing until ``segnode jobs retry ID
    --send-anyway``. To switch a rule off, widen its limit (e.g. ``min_slices = 1``).
    """

    # Brain volume (mL) of the brain mask. Adult brain volumes are about 1.0-1.5 L (mean total brain
    # volume ~1.26 L in men and ~1.13 L in women, Allen et al. 2002, Am J Phys Anthropol 118:341)
    # and intracranial volume, which a brain mask that keeps the CSF approaches, about 1.2-1.9 L
    # (Buckner et al. 2004, NeuroImage 23:724). 800 mL lies below severe atrophy and small adult
    # heads; 2200 mL above the largest intracranial volumes. Outside: a wrong mask or not a head at
    # all. A series that is a slab through the brain (its mask reaches the first or last slice, and
    # it covers under 120 mm along its slice normal) is not checked against min_brain_ml; a tumour
    # reaching a cut fails tumour_within_coverage instead (max_tumour_at_cut_ml below).
    min_brain_ml: float = 800.0
    max_brain_ml: float = 2200.0
    # Whole tumour (with oedema) as a share of the brain, in %. On the 9 BraTS training cases here
    # (data/train) it is 2.7-14.0 % of a 1.29-1.62 L brain mask (node/README.md "Checks"); 30 %
    # leaves room for the largest gliomas and catches a model outlining the whole brain (~100 %)
    # or a hemisphere (~50 %).
    max_tumour_share_percent: float = 30.0
    # A caution, not a hold (node/qc.py caution ``large_tumour``): a whole tumour over this share of the
    # brain (%) is sent with a note in the SR and the job that its volume is to be taken as a lower bound.
    # The shipped models were trained on tumours of at most 14.0 % of the brain (above) and under-call
    # larger ones: BraTS2021_00031's tumour grown to 456 mL (~30 % of its brain) inside the brain was
    # called 264 mL (README.md "Where the shipped model is known to be wrong"). 0: no caution.
    caution_tumour_share_percent: float = 15.0
    # A caution, not a hold (node/qc.py caution ``small_tumour``): a whole tumour above 0 and under this
    # many mL is sent with a note in the SR and the job to check it against the images before reading it
    # as a tumour. Training cases made tumour-free by mirroring (docs/tumour-free-2026-12-06.md) came back
    # with up to 4.0 mL of false tumour in 12 of 18 studies through the node; the 8 train/brats gliomas are
    # 38-213 mL. 0: no caution.
    caution_small_tumour_ml: float = 5.0
    # Tumour (mL) within 3 mm of the skull-base (lowest) slice of an axial series covering a whole brain's
    # height (120 mm), its brain cut there alone (tumour_within_coverage), up to which the study is still
    # sent: a few voxels there (bright CSF or vessel inflow at the skull base of a 2D FLAIR whose brain mask
    # reaches its last slice) are not a tumour cut by the series. A slab (under 120 mm) gets no allowance: one
    # grazing a large tumour's pole has a fraction of a mL at its cut and most of the tumour outside. Measured
    # with the shipped model and brain extractor on its validation cases BraTS2021_00005 and _00006 written as
    # 5 mm axial FLAIR slabs of 11-14 slices cut at 6-90 % of the tumour's height: 2.1-17.0 mL within the
    # margin (the truth's 2.6-17.3 mL; 1.6-132 mL missed); a slab reaching 3 % into the tumour: 0 mL called at
    # the cut (truth 0.25-0.62 mL). Bright 5 x 5 pixel spots (1.3 x the 99.9th percentile) on the two lowest
    # slices of a series starting at the skull base: nothing called. One voxel of a 5 mm series is ~5 uL: 0.5
    # mL is ~100 of them, a quarter of the smallest cut seen.
    max_tumour_at_cut_ml: float = 0.5
    # Slices of the (thinnest-covered) series: 8 x 6 mm still under half a brain's height.
    min_slices: int = 8
    # Foreground of the image (node/qc.py head_mask), mL: under it, a blank or pure-noise series.
    # 8 slices of 1 mm through a brain already hold ~100 mL.
    min_head_ml: float = 50.0
    # Share (%) of the predicted tumour lying outside the brain mask (removed before the SEG) above
    # which the rest is not trusted either.
    max_outside_share_percent: float = 50.0
    # whole_tumour_agreement (node/qc.py): a several-series model's whole tumour (the union of its
    # tissues) against the whole_tumor (FLAIR) model's on the same study; false: not checked. Fails when
    # their Dice is under whole_tumour_min_dice, or their volumes differ by more than
    # whole_tumour_max_diff_percent (of the larger) and by more than whole_tumour_max_diff_ml; Dice is
    # not judged when both are under whole_tumour_max_diff_ml (a few voxels decide it there). Measured
    # through the node on studies of the regions model's validation cases (node/README.md "Checks"):
    # BraTS2021_00005 without a bias field, Dice 0.89 and 13.5-14.0 % apart (regions 9 % over the
    # truth, the FLAIR model 5 % under); with a bias field per series, 25.0-27.8 % apart (42-49 mL; the
    # regions model 44-50 mL over the truth, Dice 0.80 against it); BraTS2021_00014, where the regions model
    # misses (0.8-4.3 mL of 38) or invents (93 mL) oedema, Dice 0.04-0.18 and 65-98 % apart. 20 %
    # passes the sound results with 6 points to spare and holds the biased ones; Dice 0.5 holds a
    # tumour outlined elsewhere whatever its volume.
    compare_whole_tumour: bool = True
    whole_tumour_min_dice: float = 0.5
    whole_tumour_max_diff_percent: float = 20.0
    whole_tumour_max_diff_ml: float = 10.0
    # A several-series model's result takes its whole tumour from the whole_tumor (FLAIR) model's, run
    # on the same FLAIR series for the check above: the tumour core (non-enhancing/necrotic and
    # enhancing) is kept inside that tumour, the rest of it is oedema, nothing lies outside it. The FLAIR
    # model outlines the whole tumour better (trained on more cases, FLAIR shows oedema); the
    # several-series model sees enhancement. Measured through the node's segmenter on the 8 train/brats
    # cases (docs/holdout_eval/regions-extent-2026-12-06.md): on BraTS2021_00005, held out from both
    # models, WT / TC / ET 0.909 / 0.813 / 0.708 -> 0.949 / 0.843 / 0.742; whole tumour up on all 8, tumour
    # core on 7. False: the several-series model's own tissues, everywhere it put them.
    whole_tumour_from_flair_model: bool = True


@dataclass
class RoutingSettings:
    """``[routing]``: which model runs a study (node/pipeline.py).

    The node keeps one active model per task (``segnode models promote``); per study it runs the
    first task of ``order`` that has an active model, all the series that model's card asks for, and
    (for more than one series) a registration that passed its check. A task missing from ``order``
    never runs; ``[node] task`` is appended when it is not in the list.
    """

    order: list[str] = field(default_factory=lambda: ["brats_regions", "whole_tumor"])

    def tasks(self, node_task: str) -> list[str]:
        """``order`` with ``node_task`` appended when absent, duplicates dropped."""
        return list(dict.fromkeys([*self.order, node_task]))


@dataclass
class RegistrationConfig:
    """``[registration]``: co-registration of a study's series onto the reference (node/coregistration.py).

    Every series of a multi-sequence model is placed on the reference series' grid by its DICOM
    geometry, then refined by a rigid registration (Mattes mutual information, SimpleITK); a
    registration that moves a series further than the limits, or ends less similar than it started,
    fails, and the study falls back to the next model of ``[routing] order``.
    """

    enabled: bool = True
    # The series whose grid the others join (and the SEG's source series): FLAIR, or the model's first
    # modality when it has no FLAIR.
    reference: str = "FLAIR"
    # Patients move a few mm and degrees between series of one study; more is a failed registration.
    max_translation_mm: float = 20.0
    max_rotation_deg: float = 15.0
    # Mattes MI (lower is more similar) may end at most this much above its geometry-only start: the
    # sampled metric varies by ~0.001, so a series already aligned passes.
    max_metric_worsening: float = 0.01
    # A series must cover at least this share of the reference's brain mask once placed: one covering
    # a slab gives the model zeros over the rest of the brain.
    min_brain_coverage: float = 0.9
    # A series that fits about as well mirrored left-right as it is (within 0.05 of Mattes MI) may be
    # flipped in its pixels or orientation header, which no rigid motion undoes: it fails
    # (converters/registration.py RegistrationSettings.mirror_margin). false: not checked.
    mirror_check: bool = True
    # A fit whose final Mattes MI is not below minus this hardly resembles the reference where it was
    # placed (noise, a fit tens of mm wrong): it fails (RegistrationSettings.min_similarity). 0: not
    # checked.
    min_similarity: float = 0.25
    # The metric runs on copies of about this spacing (mm), 2 levels (shrink 2, 1).
    working_spacing_mm: float = 2.0
    iterations: int = 100
    sampling_fraction: float = 0.08
    threads: int = 0  # 0: SimpleITK's default (every core)
    # The series of a study are registered at once, one thread each (SimpleITK works without the GIL):
    # one registration on a 2 mm copy does not keep two cores busy. 1: one after another.
    parallel: int = 3

    def settings(self) -> RegistrationSettings:
        """The algorithm's settings (:class:`converters.registration.RegistrationSettings`)."""
        from converters.registration import RegistrationSettings

        return RegistrationSettings(
            working_spacing_mm=self.working_spacing_mm,
            iterations=self.iterations,
            sampling_fraction=self.sampling_fraction,
            max_translation_mm=self.max_translation_mm,
            max_rotation_deg=self.max_rotation_deg,
            max_metric_worsening=self.max_metric_worsening,
            mirror_margin=RegistrationSettings.mirror_margin if self.mirror_check else None,
            min_similarity=self.min_similarity if self.min_similarity > 0 else None,
            threads=self.threads,
        )


@dataclass
class InferenceConfig:
    """``[inference]``: how the segmentation network runs on the prepared slices (node/segmenter.py).

    ``mirror`` is test-time augmentation by mirroring: the slices are also predicted mirrored in the
    model's grid and the probabilities averaged before the threshold
    (:func:`node.segmenter.mirrored_predictor`). "none": one pass; "lr": left-right too (2 passes);
    "lr+ap": left-right, anterior-posterior and both (4 passes). The inference stage takes about that
    many times longer.

    ``three_views``: the tasks whose models see the slices along the model grid's three axes
    (sagittal, coronal and axial), the probabilities averaged, rather than along their card's slice
    axis alone (converters/prediction.py; about three times the network's work). Chosen per task because
    it helps one model and harms another: docs/holdout_eval/views-2026-12-06.md.
    """

    mirror: str = "none"
    three_views: list[str] = field(default_factory=list)


@dataclass
class DatabaseSettings:
    """``[database]``: SQLAlchemy URL; empty means a SQLite file under the var dir."""

    url: str = ""

    def resolved_url(self) -> str:
        """The URL to connect to."""
        return self.url or default_url()


@dataclass
class Destination:
    """``[[destinations]]``: a DICOM peer that receives SEG and SR.

    ``tls_server_name`` (optional): with ``[tls] enabled``, the name the destination's certificate must
    carry when it is not ``host`` (a PACS addressed by IP whose certificate names its DNS name).
    """

    name: str
    ae_title: str
    host: str
    port: int
    tls_server_name: str = ""


#: Keys of a ``[[destinations]]`` table that must be given.
DESTINATION_REQUIRED = ("name", "ae_title", "host", "port")
#: A DNS name (letters, digits, hyphens; dot-separated labels of at most 63 characters), no wildcard.
_DNS_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"(?=.{{1,253}}$){_DNS_LABEL}(?:\.{_DNS_LABEL})*")


@dataclass
class TLSSettings:
    """``[tls]``: DICOM TLS for the SCP and SCU."""

    enabled: bool = False
    cert: str = ""
    key: str = ""
    ca: str = ""


@dataclass
class MetricsSettings:
    """``[metrics]``: HTTP port for ``/metrics`` and ``/healthz`` (0 disables)."""

    port: int = 9108
    host: str = "127.0.0.1"


@dataclass
class Settings:
    """The whole node configuration."""

    node: NodeSettings = field(default_factory=NodeSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    destinations: list[Destination] = field(default_factory=list)
    tls: TLSSettings = field(default_factory=TLSSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    selection: SelectionSettings = field(default_factory=SelectionSettings)
    qc: QCSettings = field(default_factory=QCSettings)
    routing: RoutingSettings = field(default_factory=RoutingSettings)
    registration: RegistrationConfig = field(default_factory=RegistrationConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    source: Path | None = None


_SECTIONS: dict[str, type] = {
    "node": NodeSettings,
    "database": DatabaseSettings,
    "tls": TLSSettings,
    "metrics": MetricsSettings,
    "selection": SelectionSettings,
    "qc": QCSettings,
    "routing": RoutingSettings,
    "registration": RegistrationConfig,
    "inference": InferenceConfig,
}


def _coerce(value: Any, current: Any, where: str) -> Any:
    """Coerce ``value`` to the type of the default ``current``; raise ConfigError naming ``where``."""
    try:
        if isinstance(current, bool):
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if not isinstance(value, bool):
                raise ValueError(value)
            return value
        if isinstance(current, int):
            if isinstance(value, (bool, float)):  # 11112.9 is no port, nor 2.7 a number of processes
                raise ValueError(value)
            return int(value)
        if isinstance(current, float):
            if isinstance(value, bool) or not math.isfinite(number := float(value)):
                raise ValueError(value)
            return number
        if isinstance(current, list):
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise ValueError(value)
            return [str(v) for v in value]
        if isinstance(current, str):
            if not isinstance(value, str):
                raise ValueError(value)
            return value
    except (TypeError, ValueError):
        expected = "a finite float" if isinstance(current, float) else type(current).__name__
        raise ConfigError(f"{where}: expected {expected}, got {value!r}") from None
    return value


def _build_section(cls: type, data: dict[str, Any], where: str) -> Any:
    obj = cls()
    known = {f.name for f in fields(obj)}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(known))})")
        setattr(obj, key, _coerce(value, getattr(obj, key), f"{where}.{key}"))
    return obj


def _build_destinations(raw: Any, where: str) -> list[Destination]:
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: [[destinations]] must be an array of tables")
    out = []
    for n, item in enumerate(raw):
        here = f"{where}: destinations[{n}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{here} must be a table ([[destinations]] with name, ae_title, host, port)")
        missing = [k for k in DESTINATION_REQUIRED if k not in item]
        if missing:
            raise ConfigError(f"{here}: missing {', '.join(missing)}")
        unknown = set(item) - {f.name for f in fields(Destination)}
        if unknown:
            raise ConfigError(f"{here}: unknown key {sorted(unknown)[0]!r}")
        out.append(
            Destination(
                name=_coerce(item["name"], "", f"{here}.name"),
                ae_title=_coerce(item["ae_title"], "", f"{here}.ae_title"),
                host=_coerce(item["host"], "", f"{here}.host"),
                port=_coerce(item["port"], 0, f"{here}.port"),
                tls_server_name=_coerce(item.get("tls_server_name", ""), "", f"{here}.tls_server_name"),
            )
        )
    return out


def _apply_env(
    settings: Settings, env: dict[str, str], in_file: Mapping[str, Collection[str]] | None = None
) -> dict[str, str]:
    """Apply the ``SEGNODE_<SECTION>_<KEY>`` overrides in ``env``; each applied variable's key
    (``section.key``). ``in_file``: the keys the config file sets, per section; one that a variable
    changes is logged (not its value), as an admin reading the file would not see it.

    A variable that begins like one (``SEGNODE_NODE_``) but names no key is logged as a warning and
    ignored rather than refused: Kubernetes' service links set ``<SERVICE>_PORT`` and the like for every
    Service of a namespace, and a site's own Service named e.g. ``segnode-database`` must not stop the
    node."""
    applied = {"SEGNODE_DATABASE_URL": "database.url"} if env.get("SEGNODE_DATABASE_URL") else {}
    for name in sorted(env):
        for section in _SECTIONS:
            prefix = f"SEGNODE_{section.upper()}_"
            keys = [f.name.upper() for f in fields(getattr(settings, section))]
            if name.startswith(prefix) and name[len(prefix) :] not in keys:
                close = difflib.get_close_matches(name[len(prefix) :], keys, n=1)
                logger.warning(
                    "environment variable %s names no key of [%s]%s; ignored", name, section,
                    f" (did you mean {prefix}{close[0]}?)" if close else "",
                )  # fmt: skip
    # SEGNODE_DATABASE_URL set but empty (an unset compose variable, `SEGNODE_DATABASE_URL=` in an env
    # file) is ignored, as db/url.py's resolve_database_url ignores it for `db upgrade`, `jobs` and
    # `models`: otherwise the node would run on its own SQLite file while the entrypoint migrated the
    # file's [database] url.
    if env.get("SEGNODE_DATABASE_URL"):
        settings.database.url = env["SEGNODE_DATABASE_URL"]
    for section in _SECTIONS:
        obj = getattr(settings, section)
        for f in fields(obj):
            key = f"SEGNODE_{section.upper()}_{f.name.upper()}"
            if key in env and key != "SEGNODE_DATABASE_URL":
                value = _coerce(env[key], getattr(obj, f.name), key)
                if f.name in (in_file or {}).get(section, ()) and value != getattr(obj, f.name):
                    logger.warning("%s overrides %s.%s set in the config file", key, section, f.name)
                setattr(obj, f.name, value)
                applied[key] = f"{section}.{f.name}"
    return applied


def _validate(settings: Settings, where: str) -> None:
    _validate_ae_titles(settings.node, where)
    for name, port in [("node.port", settings.node.port), ("metrics.port", settings.metrics.port)]:
        if not 0 <= port <= 65535:
            raise ConfigError(f"{where}: {name} {port} is not a TCP port")
    if settings.node.max_associations < 1:
        raise ConfigError(f"{where}: node.max_associations must be at least 1")
    if not 1 <= settings.node.receivers <= 64:
        raise ConfigError(f"{where}: node.receivers must be between 1 and 64, not {settings.node.receivers}")
    if not 0 <= (nice := settings.node.analysis_nice) <= 19:
        raise ConfigError(f"{where}: node.analysis_nice must be between 0 and 19, not {nice}")
    if (quiet := settings.node.early_quiet_seconds) < 0:
        raise ConfigError(f"{where}: node.early_quiet_seconds must be >= 0, not {quiet}")
    if not (keep := settings.node.spool_keep_hours) >= 0:  # NaN too
        raise ConfigError(f"{where}: node.spool_keep_hours must be >= 0 (0: never remove), not {keep}")
    if settings.node.send_max_refusals < 0:
        raise ConfigError(f"{where}: node.send_max_refusals must be >= 0 (0: never give up)")
    if not (keep := settings.node.failed_keep_hours) >= 0:
        raise ConfigError(f"{where}: node.failed_keep_hours must be >= 0 (0: never remove), not {keep}")
    _validate_node_timing(settings.node, where)
    _validate_destinations(settings.destinations, where)
    qc = settings.qc
    if not 0 <= qc.min_brain_ml <= qc.max_brain_ml:
        raise ConfigError(f"{where}: qc.min_brain_ml {qc.min_brain_ml} must be >= 0 and <= qc.max_brain_ml")
    for name in (
        "max_tumour_share_percent", "caution_tumour_share_percent", "max_outside_share_percent",
        "whole_tumour_max_diff_percent",
    ):
        if not 0 <= getattr(qc, name) <= 100:
            raise ConfigError(f"{where}: qc.{name} {getattr(qc, name)} is not a percentage (0-100)")
    if qc.min_slices < 1 or qc.min_head_ml < 0:
        raise ConfigError(f"{where}: qc.min_slices must be at least 1 and qc.min_head_ml at least 0")
    if not qc.caution_small_tumour_ml >= 0:
        small = qc.caution_small_tumour_ml
        raise ConfigError(f"{where}: qc.caution_small_tumour_ml must be >= 0 (0: off), not {small}")
    if not qc.max_tumour_at_cut_ml >= 0:
        raise ConfigError(f"{where}: qc.max_tumour_at_cut_ml must be >= 0, not {qc.max_tumour_at_cut_ml}")
    if not 0 <= qc.whole_tumour_min_dice <= 1 or not qc.whole_tumour_max_diff_ml >= 0:
        raise ConfigError(
            f"{where}: qc.whole_tumour_min_dice must be between 0 and 1 and qc.whole_tumour_max_diff_ml >= 0"
        )
    from db.models import SEGMENTATION_TASKS

    unknown = [t for t in settings.routing.order if t not in SEGMENTATION_TASKS]
    if unknown or not settings.routing.order:
        raise ConfigError(
            f"{where}: routing.order {settings.routing.order!r} must name tasks among "
            f"{', '.join(SEGMENTATION_TASKS)}"
        )
    reg = settings.registration
    if reg.reference not in ("FLAIR", "T1", "T1GD", "T2"):
        raise ConfigError(f"{where}: registration.reference {reg.reference!r} is not FLAIR, T1, T1GD or T2")
    if reg.max_translation_mm <= 0 or reg.max_rotation_deg <= 0 or reg.working_spacing_mm <= 0:
        raise ConfigError(
            f"{where}: registration.max_translation_mm, max_rotation_deg and working_spacing_mm must be > 0"
        )
    if not 0 < reg.sampling_fraction <= 1 or reg.iterations < 1:
        raise ConfigError(
            f"{where}: registration.sampling_fraction must lie in (0, 1] and iterations be at least 1"
        )
    if not 0 <= reg.min_brain_coverage <= 1:
        raise ConfigError(f"{where}: registration.min_brain_coverage must lie in [0, 1]")
    if not reg.min_similarity >= 0:
        raise ConfigError(f"{where}: registration.min_similarity must be >= 0 (0: not checked)")
    if reg.parallel < 1 or reg.threads < 0:
        raise ConfigError(f"{where}: registration.parallel must be at least 1 and threads at least 0")
    _validate_inference(settings.inference, where)
    _validate_selection(settings.selection, where)
    if settings.tls.enabled and not (settings.tls.cert and settings.tls.key):
        raise ConfigError(f"{where}: tls.enabled needs tls.cert and tls.key")


def _validate_node_timing(node: NodeSettings, where: str) -> None:
    """The task, workers, waits and limits of ``[node]`` that its loops and queues run on."""
    from db.models import SEGMENTATION_TASKS

    if node.task not in SEGMENTATION_TASKS:
        raise ConfigError(f"{where}: node.task {node.task!r} is not one of {', '.join(SEGMENTATION_TASKS)}")
    if node.workers < 1:
        raise ConfigError(f"{where}: node.workers must be at least 1, not {node.workers}")
    for name in ("poll_seconds", "send_retry_base_seconds", "stale_job_seconds"):
        if not getattr(node, name) > 0:  # 0: the loops spin, every running job is stale at once
            raise ConfigError(f"{where}: node.{name} must be > 0, not {getattr(node, name)}")
    for name in ("study_idle_seconds", "min_free_disk_mb", "incomplete_series_wait_seconds"):
        if getattr(node, name) < 0:
            raise ConfigError(f"{where}: node.{name} must be >= 0, not {getattr(node, name)}")
    if node.send_retry_max_seconds < node.send_retry_base_seconds:
        raise ConfigError(
            f"{where}: node.send_retry_max_seconds {node.send_retry_max_seconds} must be >= "
            f"node.send_retry_base_seconds {node.send_retry_base_seconds}"
        )


def _validate_destinations(destinations: list[Destination], where: str) -> None:
    """Each destination has a name of its own, an AE title (PS3.5 6.2), a host and a TCP port.

    Send rows are keyed by the destination's name: two destinations of one name would share them, and
    the second would never be sent to.
    """
    seen: dict[str, int] = {}
    for n, dest in enumerate(destinations):
        here = f"{where}: destinations[{n}]"
        if not dest.name.strip():
            raise ConfigError(f"{here}.name is empty")
        if dest.name in seen:
            raise ConfigError(f"{here}.name {dest.name!r} is already destinations[{seen[dest.name]}]'s name")
        seen[dest.name] = n
        if problem := ae_title_problem(dest.ae_title):
            raise ConfigError(f"{here}.ae_title {dest.ae_title!r} {problem}")
        if not dest.host.strip():
            raise ConfigError(f"{here}.host is empty")
        if not 1 <= dest.port <= 65535:
            raise ConfigError(f"{here}.port {dest.port} is not a TCP port (1-65535)")
        if dest.tls_server_name and not _is_server_name(dest.tls_server_name):
            raise ConfigError(
                f"{here}.tls_server_name {dest.tls_server_name!r} is not a DNS name or IP address (the name "
                "the destination's TLS certificate carries, without port, scheme or wildcard)"
            )


def _is_server_name(name: str) -> bool:
    """Whether ``name`` is a DNS name or an IP address that a certificate can be checked against."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return _DNS_NAME.fullmatch(name.rstrip(".")) is not None
    return True


def _validate_ae_titles(node: NodeSettings, where: str) -> None:
    """``node.ae_title`` and each of ``node.allowed_calling_aes`` is an AE title (PS3.5 6.2)."""
    if problem := ae_title_problem(node.ae_title):
        raise ConfigError(f"{where}: node.ae_title {node.ae_title!r} {problem}")
    for n, ae in enumerate(node.allowed_calling_aes):
        if problem := ae_title_problem(ae):
            raise ConfigError(f"{where}: node.allowed_calling_aes[{n}] {ae!r} {problem}")


def _validate_selection(selection: SelectionSettings, where: str) -> None:
    """Every ``*_pattern`` of ``[selection]`` compiles (node/selection.py compiles them at start)."""
    for f in fields(selection):
        if f.name.endswith("_pattern"):
            pattern = getattr(selection, f.name)
            try:
                re.compile(pattern, re.IGNORECASE)
            except re.error as exc:
                raise ConfigError(
                    f"{where}: selection.{f.name} {pattern!r} is not a regular expression: {exc}"
                ) from None


def _read_pem(path: str, key: str, marker: str, what: str, where: str) -> None:
    """``path`` (the value of ``tls.<key>``) can be read and holds a PEM block ``marker``."""
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{where}: tls.{key} {path}: cannot read it: {exc.strerror or exc}") from None
    if not re.search(rb"-----BEGIN " + marker.encode() + rb"-----", text):
        raise ConfigError(f"{where}: tls.{key} {path}: not a PEM {what} (no '-----BEGIN {marker}-----')")


def _check_tls_files(tls: TLSSettings, where: str) -> None:
    """With ``[tls] enabled``: cert and key are readable PEM files that make a chain; ca likewise."""
    if not tls.enabled:
        return
    _read_pem(tls.cert, "cert", "CERTIFICATE", "certificate", where)
    _read_pem(tls.key, "key", "(?:[A-Z]+ )?PRIVATE KEY", "private key", where)
    if tls.ca:
        _read_pem(tls.ca, "ca", "CERTIFICATE", "certificate", where)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(tls.cert, tls.key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"{where}: tls.cert and tls.key do not make a certificate chain "
            f"({tls.cert}, {tls.key}): {exc}"
        ) from None
    if tls.ca:
        try:
            context.load_verify_locations(tls.ca)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"{where}: tls.ca {tls.ca}: not usable as CA certificates: {exc}") from None


def _validate_inference(inference: InferenceConfig, where: str) -> None:
    from node.segmenter import MIRROR_MODES

    if inference.mirror not in MIRROR_MODES:
        known = ", ".join(repr(m) for m in MIRROR_MODES)
        raise ConfigError(f"{where}: inference.mirror {inference.mirror!r} is not one of {known}")
    from db.models import SEGMENTATION_TASKS

    unknown = [t for t in inference.three_views if t not in SEGMENTATION_TASKS]
    if unknown:
        raise ConfigError(
            f"{where}: inference.three_views names {unknown[0]!r}, not a task among "
            f"{', '.join(SEGMENTATION_TASKS)}"
        )


def load_settings(
    path: Path | str | None = None, env: dict[str, str] | None = None, *, check_files: bool = True
) -> Settings:
    """Read the config file (``path``, else ``$SEGNODE_CONFIG``, else defaults) and apply env overrides.

    ``check_files`` False checks the values only, not that the files they name (``[tls]``) can be
    used here: for a config written for another machine, such as the Helm chart's rendered one.

    Raises
    ------
    ConfigError
        The file is missing, unreadable or not UTF-8 TOML, a key is unknown or of the wrong type,
        or a value is one the node cannot run with; the message names the file and the key.
    """
    env = dict(os.environ) if env is None else env
    if path is None and env.get("SEGNODE_CONFIG"):
        path = env["SEGNODE_CONFIG"]
    settings = Settings()
    where = "defaults"
    in_file: dict[str, list[str]] = {}  # the keys the file sets, per section
    if path is not None:
        file = Path(path)
        where = str(file)
        if not file.is_file():
            raise ConfigError(f"config file {file} does not exist")
        try:
            raw = tomllib.loads(file.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file}: not valid TOML: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{file}: not UTF-8 text (TOML is UTF-8): {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{file}: cannot read it: {exc.strerror or exc}") from None
        for key, value in raw.items():
            if key == "destinations":
                settings.destinations = _build_destinations(value, where)
            elif key in _SECTIONS:
                if not isinstance(value, dict):
                    raise ConfigError(f"{where}: [{key}] must be a table")
                setattr(settings, key, _build_section(_SECTIONS[key], value, f"{where}: {key}"))
            else:
                raise ConfigError(f"{where}: unknown section [{key}]")
        settings.source = file
        in_file = {name: list(keys) for name, keys in raw.items() if name in _SECTIONS}
    applied = _apply_env(settings, env, in_file)
    try:
        _validate(settings, where)
        if check_files:
            _check_tls_files(settings.tls, where)
    except ConfigError as exc:
        # A bad value may come from the environment, not the file: name the variables of the keys named.
        named = [name for name, key in applied.items() if key in str(exc)]
        if named:
            raise ConfigError(f"{exc} (from the environment: {', '.join(named)})") from None
        raise
    return settings
