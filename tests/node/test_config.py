"""Tests of node.config: defaults, file, env overrides and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.config import ConfigError, load_settings


def test_defaults_use_var_dir(segnode_home: Path) -> None:
    s = load_settings(env={"SEGNODE_HOME": str(segnode_home)})
    assert s.node.ae_title == "SEGNODE"
    assert s.database.resolved_url() == f"sqlite:///{segnode_home / 'segnode.db'}"
    assert s.node.spool_path() == segnode_home / "spool"
    assert s.destinations == []


def test_file_and_env_override(tmp_path: Path, segnode_home: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        '[node]\nae_title = "BRAIN"\nport = 104\nallowed_calling_aes = ["PACS"]\n'
        '[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = 4242\n'
    )
    s = load_settings(cfg, env={"SEGNODE_NODE_PORT": "11113", "SEGNODE_DATABASE_URL": "sqlite:///x.db"})
    assert s.node.ae_title == "BRAIN"
    assert s.node.port == 11113
    assert s.node.allowed_calling_aes == ["PACS"]
    assert s.destinations[0].ae_title == "ORTHANC"
    assert s.database.resolved_url() == "sqlite:///x.db"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[node]\nport = 'abc'\n", "node.port: expected int, got 'abc'"),
        ("[node]\nbogus = 1\n", "unknown key 'bogus'"),
        ("[nodes]\n", "unknown section [nodes]"),
        ("[node\n", "not valid TOML"),
        ("[node]\nae_title = 'A_VERY_LONG_AE_TITLE_X'\n", "must be 1-16 ASCII characters"),
        ("[[destinations]]\nname = 'p'\n", "missing ae_title, host, port"),
        ("[registration]\nparallel = 0\n", "registration.parallel must be at least 1"),
        ("[node]\nspool_keep_hours = -1\n", "node.spool_keep_hours must be >= 0"),
        ("[node]\nfailed_keep_hours = nan\n", "node.failed_keep_hours must be >= 0"),
        ("[node]\nsend_max_refusals = -1\n", "node.send_max_refusals must be >= 0"),
        ("[inference]\nmirror = 'ud'\n", "inference.mirror 'ud' is not one of 'none', 'lr', 'lr+ap'"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, env={})
    assert message in str(info.value)
    assert str(cfg) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", env={})


def test_bad_env_override_names_variable() -> None:
    with pytest.raises(ConfigError, match="SEGNODE_NODE_PORT: expected int"):
        load_settings(env={"SEGNODE_NODE_PORT": "eleven"})
