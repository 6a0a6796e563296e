"""A committed instance row survives a power loss: SQLite syncs its write-ahead log at every commit.

The node acknowledges a C-STORE once its spool file is fsynced and its row has committed. With
SQLite's WAL and ``synchronous = NORMAL`` a commit survives a killed process but may roll back after
a power loss or an OS crash: the fsynced file would then have no row and never be processed. A power
loss cannot be staged in a test, so the test watches the system calls instead: every commit of the
receive path's :func:`db.instances.record_instances` must be followed by a sync of the ``-wal`` file.
"""

from __future__ import annotations

from pathlib import Path

from db.session import upgrade
from tests.helpers.syscalls import synced_paths

#: Records COMMITS instances one transaction each, as one association's C-STOREs are recorded.
_RECORD = """
import sys
from db import instances
from db.session import make_engine, make_session_factory

sf = make_session_factory(make_engine(sys.argv[1]))
for i in range(int(sys.argv[2])):
    uid = f"1.2.826.0.1.3680043.8.498.{i + 1}"
    new = instances.record_instances(sf, [instances.ReceivedInstance(
        sop_instance_uid=uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
        study_instance_uid="1.2.3", series_instance_uid="1.2.3.4", kept=True,
        path=f"/spool/{uid}.dcm", calling_ae="PACS")])
    assert new == [True]
"""

COMMITS = 12


def test_every_instance_commit_syncs_the_write_ahead_log(tmp_path: Path) -> None:
    db_file = tmp_path / "segnode.db"
    url = f"sqlite:///{db_file}"
    upgrade(url)
    synced = synced_paths(_RECORD, url, str(COMMITS), trace=tmp_path / "trace.txt")
    wal_syncs = [path for path in synced if path == f"{db_file}-wal"]
    # NORMAL syncs the log only at a checkpoint (2 syncs here, at the close).
    assert len(wal_syncs) >= COMMITS, f"{len(wal_syncs)} syncs of the WAL for {COMMITS} commits"
