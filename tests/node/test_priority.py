"""Receiving first (node/priority.py): the analysis threads get a higher nice value, Python's other
threads keep theirs. Nice values cannot be lowered again without privilege, so each check runs in a
child process of its own."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from node.config import ConfigError, load_settings

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="per-thread nice is Linux's")


#: Child-process code that leaves an OpenVINO engine with its worker pool started (threads Python
#: did not start), for the code that follows it.
ENGINE_WITH_WORKERS = """
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops

    x = ops.parameter([1, 8, 64, 64], np.float32)
    w = ops.constant(np.ones((8, 8, 3, 3), np.float32))
    model = ov.Model([ops.convolution(x, w, [1, 1], [1, 1], [1, 1], [1, 1])], [x])
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": 2})
    compiled(np.ones((1, 8, 64, 64), np.float32))  # the engine starts its worker pool
"""


def _child(*parts: str) -> dict[str, object]:
    """Run the code ``parts`` (each dedented, then joined) in a fresh interpreter; the JSON object it
    prints last."""
    code = "\n".join(textwrap.dedent(part) for part in parts)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_the_engines_worker_threads_and_the_calling_thread_are_lowered_and_no_other_python_thread() -> None:
    out = _child(
        ENGINE_WITH_WORKERS,
        """
        import json, os, threading
        from node.priority import lower_native_threads, lower_this_thread

        python = {t.native_id for t in threading.enumerate()} | {os.getpid()}
        native = [int(t) for t in os.listdir("/proc/self/task") if int(t) not in python]
        changed = lower_native_threads(7)
        again = lower_native_threads(7)
        seen = {}
        def worker():
            lower_this_thread(4)
            seen["own"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
            child = threading.Thread(target=lambda: seen.update(
                child=os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
            child.start(); child.join()
        t = threading.Thread(target=worker); t.start(); t.join()
        print(json.dumps({
            "native": len(native), "changed": changed, "again": again,
            "native_nice": sorted({os.getpriority(os.PRIO_PROCESS, tid) for tid in native}),
            "main_nice": os.getpriority(os.PRIO_PROCESS, os.getpid()),
            **seen,
        }))
        """,
    )
    assert out["native"] and out["changed"] == out["native"], out
    assert out["again"] == 0, "a thread already at the value is left alone"
    assert out["native_nice"] == [7] and out["main_nice"] == 0
    assert out["own"] == 4 and out["child"] == 4, "a lowered thread's new threads inherit its value"


def test_zero_changes_nothing_and_values_outside_0_to_19_are_refused(tmp_path: Path) -> None:
    out = _child(
        """
        import json, os, threading
        from node.priority import lower_native_threads, lower_this_thread
        lower_this_thread(0)
        print(json.dumps({"changed": lower_native_threads(0), "own": os.getpriority(os.PRIO_PROCESS, 0)}))
        """
    )
    assert out == {"changed": 0, "own": 0}
    assert load_settings(env={"SEGNODE_NODE_ANALYSIS_NICE": "19"}).node.analysis_nice == 19
    for bad in (-1, 20):
        cfg = tmp_path / "node.toml"
        cfg.write_text(f"[node]\nanalysis_nice = {bad}\n")
        with pytest.raises(ConfigError, match=r"node\.analysis_nice must be between 0 and 19"):
            load_settings(cfg, env={})


def test_nothing_is_lowered_while_a_python_thread_is_starting() -> None:
    """A thread just started is listed by threading before it knows its OS id; its task must not be
    taken for an engine's worker."""
    out = _child(
        ENGINE_WITH_WORKERS,
        """
        import json, threading
        from node import priority

        class Starting:
            native_id = None

        real = threading.enumerate
        threading.enumerate = lambda: [*real(), Starting()]
        while_starting = priority.lower_native_threads(7)
        threading.enumerate = real
        print(json.dumps({"while_starting": while_starting, "after": priority.lower_native_threads(7)}))
        """,
    )
    assert out["while_starting"] == 0 and out["after"] > 0, out
