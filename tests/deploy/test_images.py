"""The images in deploy/docker, without a Docker engine: build contexts, entrypoint, health check, no torch.

* every COPY source of every Dockerfile is in its build context after the Dockerfile's own
  ``.dockerignore`` (BuildKit's ``<Dockerfile>.dockerignore``), whole, and the context stays small;
* the node image's entrypoint, run for real against SQLite: migrates, registers the shipped model,
  promotes it only when its task has no active model (a restart never undoes an admin's choice);
* the HEALTHCHECK script against a real /healthz server;
* the node's code path (serve, runtime, inference) imports without torch, as in the node image.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import write_model_dir
from tests.helpers.peers import REPO
from tests.helpers.ports import free_port

DOCKER = REPO / "deploy" / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
#: Largest build context we accept (the node's holds the packages and the shipped model).
MAX_CONTEXT_BYTES = 200 * 1024 * 1024
VENV_BIN = Path(sys.executable).parent


# -- Dockerfile and .dockerignore parsing -------------------------------------------------------------


@dataclass
class Copy:
    """One COPY or ADD instruction."""

    line: int
    sources: list[str]
    dest: str
    from_stage: str | None


def instructions(dockerfile: Path) -> list[tuple[int, str, str]]:
    """(line number, INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[int, str, str]] = []
    pending = ""
    start = 0
    for number, raw in enumerate(dockerfile.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = pending + line
        pending = ""
        word, _, rest = text.partition(" ")
        out.append((start, word.upper(), rest.strip()))
    assert not pending, f"{dockerfile.name}: file ends inside a continued line"
    return out


def copies(dockerfile: Path) -> list[Copy]:
    """The COPY/ADD instructions of ``dockerfile``."""
    out = []
    for number, word, rest in instructions(dockerfile):
        if word not in ("COPY", "ADD"):
            continue
        args = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
        flags = [a for a in args if a.startswith("--")]
        paths = [a for a in args if not a.startswith("--")]
        from_stage = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
        assert len(paths) >= 2, f"{dockerfile.name}:{number}: {word} needs a source and a destination"
        out.append(Copy(number, paths[:-1], paths[-1], from_stage))
    return out


def stages(dockerfile: Path) -> list[str]:
    """Names given with ``FROM ... AS name``."""
    names = []
    for _number, word, rest in instructions(dockerfile):
        if word == "FROM":
            match = re.search(r"\s+AS\s+(\S+)$", rest, re.I)
            if match:
                names.append(match.group(1))
    return names


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus ``**``) as a regex over relative paths."""
    out = ""
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
            continue
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            continue
        out += {"*": "[^/]*", "?": "[^/]"}.get(c, re.escape(c))
        i += 1
    return re.compile(out)


class DockerIgnore:
    """The rules of a .dockerignore file: the last matching pattern decides; a match on a parent counts."""

    def __init__(self, path: Path) -> None:
        self.rules: list[tuple[bool, str, re.Pattern[str]]] = []
        for raw in path.read_text(encoding="utf-8").splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negated = line.startswith("!")
            pattern = os.path.normpath(line.lstrip("!").strip().lstrip("/"))
            self.rules.append((negated, pattern, _pattern_regex(pattern)))

    def excluded(self, rel: str) -> bool:
        """Whether the file or directory at ``rel`` (relative to the context) is left out."""
        parts = rel.split("/")
        candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        result = False
        for negated, _pattern, regex in self.rules:
            if any(regex.fullmatch(c) for c in candidates):
                result = not negated
        return result

    def may_reinclude_under(self, rel: str) -> bool:
        """Whether some ``!pattern`` could bring back a path under the excluded directory ``rel``."""
        return any(negated and (p.startswith(rel + "/") or "*" in p) for negated, p, _ in self.rules)

    def walk(self, root: Path) -> Iterator[Path]:
        """Every file of the build context ``root`` that these rules send to the builder."""
        for dirpath, dirnames, filenames in os.walk(root):
            base = Path(dirpath)
            keep = []
            for d in dirnames:
                rel = (base / d).relative_to(root).as_posix()
                if d == ".git" or (self.excluded(rel) and not self.may_reinclude_under(rel)):
                    continue
                keep.append(d)
            dirnames[:] = keep
            for f in filenames:
                path = base / f
                if not self.excluded(path.relative_to(root).as_posix()):
                    yield path


def test_dockerignore_semantics() -> None:
    # The matcher the context checks rely on, on the patterns our ignore files use.
    rules = DockerIgnore.__new__(DockerIgnore)
    rules.rules = []
    for line in ["*", "!node", "!models/default", "**/__pycache__", "**/*.pyc"]:
        negated = line.startswith("!")
        pattern = line.lstrip("!")
        rules.rules.append((negated, pattern, _pattern_regex(pattern)))
    assert rules.excluded(".venv/bin/python")
    assert rules.excluded("runs/x/best.pt")
    assert not rules.excluded("node/cli/__init__.py")
    assert rules.excluded("node/__pycache__/config.cpython-311.pyc")
    assert rules.excluded("node/cli/__pycache__/x.pyc")
    assert not rules.excluded("models/default/model.json")
    assert rules.excluded("models/demo_case/NOTICE")
    assert rules.excluded("nodes/x.py")


# -- build contexts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_build_context_holds_every_copy_source(dockerfile: Path) -> None:
    ignore_file = dockerfile.with_name(dockerfile.name + ".dockerignore")
    assert ignore_file.is_file(), f"{dockerfile.name} has no {ignore_file.name}: it would send the whole repo"
    rules = DockerIgnore(ignore_file)
    context = REPO  # every Dockerfile says: build from the repository root
    sent = {p.relative_to(context).as_posix(): p.stat().st_size for p in rules.walk(context)}
    total = sum(sent.values())
    assert total < MAX_CONTEXT_BYTES, f"{dockerfile.name}: build context is {total / 2**20:.0f} MiB"
    known_stages = stages(dockerfile)
    local = [c for c in copies(dockerfile) if c.from_stage is None]
    assert local, f"{dockerfile.name}: no COPY from the context"
    for copy in copies(dockerfile):
        if copy.from_stage is not None:
            where = f"{dockerfile.name}:{copy.line}"
            assert copy.from_stage in known_stages, f"{where}: no stage {copy.from_stage}"
            continue
        for source in copy.sources:
            path = context / source
            where = f"{dockerfile.name}:{copy.line}: COPY {source}"
            assert path.exists(), f"{where}: {path} does not exist"
            if path.is_file():
                assert source in sent, f"{where}: excluded by {ignore_file.name}"
                continue
            under = [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
            assert under, f"{where}: directory is empty"
            missing = [p.relative_to(context).as_posix() for p in under]
            missing = [m for m in missing if m not in sent]
            assert not missing, f"{where}: {len(missing)} excluded by {ignore_file.name}: {missing[:5]}"


def test_node_image_ships_a_complete_model() -> None:
    """The shipped segmentation model and the shipped brain extractor, each copied once, whole."""
    dockerfile = DOCKER / "node.Dockerfile"
    model_copies = [c for c in copies(dockerfile) if c.dest.startswith("/opt/segnode/models/")]
    dests = [c.dest for c in model_copies]
    assert sorted(dests) == ["/opt/segnode/models/brain_extraction", "/opt/segnode/models/default"], (
        "the node image copies the shipped model and the shipped brain extractor once each"
    )
    default = next(c for c in model_copies if c.dest.endswith("/default"))
    env = re.search(r"SEGNODE_BOOTSTRAP_MODEL=(\S+)", dockerfile.read_text(encoding="utf-8"))
    assert env is not None and env.group(1) == default.dest
    for copied in model_copies:
        model_dir = REPO / copied.sources[0]
        card = json.loads((model_dir / "model.json").read_text(encoding="utf-8"))
        listed = [f for art in card["artifacts"] for f in art["files"]]
        assert any(art["kind"] == "ir" for art in card["artifacts"]), "the node runs an OpenVINO IR"
        for entry in listed:
            data = (model_dir / entry["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == entry["sha256"], f"{model_dir}/{entry['path']}: sha256"


def test_node_image_runs_as_non_root_with_healthcheck() -> None:
    steps = instructions(DOCKER / "node.Dockerfile")
    words = [w for _n, w, _r in steps]
    last_from = max(i for i, w in enumerate(words) if w == "FROM")
    users = [r for _n, w, r in steps[last_from:] if w == "USER"]
    assert users and not users[-1].startswith(("root", "0")), users
    health = [r for _n, w, r in steps[last_from:] if w == "HEALTHCHECK"]
    assert len(health) == 1 and "segnode-healthcheck" in health[0]
    install = " ".join(r for _n, w, r in steps[last_from:] if w == "RUN")
    assert "[postgres]" in install and "train" not in install, "the node image installs no trainer extra"


def image_env(dockerfile: Path) -> dict[str, str]:
    """The ENV of a Dockerfile's last stage (``KEY=value`` pairs, shell-quoted)."""
    steps = instructions(dockerfile)
    last_from = max(i for i, (_n, w, _r) in enumerate(steps) if w == "FROM")
    env: dict[str, str] = {}
    for _n, word, rest in steps[last_from:]:
        if word == "ENV":
            for pair in shlex.split(rest):
                key, sep, value = pair.partition("=")
                assert sep, f"ENV {pair!r}: not KEY=value"
                env[key] = value
    return env


def test_node_image_listens_on_all_interfaces_with_an_admins_node_toml(tmp_path: Path) -> None:
    """deploy/README tells admins to mount their node.toml over the image's to add destinations: one
    holding destinations only must still listen on every interface of the container (the PACS and
    Prometheus come from outside), not node/config.py's 127.0.0.1, which the health check passes."""
    from node.config import load_settings

    mounted = tmp_path / "node.toml"
    mounted.write_text(
        '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "pacs.hospital"\nport = 104\n'
    )
    env = image_env(DOCKER / "node.Dockerfile")
    settings = load_settings(mounted, env=env)
    assert (settings.node.host, settings.metrics.host) == ("0.0.0.0", "0.0.0.0")
    # The image's own node.toml says so too, and an admin's -e still picks one interface.
    assert load_settings(DOCKER / "node.toml", env=env, check_files=False).node.host == "0.0.0.0"
    assert load_settings(mounted, env={**env, "SEGNODE_NODE_HOST": "10.1.2.3"}).node.host == "10.1.2.3"


def test_gaudi_image_keeps_habana_torch() -> None:
    steps = instructions(DOCKER / "trainer-gaudi.Dockerfile")
    froms = [r for _n, w, r in steps if w == "FROM"]
    assert "habanalabs/pytorch-installer" in froms[-1]
    result = subprocess.run(
        [sys.executable, str(DOCKER / "requirements_without.py"), str(REPO / "pyproject.toml"), "torch"],
        capture_output=True,
        text=True,
        check=True,
    )
    names = {re.split(r"[\[=<>]", line)[0].lower() for line in result.stdout.split()}
    assert "torch" not in names
    assert {"onnx", "nncf", "openvino", "psycopg"} <= names


# -- the node's entrypoint -----------------------------------------------------------------------------


def entrypoint_env(home: Path, model: Path | str, **extra: str) -> dict[str, str]:
    """The environment the image gives its entrypoint, with ``home`` as SEGNODE_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEGNODE_")}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        SEGNODE_HOME=str(home),
        SEGNODE_BOOTSTRAP_MODEL=str(model),
    )
    env.update(extra)
    return env


def run_entrypoint(
    home: Path, model: Path | str, *command: str, **extra: str
) -> subprocess.CompletedProcess[str]:
    """deploy/docker/node-entrypoint.sh as the image runs it (SQLite under ``home`` unless ``extra`` says)."""
    return subprocess.run(
        ["sh", str(DOCKER / "node-entrypoint.sh"), *command],
        capture_output=True,
        text=True,
        env=entrypoint_env(home, model, **extra),
        timeout=180,
    )


def segnode_json(home: Path, *args: str) -> list[dict[str, object]]:
    """``segnode models list --json`` style output of the real CLI under ``home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEGNODE_")}
    env["SEGNODE_HOME"] = str(home)
    out = subprocess.run(
        [str(VENV_BIN / "segnode"), *args], capture_output=True, text=True, env=env, timeout=60, check=True
    )
    data = json.loads(out.stdout)
    assert isinstance(data, list)
    return data


def flaky_segnode(tmp_path: Path) -> Path:
    """A ``segnode`` that refuses its first ``models import`` as a colliding replica's would be refused."""
    bin_dir = tmp_path / "flaky-bin"
    bin_dir.mkdir()
    script = bin_dir / "segnode"
    flag = tmp_path / "import-refused-once"
    script.write_text(
        "#!/bin/sh\n"
        f'if [ "$2" = import ] && [ ! -f "{flag}" ]; then\n'
        f'    touch "{flag}"; echo "error: cannot register (concurrent import)" >&2; exit 2\n'
        "fi\n"
        f'exec "{VENV_BIN / "segnode"}" "$@"\n'
    )
    script.chmod(0o755)
    return bin_dir


def test_entrypoint_bootstraps_once_and_never_undoes_a_promotion(tmp_path: Path) -> None:
    home = tmp_path / "var"
    shipped = write_model_dir(tmp_path / "shipped", name="segnode-wt-flair", version="1.0.0")
    # The first import is refused (as when another replica imports at the same moment): it retries.
    env_path = f"{flaky_segnode(tmp_path)}{os.pathsep}{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    first = run_entrypoint(home, shipped, "true", PATH=env_path)
    assert first.returncode == 0, first.stderr
    assert "bootstrap attempt 1 failed; retrying in 1 s" in first.stderr
    active = [m for m in segnode_json(home, "models", "list", "--json") if m["status"] == "active"]
    assert [(m["version"], m["precision"]) for m in active] == [("1.0.0", "int8")]

    # An admin rolls out a newer model; the node restarts: the shipped one must not come back.
    newer = write_model_dir(tmp_path / "newer", name="segnode-wt-flair", version="2.0.0", seed=1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEGNODE_")}
    env["SEGNODE_HOME"] = str(home)
    subprocess.run(
        [str(VENV_BIN / "segnode"), "models", "import", str(newer), "--promote", "--reason", "test"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    again = run_entrypoint(home, shipped, "true")
    assert again.returncode == 0, again.stderr
    active = [m for m in segnode_json(home, "models", "list", "--json") if m["status"] == "active"]
    assert [(m["version"], m["precision"]) for m in active] == [("2.0.0", "int8")]


def test_replicas_bootstrapping_at_once_all_start(tmp_path: Path, db_url: str) -> None:
    # Pods of the StatefulSet start in parallel: their bootstraps collide on the same database. Every
    # one must succeed (the loser of the import retries) and exactly the shipped INT8 IR is active.
    shipped = write_model_dir(tmp_path / "shipped")
    procs = [
        subprocess.Popen(
            ["sh", str(DOCKER / "node-entrypoint.sh"), "true"],
            env=entrypoint_env(tmp_path / f"var{n}", shipped, SEGNODE_DATABASE_URL=db_url),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(2)
    ]
    results = [(p.wait(timeout=180), p.communicate()[1]) for p in procs]
    assert all(code == 0 for code, _err in results), results
    env = entrypoint_env(tmp_path / "var0", shipped, SEGNODE_DATABASE_URL=db_url)
    out = subprocess.run(
        [str(VENV_BIN / "segnode"), "models", "list", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    models = json.loads(out.stdout)
    assert len(models) == 3, "each artifact registered once"
    assert [(m["status"], m["precision"]) for m in models if m["status"] == "active"] == [("active", "int8")]


def test_entrypoint_gives_up_on_an_unreachable_database(tmp_path: Path) -> None:
    shipped = write_model_dir(tmp_path / "shipped")
    url = f"postgresql+psycopg://segnode:x@127.0.0.1:{free_port()}/segnode"
    result = run_entrypoint(
        tmp_path / "var", shipped, "true", SEGNODE_DATABASE_URL=url, SEGNODE_BOOTSTRAP_TRIES="2"
    )
    assert result.returncode == 2
    assert "bootstrap attempt 1 failed; retrying in 1 s" in result.stderr
    assert "bootstrap failed 2 times" in result.stderr


def test_entrypoint_names_a_model_directory_without_model_json(tmp_path: Path) -> None:
    empty = tmp_path / "no-model"
    empty.mkdir()
    result = run_entrypoint(tmp_path / "var", empty, "true")
    assert result.returncode == 2
    assert f"SEGNODE_BOOTSTRAP_MODEL={empty} has no model.json" in result.stderr


# -- the health check ----------------------------------------------------------------------------------


def healthcheck(env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """deploy/docker/healthcheck.py as Docker's HEALTHCHECK runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEGNODE_")}
    env.update(env_extra)
    return subprocess.run(
        [sys.executable, str(DOCKER / "healthcheck.py")], capture_output=True, text=True, env=env, timeout=30
    )


def test_healthcheck_follows_healthz(tmp_path: Path) -> None:
    from node.metrics import MetricsServer, NodeMetrics

    state = {"ok": True}
    server = MetricsServer("127.0.0.1", 0, NodeMetrics(), lambda: None, lambda: (state["ok"], {}))
    server.start()
    try:
        assert healthcheck({"SEGNODE_METRICS_PORT": str(server.port)}).returncode == 0
        config = tmp_path / "node.toml"
        config.write_text(f"[metrics]\nport = {server.port}\n")
        assert healthcheck({"SEGNODE_CONFIG": str(config)}).returncode == 0
        state["ok"] = False  # /healthz answers 503
        unhealthy = healthcheck({"SEGNODE_METRICS_PORT": str(server.port)})
        assert unhealthy.returncode == 1 and "503" in unhealthy.stderr
    finally:
        server.stop()
    closed = healthcheck({"SEGNODE_METRICS_PORT": str(free_port())})
    assert closed.returncode == 1 and "/healthz" in closed.stderr


# -- no torch in the node ------------------------------------------------------------------------------


def test_node_code_path_imports_without_torch() -> None:
    # As in the node image, where the [train] extra is not installed: make `import torch` fail.
    code = (
        "import sys\n"
        "for name in ('torch', 'onnx', 'onnxruntime', 'nncf'):\n"
        "    sys.modules[name] = None\n"
        "import node.service, node.runtime, node.segmenter, node.demo, node.cli\n"
        "from typer.testing import CliRunner\n"
        "result = CliRunner().invoke(node.cli.app, ['serve', '--help'])\n"
        "assert result.exit_code == 0, result.output\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")
