"""Tests of node.config: defaults, file, env overrides and clear errors."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from db.exceptions import DatabaseConfigError
from db.url import resolve_database_url, url_in_config_file
from node.config import ConfigError, load_settings
from tests.helpers.certs import issue_cert, make_ca

#: A node.toml with one destination, its AE title and port to fill in.
DEST = '[[destinations]]\nname = "p"\nae_title = "{ae}"\nhost = "h"\nport = {port}\n'


def _assert_refused(tmp_path: Path, text: str, message: str) -> None:
    """A node.toml of ``text`` is refused with ``message``, naming the file."""
    cfg = tmp_path / "node.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, env={})
    assert message in str(info.value)
    assert str(cfg) in str(info.value)


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


def test_empty_database_url_env_is_ignored_as_the_admin_commands_ignore_it(
    tmp_path: Path, segnode_home: Path
) -> None:
    """``SEGNODE_DATABASE_URL=`` (set, empty): serve uses the file's URL, as db upgrade / jobs / models do."""
    site = f"sqlite:///{tmp_path / 'site.db'}"
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[database]\nurl = "{site}"\n')
    env = {"SEGNODE_HOME": str(segnode_home), "SEGNODE_DATABASE_URL": ""}
    s = load_settings(cfg, env=env)
    assert s.database.resolved_url() == site
    assert resolve_database_url(cfg, env) == site


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
        ("[registration]\nmin_similarity = -0.1\n", "registration.min_similarity must be >= 0"),
        ("[node]\nspool_keep_hours = -1\n", "node.spool_keep_hours must be >= 0"),
        ("[node]\nfailed_keep_hours = nan\n", "node.failed_keep_hours: expected a finite float, got nan"),
        ("[node]\nsend_max_refusals = -1\n", "node.send_max_refusals must be >= 0"),
        ("[node]\nincomplete_series_wait_seconds = -5\n", "node.incomplete_series_wait_seconds must be >= 0"),
        ("[inference]\nmirror = 'ud'\n", "inference.mirror 'ud' is not one of 'none', 'lr', 'lr+ap'"),
        ("[inference]\nthree_views = ['flair']\n", "inference.three_views names 'flair', not a task among"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    _assert_refused(tmp_path, text, message)


def test_a_destination_may_name_its_tls_server_name(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(DEST.format(ae="PACS", port=104) + 'tls_server_name = "pacs.radiology.example"\n')
    [dest] = load_settings(cfg, env={}).destinations
    assert dest.tls_server_name == "pacs.radiology.example"
    cfg.write_text(DEST.format(ae="PACS", port=104))
    assert load_settings(cfg, env={}).destinations[0].tls_server_name == ""  # default: check host
    for bad in ("*.radiology.example", "pacs.example:104", "https://pacs", "pacs example"):
        _assert_refused(
            tmp_path, DEST.format(ae="PACS", port=104) + f'tls_server_name = "{bad}"\n',
            f"destinations[0].tls_server_name {bad!r} is not a DNS name or IP address",
        )  # fmt: skip


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
    _assert_refused(tmp_path, text, message)


def test_a_bad_value_from_the_environment_is_not_blamed_on_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The file holds a valid AE title; the one that fails came from SEGNODE_NODE_AE_TITLE: the error
    names the variable. A bad value in the file names no variable that set another key (the image sets
    SEGNODE_NODE_HOST), and a variable changing a key the file sets is logged, without its value."""
    cfg = tmp_path / "node.toml"
    cfg.write_text('[node]\nae_title = "SEGNODE"\nhost = "::"\n')
    env = {"SEGNODE_NODE_HOST": "0.0.0.0"}
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, env={**env, "SEGNODE_NODE_AE_TITLE": "ABCDEFGHIJKLMNOPQ"})
    assert f"{cfg}: node.ae_title 'ABCDEFGHIJKLMNOPQ'" in str(info.value)
    assert str(info.value).endswith("(from the environment: SEGNODE_NODE_AE_TITLE)"), info.value
    cfg.write_text('[node]\nhost = "::"\n[qc]\nmax_tumour_at_cut_ml = -1\n')
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, env=env)
    assert "environment" not in str(info.value) and "SEGNODE_NODE_HOST" not in str(info.value)
    cfg.write_text('[node]\nhost = "::"\n')
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="node.config"):
        assert load_settings(cfg, env=env).node.host == "0.0.0.0"
        assert load_settings(cfg, env={"SEGNODE_NODE_HOST": "::"}).node.host == "::"
    assert caplog.text.count("SEGNODE_NODE_HOST overrides node.host set in the config file") == 1
    assert "0.0.0.0" not in caplog.text


def test_a_mistyped_override_is_named_in_a_warning_not_ignored_silently(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A typo in the file is refused; one in a SEGNODE_ variable is logged with the key it was probably
    meant for (not refused: Kubernetes' service links may set SEGNODE_<SERVICE>_... variables)."""
    with caplog.at_level(logging.WARNING, logger="node.config"):
        settings = load_settings(env={"SEGNODE_NODE_AE_TITEL": "PACSNODE", "SEGNODE_HOME": str(tmp_path)})
    assert settings.node.ae_title == "SEGNODE"
    assert "environment variable SEGNODE_NODE_AE_TITEL names no key of [node]" in caplog.text
    assert "(did you mean SEGNODE_NODE_AE_TITLE?)" in caplog.text
    assert "SEGNODE_HOME" not in caplog.text


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


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (DEST.format(ae="PACS", port=70000), "destinations[0].port 70000 is not a TCP port (1-65535)"),
        (DEST.format(ae="PACS", port=0), "destinations[0].port 0 is not a TCP port (1-65535)"),
        (DEST.format(ae="PA\\\\CS", port=104), "destinations[0].ae_title 'PA\\\\CS' must be 1-16 ASCII"),
        (DEST.format(ae="A_VERY_LONG_AE_TITLE", port=104), "destinations[0].ae_title 'A_VERY_LONG_AE_TITL"),
        (DEST.format(ae="PACS", port=104).replace('"h"', '""'), "destinations[0].host is empty"),
        (DEST.format(ae="PACS", port=104).replace('"p"', '" "'), "destinations[0].name is empty"),
        (
            DEST.format(ae="PACS", port=104) + DEST.format(ae="VNA", port=105),
            "destinations[1].name 'p' is already destinations[0]'s name",
        ),
        ("[node]\ntask = 'whole_tumour'\n", "node.task 'whole_tumour' is not one of whole_tumor, brats_re"),
        ("[node]\npoll_seconds = 0\n", "node.poll_seconds must be > 0, not 0.0"),
        ("[node]\npoll_seconds = -1\n", "node.poll_seconds must be > 0, not -1.0"),
        ("[node]\nstudy_idle_seconds = -10\n", "node.study_idle_seconds must be >= 0, not -10.0"),
        ("[node]\nmin_free_disk_mb = -100\n", "node.min_free_disk_mb must be >= 0, not -100"),
        ("[node]\nsend_retry_base_seconds = -1\n", "node.send_retry_base_seconds must be > 0, not -1.0"),
        ("[node]\nsend_retry_max_seconds = -5\n", "node.send_retry_max_seconds -5.0 must be >="),
        ("[node]\nstale_job_seconds = -1\n", "node.stale_job_seconds must be > 0, not -1.0"),
        ("[node]\nworkers = 0\n", "node.workers must be at least 1, not 0"),
        ("[node]\nstudy_idle_seconds = nan\n", "node.study_idle_seconds: expected a finite float, got nan"),
        ("[node]\nstudy_idle_seconds = inf\n", "node.study_idle_seconds: expected a finite float, got inf"),
        ("[node]\nearly_quiet_seconds = nan\n", "node.early_quiet_seconds: expected a finite float"),
        ("[qc]\nmin_head_ml = nan\n", "qc.min_head_ml: expected a finite float, got nan"),
        ("[qc]\nmax_brain_ml = inf\n", "qc.max_brain_ml: expected a finite float, got inf"),
        ("[registration]\nsampling_fraction = nan\n", "registration.sampling_fraction: expected a finite"),
        ("[node]\nport = 11112.9\n", "node.port: expected int, got 11112.9"),
        ("[node]\nreceivers = 2.7\n", "node.receivers: expected int, got 2.7"),
        ("[qc]\nmin_slices = 2.5\n", "qc.min_slices: expected int, got 2.5"),
        ("[[destinations]]\nname='p'\nae_title='P'\nhost='h'\nport=104.5\n", "port: expected int, got 104.5"),
    ],
)
def test_config_that_would_break_the_node_at_run_time_is_refused(
    tmp_path: Path, text: str, message: str
) -> None:
    # Each of these was accepted and broke the node later: nothing sent, no model, a spinning loop.
    _assert_refused(tmp_path, text, message)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SEGNODE_NODE_POLL_SECONDS": "nan"}, "SEGNODE_NODE_POLL_SECONDS: expected a finite float, got"),
        ({"SEGNODE_QC_MIN_HEAD_ML": "-inf"}, "SEGNODE_QC_MIN_HEAD_ML: expected a finite float"),
        ({"SEGNODE_NODE_WORKERS": "2.5"}, "SEGNODE_NODE_WORKERS: expected int, got '2.5'"),
        ({"SEGNODE_NODE_TASK": "brain_extraction"}, "node.task 'brain_extraction' is not one of"),
    ],
)
def test_environment_overrides_are_held_to_the_same_rules(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env=env)
    assert message in str(info.value)


def test_whole_numbers_and_every_known_task_still_load(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text("[node]\ntask = 'brats_regions'\nstudy_idle_seconds = 0\nmin_free_disk_mb = 0\n")
    s = load_settings(cfg, env={"SEGNODE_NODE_POLL_SECONDS": "0.25"})
    assert (s.node.task, s.node.study_idle_seconds, s.node.poll_seconds) == ("brats_regions", 0.0, 0.25)


def test_the_registration_similarity_floor_is_a_setting(tmp_path: Path) -> None:
    """[registration] min_similarity reaches the registration's check; 0 turns it off (a site whose
    correct fits end weaker than the default floor could neither tune nor disable it)."""
    cfg = tmp_path / "node.toml"
    assert load_settings(None, env={}).registration.settings().min_similarity == 0.25
    cfg.write_text("[registration]\nmin_similarity = 0.4\n")
    assert load_settings(cfg, env={}).registration.settings().min_similarity == 0.4
    cfg.write_text("[registration]\nmin_similarity = 0\n")
    assert load_settings(cfg, env={}).registration.settings().min_similarity is None
