"""Tests of node.config: defaults, file, env overrides and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from db.exceptions import DatabaseConfigError
from db.url import url_in_config_file
from node.config import ConfigError, load_settings
from tests.helpers.certs import issue_cert, make_ca


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


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[node]\nallowed_calling_aes = ['PACS', 'AVERYLONGAETITLE_TOO_LONG']\n",
            "node.allowed_calling_aes[1] 'AVERYLONGAETITLE_TOO_LONG' must be 1-16 ASCII characters",
        ),
        (
            '[node]\nallowed_calling_aes = ["PA\\\\CS"]\n',
            "node.allowed_calling_aes[0] 'PA\\\\CS' must be 1-16 ASCII characters",
        ),
        ('[node]\nae_title = "SEG\\nNODE"\n', "node.ae_title 'SEG\\nNODE' must be 1-16 ASCII characters"),
        ("[selection]\nflair_pattern = '(x'\n", "selection.flair_pattern '(x' is not a regular expression"),
        ("[selection]\nexclude_pattern = '*x'\n", "selection.exclude_pattern '*x' is not a regular"),
        ("destinations = [1]\n", "destinations[0] must be a table"),
        ("destinations = ['x']\n", "destinations[0] must be a table"),
    ],
)
def test_config_the_node_would_crash_on_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    # Each of these passed the loader and then crashed `segnode serve` with a traceback.
    cfg = tmp_path / "node.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, env={})
    assert message in str(info.value)
    assert str(cfg) in str(info.value)


def test_allowed_calling_aes_from_the_environment_are_checked_too() -> None:
    with pytest.raises(ConfigError, match=r"node.allowed_calling_aes\[1\] 'A_VERY_LONG_AE_TITLE'"):
        load_settings(env={"SEGNODE_NODE_ALLOWED_CALLING_AES": "PACS,A_VERY_LONG_AE_TITLE"})


def test_tls_files_that_cannot_be_used_are_named(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca", "site")
    cert, key = issue_cert(ca, tmp_path / "ca", "segnode")
    good = {"SEGNODE_TLS_ENABLED": "1", "SEGNODE_TLS_CERT": str(cert), "SEGNODE_TLS_KEY": str(key)}
    assert load_settings(env={**good, "SEGNODE_TLS_CA": str(ca[0])}).tls.enabled
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    missing = tmp_path / "missing.pem"
    cases = [
        ({"SEGNODE_TLS_CERT": str(missing)}, f"tls.cert {missing}: cannot read it"),
        ({"SEGNODE_TLS_KEY": str(missing)}, f"tls.key {missing}: cannot read it"),
        ({"SEGNODE_TLS_CA": str(missing)}, f"tls.ca {missing}: cannot read it"),
        ({"SEGNODE_TLS_CERT": str(not_pem)}, f"tls.cert {not_pem}: not a PEM certificate"),
        ({"SEGNODE_TLS_KEY": str(not_pem)}, f"tls.key {not_pem}: not a PEM private key"),
        ({"SEGNODE_TLS_CA": str(not_pem)}, f"tls.ca {not_pem}: not a PEM certificate"),
        ({"SEGNODE_TLS_KEY": str(ca[1])}, "tls.cert and tls.key do not make a certificate chain"),
    ]
    for change, message in cases:
        with pytest.raises(ConfigError) as info:
            load_settings(env={**good, **change})
        assert message in str(info.value), change
    # Off, the files are not looked at.
    off = {**good, "SEGNODE_TLS_ENABLED": "0", "SEGNODE_TLS_CERT": str(missing)}
    assert not load_settings(env=off).tls.enabled


def test_config_file_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_bytes(b'[node]\nae_title = "S\xe9GNODE"\n')
    with pytest.raises(ConfigError, match=f"{cfg}: not UTF-8 text"):
        load_settings(cfg, env={})
    with pytest.raises(DatabaseConfigError, match=f"{cfg}: not UTF-8 text"):
        url_in_config_file(cfg)
