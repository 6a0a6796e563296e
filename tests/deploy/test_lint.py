"""Static checks of deploy/: yamllint, Kubernetes schema validation of the rendered chart, and checkov.

The tools live in .venv-tools (checkov pins many packages of its own) and .tools/bin (helm);
deploy/ci/install-tools.sh installs them and .ci/run calls it, so in CI nothing here skips.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.peers import REPO, require_program

DEPLOY = REPO / "deploy"
CHART = DEPLOY / "helm" / "segnode"
TOOLS_BIN = str(REPO / ".venv-tools" / "bin")
#: The Kubernetes version the rendered manifests are validated against.
KUBERNETES_VERSION = "1.31.0"
VALUE_SETS: dict[str, list[str]] = {
    "default": [],
    **{p.stem: ["-f", str(p)] for p in sorted((CHART / "ci").glob("*.yaml"))},
    "postgres-off": [
        "--set",
        "postgresql.enabled=false",
        "--set",
        "database.url=postgresql+psycopg://a:b@h/d",
    ],
}


def run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run a tool with no network helpers (checkov would try to download its guideline mappings)."""
    env = dict(os.environ, BC_SKIP_MAPPING="TRUE", CHECKOV_RUN_SCA_PACKAGE_SCAN_V2="false")
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The chart rendered with every value set, one file each, in a fresh directory."""
    helm = require_program("helm", str(REPO / ".tools" / "bin"))
    out = tmp_path_factory.mktemp("rendered")
    for name, args in VALUE_SETS.items():
        result = run([helm, "template", "segnode", str(CHART), "--namespace", "segnode", *args])
        assert result.returncode == 0, f"{name}: {result.stderr}"
        (out / f"{name}.yaml").write_text(result.stdout, encoding="utf-8")
    return out


def test_yamllint_sources() -> None:
    yamllint = require_program("yamllint", TOOLS_BIN)
    result = run([yamllint, "--strict", "-c", str(DEPLOY / "ci" / "yamllint.yaml"), str(DEPLOY)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_yamllint_rendered_manifests(rendered: Path) -> None:
    yamllint = require_program("yamllint", TOOLS_BIN)
    result = run([yamllint, "--strict", "-c", str(DEPLOY / "ci" / "yamllint-rendered.yaml"), str(rendered)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_yamllint_catches_a_duplicate_key(tmp_path: Path) -> None:
    # The rendered-manifest rules must still catch what the API server would silently merge.
    yamllint = require_program("yamllint", TOOLS_BIN)
    bad = tmp_path / "bad.yaml"
    bad.write_text("metadata:\n  labels:\n    app: a\n    app: b\n")
    result = run([yamllint, "-c", str(DEPLOY / "ci" / "yamllint-rendered.yaml"), str(bad)])
    assert result.returncode != 0 and "duplication of key" in result.stdout


def test_rendered_manifests_match_the_kubernetes_schemas(rendered: Path) -> None:
    validate = require_program("kubernetes-validate", TOOLS_BIN)
    files = sorted(str(p) for p in rendered.glob("*.yaml"))
    result = run([validate, "--strict", "--quiet", "-k", KUBERNETES_VERSION, *files])
    assert result.returncode == 0, result.stdout + result.stderr
    # And it does reject a wrong field, so a pass means something.
    bad = rendered.parent / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {ports: [{port: dicom}]}\n")
    rejected = run([validate, "--strict", "--quiet", "-k", KUBERNETES_VERSION, str(bad)])
    assert rejected.returncode != 0


def checkov(directory: Path, framework: str) -> dict[str, Any]:
    """checkov's JSON report for ``directory`` with deploy/ci/checkov.yaml."""
    tool = require_program("checkov", TOOLS_BIN)
    result = run(
        [
            tool,
            "--config-file",
            str(DEPLOY / "ci" / "checkov.yaml"),
            "--skip-download",
            "--framework",
            framework,
            "--output",
            "json",
            "-d",
            str(directory),
        ]
    )
    assert result.stdout.strip(), result.stderr[-2000:]
    report = json.loads(result.stdout)
    report = report[0] if isinstance(report, list) else report
    assert isinstance(report, dict)
    return report


def failures(report: dict[str, Any]) -> list[str]:
    """One line per failed check."""
    failed = report.get("results", {}).get("failed_checks", [])
    return [f"{c['check_id']} {c['check_name']}: {c['resource']} ({c['file_path']})" for c in failed]


def test_checkov_dockerfiles() -> None:
    report = checkov(DEPLOY / "docker", "dockerfile")
    assert report["summary"]["resource_count"] == len(list((DEPLOY / "docker").glob("*.Dockerfile")))
    assert report["summary"]["passed"] > 0
    assert not failures(report), "\n".join(failures(report))


def test_checkov_rendered_manifests(rendered: Path) -> None:
    report = checkov(rendered, "kubernetes")
    assert report["summary"]["passed"] > 0 and report["summary"]["parsing_errors"] == 0
    assert not failures(report), "\n".join(failures(report))
