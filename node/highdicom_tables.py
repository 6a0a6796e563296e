"""highdicom's tables of the standard, cut to the objects the node reads and writes.

highdicom looks up which modules an IOD has and which attributes a module has in tables of the whole
standard (``highdicom/_standard/*.json``, 23 MB of JSON) that it parses once per process and keeps:
about 85 MiB of Python objects, a quarter of a served node's resident memory, for 436 modules of
which a SEG and SR built from MR images use under a fifth. Pruning the loaded tables frees little
(the interpreter's memory stays fragmented), so the node ships the cut tables
(``highdicom_tables.json.gz``, made by ``python -m node.highdicom_tables``) and has highdicom read
them instead of its own, once, at start (:func:`load_into_highdicom`). The cut keeps every module of
the IODs of the SOP classes in :data:`SOP_CLASSES` and their multi-frame functional groups modules;
tests/node/test_highdicom_tables.py checks that the shipped file is that cut of the installed
highdicom's tables and that SEG and SR built on it are those built on the full tables.
"""

from __future__ import annotations

import gzip
import json
import logging
import pkgutil
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TABLES_FILE = Path(__file__).with_name("highdicom_tables.json.gz")
#: The objects the node reads (MR Image, Enhanced MR, Legacy Converted Enhanced MR) and writes
#: (Segmentation, Comprehensive 3D SR).
SOP_CLASSES: tuple[str, ...] = (
    "1.2.840.10008.5.1.4.1.1.4",
    "1.2.840.10008.5.1.4.1.1.4.1",
    "1.2.840.10008.5.1.4.1.1.4.4",
    "1.2.840.10008.5.1.4.1.1.66.4",
    "1.2.840.10008.5.1.4.1.1.88.34",
)
#: highdicom's table files and the cut table each becomes.
_FILES = {
    "_standard/sop_class_iod_map.json": "sop_class_iod_map",
    "_standard/iod_module_map.json": "iod_module_map",
    "_standard/module_attribute_map.json": "module_attribute_map",
}


def cut_tables() -> dict[str, Any]:
    """The installed highdicom's tables cut to :data:`SOP_CLASSES` (reads the full tables)."""
    from highdicom import _standard_utils as tables

    sop_iod = tables.get_sop_class_iod_map()
    iod_modules = tables.get_iod_module_map()
    module_attributes = tables.get_module_attribute_map()
    iods = sorted({sop_iod[uid] for uid in SOP_CLASSES})
    modules = {m["key"] for iod in iods for m in iod_modules[iod]}
    groups = {f"{iod}-multi-frame-functional-groups" for iod in iods}
    kept = sorted(k for k in module_attributes if k in modules or k in groups)
    return {
        "highdicom": metadata.version("highdicom"),
        "sop_class_iod_map": {uid: sop_iod[uid] for uid in SOP_CLASSES},
        "iod_module_map": {iod: iod_modules[iod] for iod in iods},
        "module_attribute_map": {k: module_attributes[k] for k in kept},
    }


def _as_file(tables: dict[str, Any]) -> dict[str, Any]:
    """The file's form: each table kept as its JSON text, which highdicom parses itself (parsing them
    here as well would leave the interpreter's memory fragmented by objects thrown away)."""
    return {
        "highdicom": tables["highdicom"],
        "tables": {name: json.dumps(tables[name], sort_keys=True) for name in _FILES.values()},
    }


def _shipped() -> dict[str, Any] | None:
    try:
        with gzip.open(TABLES_FILE, "rt", encoding="utf-8") as fh:
            data: dict[str, Any] = json.load(fh)
    except (OSError, ValueError) as exc:
        logger.warning("highdicom's cut tables %s cannot be read (%s): it loads its own", TABLES_FILE, exc)
        return None
    installed = metadata.version("highdicom")
    if data.get("highdicom") != installed:
        logger.warning(
            "highdicom's cut tables were made for highdicom %s, not the installed %s: it loads its full "
            "tables (python -m node.highdicom_tables makes them again)",
            data.get("highdicom"), installed,
        )
        return None
    return data


@contextmanager
def _serving(data: dict[str, Any]) -> Iterator[None]:
    """While inside, highdicom reads the cut tables where it would read its own files."""
    original = pkgutil.get_data

    def get_data(package: str, resource: str) -> bytes | None:
        if package == "highdicom" and resource in _FILES:
            return str(data["tables"][_FILES[resource]]).encode("utf-8")
        return original(package, resource)

    pkgutil.get_data = get_data
    try:
        yield
    finally:
        pkgutil.get_data = original


def load_into_highdicom() -> bool:
    """Have highdicom cache the cut tables (call once, before any SEG or SR is built); True when it
    did, False when highdicom had its tables already or the shipped file does not fit it."""
    from highdicom import _standard_utils as tables

    getters = (tables.get_sop_class_iod_map, tables.get_iod_module_map, tables.get_module_attribute_map)
    if any(getter.cache_info().currsize for getter in getters):
        return False
    data = _shipped()
    if data is None:
        return False
    with _serving(data):
        for getter in getters:
            getter()
    return True


def main() -> None:
    """``python -m node.highdicom_tables``: write :data:`TABLES_FILE` from the installed highdicom."""
    tables = cut_tables()
    with gzip.GzipFile(TABLES_FILE, "wb", mtime=0) as fh:  # mtime 0: the same bytes every time
        fh.write(json.dumps(_as_file(tables), sort_keys=True).encode("utf-8"))
    modules = len(tables["module_attribute_map"])
    print(f"wrote {TABLES_FILE} (highdicom {tables['highdicom']}, {modules} modules)")


if __name__ == "__main__":
    main()
