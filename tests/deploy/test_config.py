"""The deploy files against the node's real config schema (node/config.py), so they cannot drift.

Covers the node image's baked node.toml, the docker compose stack (its node.toml, its environment,
Orthanc's view of the node and the node's view of Orthanc and PostgreSQL) and the chart's values.yaml.
The chart's rendered ConfigMap is checked in tests/deploy/test_chart.py (it needs helm).
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from node.config import (
    DESTINATION_REQUIRED,
    DatabaseSettings,
    Destination,
    InferenceConfig,
    MetricsSettings,
    NodeSettings,
    QCSettings,
    RegistrationConfig,
    RoutingSettings,
    SelectionSettings,
    Settings,
    TLSSettings,
    load_settings,
)
from node.exceptions import ConfigError
from tests.helpers.peers import REPO

DEPLOY = REPO / "deploy"
COMPOSE_DIR = DEPLOY / "compose"
CHART = DEPLOY / "helm" / "segnode"

#: node.toml sections and their dataclasses: the schema every deploy file is compared with.
SECTIONS: dict[str, type] = {
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
#: Keys the chart sets itself in the rendered node.toml rather than taking from values.config.
CHART_OWNED = {"node": {"host", "spool_dir"}, "metrics": {"host"}}
#: Environment variables the node reads besides SEGNODE_<SECTION>_<KEY>.
NODE_ENV = {"SEGNODE_HOME", "SEGNODE_CONFIG", "SEGNODE_DATABASE_URL"}


def schema_keys(section: str) -> set[str]:
    """Field names of a node.toml section (``destinations``: of one destination)."""
    cls = Destination if section == "destinations" else SECTIONS[section]
    return {f.name for f in fields(cls)}


def assert_destination_keys(dest: dict[str, Any], where: str) -> None:
    """A ``[[destinations]]`` entry has every required key and no key the node does not know."""
    assert set(DESTINATION_REQUIRED) <= set(dest) <= schema_keys("destinations"), where


def image_model_dirs() -> dict[str, str]:
    """Source folder (``models/default``) -> where the node image puts it (the Dockerfile's COPY)."""
    dockerfile = (DEPLOY / "docker" / "node.Dockerfile").read_text(encoding="utf-8")
    return dict(re.findall(r"^COPY (models/\S+) (\S+)$", dockerfile, re.M))


def assert_finds_the_image_models(settings: Settings, where: str) -> None:
    """The node's bootstrap looks for the shipped models where the image has them, not beside the wheel."""
    dirs = image_model_dirs()
    assert str(settings.node.default_model_path()) == dirs["models/default"], where
    assert str(settings.node.brain_extractor_path()) == dirs["models/brain_extraction"], where


def known_env_var(name: str) -> bool:
    """True when the node reads environment variable ``name`` (node/config.py)."""
    if name in NODE_ENV:
        return True
    for section in SECTIONS:
        prefix = f"SEGNODE_{section.upper()}_"
        if name.startswith(prefix) and name[len(prefix) :].lower() in schema_keys(section):
            return True
    return False


def interpolate(text: str) -> str:
    """Docker compose ``${NAME:-default}`` substitution with every variable unset (the defaults)."""

    def repl(match: re.Match[str]) -> str:
        if match.group(2) is None:
            raise AssertionError(f"compose variable ${{{match.group(1)}}} has no default")
        return match.group(2)

    return re.sub(r"\$\{([A-Z0-9_]+)(?::-([^}]*))?\}", repl, text)


def load_compose() -> dict[str, Any]:
    """deploy/compose/docker-compose.yml with its variables at their defaults."""
    data = yaml.safe_load(interpolate((COMPOSE_DIR / "docker-compose.yml").read_text(encoding="utf-8")))
    assert isinstance(data, dict)
    return data


def mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of a compose service's bind mounts (relative to deploy/compose)."""
    out: dict[str, Path] = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            out[target] = (COMPOSE_DIR / source).resolve()
    return out


def published(service: dict[str, Any]) -> dict[int, str]:
    """Container port -> host address of a compose service's published ports."""
    out: dict[int, str] = {}
    for spec in service.get("ports", []):
        host_ip, _host_port, container = str(spec).rsplit(":", 2)
        out[int(container)] = host_ip
    return out


def check_toml_keys(path: Path) -> dict[str, Any]:
    """Every section and key of ``path`` exists in the schema; returns the parsed TOML."""
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    for section, body in raw.items():
        if section == "destinations":
            for dest in body:
                assert_destination_keys(dest, f"{path}: destination {dest}")
            continue
        assert section in SECTIONS, f"{path}: section [{section}] is not in node/config.py"
        unknown = set(body) - schema_keys(section)
        assert not unknown, f"{path}: [{section}] keys {sorted(unknown)} are not in node/config.py"
    return raw


# -- the node image ------------------------------------------------------------------------------------


def test_image_node_toml_is_valid_and_listens_on_all_interfaces() -> None:
    path = DEPLOY / "docker" / "node.toml"
    check_toml_keys(path)
    settings = load_settings(path, env={})
    assert settings.node.host == "0.0.0.0"
    assert settings.metrics.host == "0.0.0.0"
    assert_finds_the_image_models(settings, str(path))
    assert settings.database.url == ""  # SQLite under SEGNODE_HOME unless SEGNODE_DATABASE_URL says otherwise
    dockerfile = (DEPLOY / "docker" / "node.Dockerfile").read_text(encoding="utf-8")
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.+)$", dockerfile, re.M) for p in line.split()}
    assert exposed == {settings.node.port, settings.metrics.port}


def test_image_environment_names_only_variables_the_node_reads() -> None:
    dockerfile = (DEPLOY / "docker" / "node.Dockerfile").read_text(encoding="utf-8")
    names = set(re.findall(r"\b(SEGNODE_[A-Z_]+)=", dockerfile))
    assert {"SEGNODE_HOME", "SEGNODE_CONFIG"} <= names
    entrypoint_only = {"SEGNODE_BOOTSTRAP_MODEL", "SEGNODE_SKIP_BOOTSTRAP"}
    assert all(known_env_var(n) or n in entrypoint_only for n in names), names


def test_env_override_recognition_is_strict() -> None:
    # The helper the compose and chart checks rely on: a misspelt key must not pass.
    assert known_env_var("SEGNODE_NODE_PORT")
    assert known_env_var("SEGNODE_METRICS_HOST")
    assert not known_env_var("SEGNODE_NODE_PROT")
    assert not known_env_var("SEGNODE_DB_URL")


# -- docker compose ------------------------------------------------------------------------------------


def test_compose_node_config_matches_schema_and_loads() -> None:
    compose = load_compose()
    node = compose["services"]["segnode"]
    env = {k: str(v) for k, v in node["environment"].items()}
    unknown = [k for k in env if k.startswith("SEGNODE_") and not known_env_var(k)]
    assert not unknown, f"docker-compose.yml: the node does not read {unknown}"
    config_path = mounts(node)[env["SEGNODE_CONFIG"]]
    check_toml_keys(config_path)
    settings = load_settings(config_path, env=env)
    assert settings.node.host == "0.0.0.0" and settings.metrics.host == "0.0.0.0"
    # Installed from the wheel, the node's own fallback (models/ beside the package) is not in the image.
    assert_finds_the_image_models(settings, str(config_path))
    assert settings.database.resolved_url().startswith("postgresql+psycopg://")
    ports = published(node)
    assert set(ports) == {settings.node.port, settings.metrics.port}
    assert set(ports.values()) == {"127.0.0.1"}, "a try-out stack publishes on loopback only"
    assert (COMPOSE_DIR / node["build"]["context"] / node["build"]["dockerfile"]).is_file()


def test_compose_database_url_points_at_the_postgres_service() -> None:
    compose = load_compose()
    services = compose["services"]
    url = urlsplit(services["segnode"]["environment"]["SEGNODE_DATABASE_URL"])
    pg_env = services["postgres"]["environment"]
    assert url.hostname in services
    assert services[url.hostname]["image"].startswith("postgres:")
    assert url.username == pg_env["POSTGRES_USER"]
    assert url.password == pg_env["POSTGRES_PASSWORD"]
    assert url.path.lstrip("/") == pg_env["POSTGRES_DB"]
    assert services["segnode"]["depends_on"][url.hostname]["condition"] == "service_healthy"


def test_compose_orthanc_and_node_know_each_other() -> None:
    compose = load_compose()
    services = compose["services"]
    node_env = {k: str(v) for k, v in services["segnode"]["environment"].items()}
    settings = load_settings(mounts(services["segnode"])[node_env["SEGNODE_CONFIG"]], env=node_env)
    orthanc_mounts = mounts(services["orthanc"])
    orthanc = json.loads(orthanc_mounts["/etc/orthanc/orthanc.json"].read_text(encoding="utf-8"))
    # Orthanc knows the node as a modality: the node's AE title, service name and DICOM port.
    modality = orthanc["DicomModalities"]["segnode"]
    assert modality == [settings.node.ae_title, "segnode", settings.node.port]
    # The node sends SEG and SR back to Orthanc, and accepts studies from it.
    assert len(settings.destinations) == 1
    dest = settings.destinations[0]
    assert dest.host == "orthanc" and dest.host in services
    assert (dest.ae_title, dest.port) == (orthanc["DicomAet"], orthanc["DicomPort"])
    assert orthanc["DicomAet"] in settings.node.allowed_calling_aes
    assert set(published(services["orthanc"])) == {orthanc["DicomPort"], orthanc["HttpPort"]}


def test_compose_volumes_are_declared() -> None:
    compose = load_compose()
    named = set(compose["volumes"])
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in named, f"service {name}: volume {source!r} is not declared"


def test_compose_bad_node_key_would_be_refused(tmp_path: Path) -> None:
    # The loader the compose check relies on refuses a misspelt key, naming file and key.
    bad = tmp_path / "node.toml"
    bad.write_text((COMPOSE_DIR / "node.toml").read_text(encoding="utf-8") + "\n[metrics]\nprot = 1\n")
    with pytest.raises(ConfigError, match=r"metrics"):
        load_settings(bad, env={})


# -- the chart's values --------------------------------------------------------------------------------


def chart_values() -> dict[str, Any]:
    """deploy/helm/segnode/values.yaml."""
    data = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


@pytest.mark.parametrize("section", ["node", "metrics", "tls", "qc", "routing", "registration", "inference"])
def test_chart_values_config_covers_the_schema(section: str) -> None:
    config = chart_values()["config"]
    keys = set(config[section])
    expected = schema_keys(section) - CHART_OWNED.get(section, set())
    assert keys == expected, (
        f"values.yaml config.{section}: missing {sorted(expected - keys)}, unknown {sorted(keys - expected)}"
    )


def test_chart_values_defaults_equal_the_node_defaults_where_they_should() -> None:
    config = chart_values()["config"]
    defaults = {
        "node": NodeSettings(),
        "metrics": MetricsSettings(),
        "tls": TLSSettings(),
        "qc": QCSettings(),
        "routing": RoutingSettings(),
        "registration": RegistrationConfig(),
        "inference": InferenceConfig(),
    }
    # The chart keeps the node's defaults except for the TLS paths (where the Secret is mounted) and
    # the shipped models (where the image has them).
    image_dirs = set(image_model_dirs().values())
    for section, obj in defaults.items():
        for key, value in config[section].items():
            if section == "tls" and key in ("cert", "key"):
                assert str(value).startswith("/etc/segnode/tls/")
                continue
            if section == "node" and key in ("default_model_dir", "brain_extractor_dir"):
                assert value in image_dirs, f"values.yaml config.node.{key}={value!r}"
                continue
            assert value == getattr(obj, key), f"values.yaml config.{section}.{key}={value!r}"


def test_chart_values_selection_and_destinations_use_schema_keys() -> None:
    for path in [CHART / "values.yaml", *sorted((CHART / "ci").glob("*.yaml"))]:
        config = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("config", {})
        unknown = set(config.get("selection", {})) - schema_keys("selection")
        assert not unknown, f"{path.name}: config.selection keys {sorted(unknown)}"
        for dest in config.get("destinations", []):
            assert_destination_keys(dest, f"{path.name}: destination {dest}")
        for section in ("node", "metrics", "tls", "qc"):
            unknown = set(config.get(section, {})) - schema_keys(section)
            assert not unknown, f"{path.name}: config.{section} keys {sorted(unknown)}"


def test_chart_service_ports_default_to_the_node_ports() -> None:
    values = chart_values()
    assert values["service"]["dicom"]["port"] == values["config"]["node"]["port"] == NodeSettings().port
    assert values["service"]["metrics"]["port"] == values["config"]["metrics"]["port"]


#: JSON-schema type of each Python default type of node/config.py.
JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array"}


@pytest.mark.parametrize(
    "section", ["node", "metrics", "tls", "selection", "qc", "routing", "registration", "inference"]
)
def test_chart_values_schema_mirrors_the_config_schema(section: str) -> None:
    # values.schema.json makes `helm install` refuse a misspelt or mistyped config key; it must name
    # exactly the node's keys (less those the chart sets itself) with the node's types.
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    body = schema["properties"]["config"]["properties"][section]
    assert body["additionalProperties"] is False
    cls = SECTIONS[section]
    defaults = cls()
    expected = {f.name for f in fields(cls)} - CHART_OWNED.get(section, set())
    assert set(body["properties"]) == expected
    for key, prop in body["properties"].items():
        assert prop["type"] == JSON_TYPES[type(getattr(defaults, key))], f"config.{section}.{key}"


def test_chart_values_schema_knows_the_node_tasks() -> None:
    from db.models import SEGMENTATION_TASKS

    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    task = schema["properties"]["config"]["properties"]["node"]["properties"]["task"]
    assert task["enum"] == list(SEGMENTATION_TASKS)


def test_chart_values_schema_destinations_mirror_destination() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    item = schema["properties"]["config"]["properties"]["destinations"]["items"]
    assert set(item["properties"]) == schema_keys("destinations")
    assert item["required"] == list(DESTINATION_REQUIRED)
    types = {f.name: f.type for f in fields(Destination)}
    for key, prop in item["properties"].items():
        assert prop["type"] == JSON_TYPES[{"str": str, "int": int}[str(types[key])]], key
