"""The spool's durable write: what is synced for an instance's file (watched with strace)."""

from __future__ import annotations

from pathlib import Path

from tests.helpers.syscalls import synced_paths

#: Writes two files into a series directory (made for them when it is not there), as the SCP does.
_WRITE = """
import sys
from pathlib import Path
from node.spool import write_atomic

series = Path(sys.argv[1]) / "1.2.3" / "1.2.3.4"
write_atomic(series / "1.2.3.4.1.dcm", b"first")
write_atomic(series / "1.2.3.4.2.dcm", b"second")
"""


def test_a_new_study_and_series_directory_are_synced_in_their_parents(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    study, series = spool / "1.2.3", spool / "1.2.3" / "1.2.3.4"
    synced = [
        # a file's data is synced under its temporary name (".NAME.<pid>.<thread>.tmp") before the rename
        f"data of {Path(path).name.split('.tmp')[0][1:].rsplit('.', 2)[0]}" if path.endswith(".tmp") else path
        for path in synced_paths(_WRITE, str(spool), trace=tmp_path / "trace.txt")
    ]
    first = synced.index("data of 1.2.3.4.1.dcm")
    # Each new directory's entry is synced in its parent before the first file's name is.
    assert synced[:first].count(str(spool)) == 1 and synced[:first].count(str(study)) == 1, synced
    assert synced[first + 1] == str(series), synced  # the first file's name in its directory
    # The second file of the series: its data and its name, no parent again.
    assert synced[first + 2:] == ["data of 1.2.3.4.2.dcm", str(series)], synced
    assert (series / "1.2.3.4.2.dcm").read_bytes() == b"second"



def test_a_series_directory_another_process_made_is_synced_in_its_parent_once(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    study, series = spool / "1.2.3", spool / "1.2.3" / "1.2.3.4"
    series.mkdir(parents=True)  # another process made it and may not have synced its parent yet
    synced = [
        path for path in synced_paths(_WRITE, str(spool), trace=tmp_path / "trace.txt")
        if not path.endswith(".tmp")
    ]
    assert synced == [str(study), str(series), str(series)], synced  # the study once, then each name
