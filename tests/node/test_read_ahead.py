"""Read-ahead (node/read_ahead.py): spool files parsed while their series arrives are handed to the read
that needs them only when they are of the very same file; everything else is read from disk as before.

Real DICOM files written by the project's writer; the node-level check (a study over a real socket) is
in tests/node/test_early.py.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import pydicom
import pytest

from converters.dicom_writer import StudyInfo, write_study
from converters.synthetic import make_synthetic_case
from node.read_ahead import ReadAhead
from tests.helpers.waiting import wait_until


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> StudyInfo:
    case = make_synthetic_case(3, (32, 32, 8))
    return write_study(case, tmp_path_factory.mktemp("study"), modalities=["FLAIR", "T1"])


def _queue(ahead: ReadAhead, study: StudyInfo, modality: str) -> list[str]:
    paths = [str(p) for p in study.files[modality]]
    for path in paths:
        ahead.note(study.series_uids[modality], path)
    return paths


def test_files_read_ahead_are_taken_once_and_are_what_dcmread_gives(study: StudyInfo) -> None:
    woken: list[int] = []
    ahead = ReadAhead(wake=lambda: woken.append(1))
    paths = _queue(ahead, study, "FLAIR")
    assert len(woken) == len(paths) and ahead.pending() == len(paths)
    assert ahead.work(until=lambda: False) == len(paths)
    assert ahead.cached() == len(paths) and ahead.pending() == 0
    for path in paths:
        assert ahead.read(path) == pydicom.dcmread(path)
    assert (ahead.hits, ahead.misses, ahead.cached()) == (len(paths), 0, 0)
    ahead.read(paths[0])  # handed out once: a second read goes to the file
    assert ahead.misses == 1


def test_reading_stops_when_asked_and_the_rest_is_read_from_disk(study: StudyInfo) -> None:
    ahead = ReadAhead()
    paths = _queue(ahead, study, "FLAIR")
    assert ahead.work(until=lambda: ahead.cached() == 2) == 2
    assert ahead.pending() == len(paths) - 2
    datasets = [ahead.read(p) for p in paths]
    assert datasets == [pydicom.dcmread(p) for p in paths]
    assert (ahead.hits, ahead.misses) == (2, len(paths) - 2)


def test_a_file_replaced_after_it_was_read_ahead_is_read_again(study: StudyInfo, tmp_path: Path) -> None:
    source = [Path(p) for p in study.files["FLAIR"][:2]]
    path = tmp_path / "spooled.dcm"
    shutil.copyfile(source[0], path)
    ahead = ReadAhead()
    ahead.note("1.2.3", str(path))
    ahead.work(until=lambda: False)
    replacement = tmp_path / "replacement.dcm"  # written beside, then renamed over: a new inode
    shutil.copyfile(source[1], replacement)
    os.replace(replacement, path)
    ds = ahead.read(str(path))
    assert ds.SOPInstanceUID == pydicom.dcmread(source[1]).SOPInstanceUID
    assert (ahead.hits, ahead.misses) == (0, 1)


def test_only_wanted_series_are_read_ahead_judged_on_their_first_file(study: StudyInfo) -> None:
    judged: list[str] = []
    seen: list[list[str]] = []

    def wanted(first: pydicom.Dataset, others: Sequence[pydicom.Dataset]) -> bool:
        judged.append(str(first.SeriesDescription))
        seen.append([str(ds.SeriesDescription) for ds in others])
        return "FLAIR" in str(first.SeriesDescription).upper()

    ahead = ReadAhead(wanted=wanted)
    flair, t1 = _queue(ahead, study, "FLAIR"), _queue(ahead, study, "T1")
    assert ahead.work(until=lambda: False) == len(flair)
    assert len(judged) == 2, "one verdict per series"
    assert seen == [[], [judged[0]]], "each judged with its study's series judged before it"
    assert "PixelData" not in ahead._firsts[study.series_uids["FLAIR"]][1]
    assert ahead.cached() == len(flair) and ahead.pending() == 0
    ahead.read(t1[0])
    assert ahead.misses == 1


def test_a_series_whose_judge_fails_is_not_read_ahead(study: StudyInfo) -> None:
    def wanted(first: pydicom.Dataset, others: Sequence[pydicom.Dataset]) -> bool:
        raise ValueError("odd header")

    ahead = ReadAhead(wanted=wanted)
    _queue(ahead, study, "FLAIR")
    assert ahead.work(until=lambda: False) == 0 and ahead.cached() == 0


def test_the_cache_keeps_to_its_byte_budget_and_drops_what_nobody_took(study: StudyInfo) -> None:
    paths = [str(p) for p in study.files["FLAIR"]]
    size = max(os.path.getsize(p) for p in paths)
    ahead = ReadAhead(budget_bytes=2 * size)
    _queue(ahead, study, "FLAIR")
    ahead.work(until=lambda: False)
    assert ahead.cached() == 2, "the oldest go first"
    assert ahead.read(paths[-1]) is not None and ahead.hits == 1
    assert ahead.read(paths[0]) is not None and ahead.misses == 1

    # 2 s to spare between the reads and the first expire(): a loaded CI machine took over 0.2 s for
    # them (the files read first were already past a 0.2 s max_age and went).
    ahead = ReadAhead(max_age_s=2.0)
    _queue(ahead, study, "FLAIR")
    ahead.work(until=lambda: False)
    assert ahead.expire() == 0 and ahead.cached() == len(paths)
    dropped: list[int] = []

    def all_expired() -> bool:
        dropped.append(ahead.expire())
        return ahead.cached() == 0

    wait_until(all_expired, 30, "every data set past max_age_s dropped")
    assert sum(dropped) == len(paths)


def test_a_file_that_cannot_be_read_ahead_is_left_to_the_read(tmp_path: Path) -> None:
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not DICOM at all")
    ahead = ReadAhead()
    ahead.note("1.2.3", str(broken))
    ahead.note("1.2.3", str(tmp_path / "gone.dcm"))
    assert ahead.work(until=lambda: False) == 0 and ahead.pending() == 0
    with pytest.raises(pydicom.errors.InvalidDicomError):
        ahead.read(str(broken))
