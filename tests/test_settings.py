"""Settings: read once from the environment; a bad value stops start-up with one clear line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from availability.settings import Settings, SettingsError

BASE = {"DATABASE_URL": "postgresql://localhost/x", "VALKEY_URL": "redis://localhost:6379/0"}


def test_defaults_follow_the_design() -> None:
    settings = Settings.from_env(BASE)
    assert settings.grpc_address == "127.0.0.1:50051"
    assert settings.heartbeat_stale_seconds == 90
    assert settings.mitra_auto_offline_sweep_seconds == 30
    assert settings.heartbeat_mirror_interval_seconds == 60
    assert settings.valkey_online_mirror_sweep_seconds == 300
    assert settings.truth_freshness_seconds == 150
    assert not settings.valkey_cluster


def test_values_are_parsed_by_name() -> None:
    settings = Settings.from_env(
        {
            **BASE,
            "HEARTBEAT_STALE_SECONDS": "45",
            "VALKEY_CLUSTER": "false",
            "VALKEY_URL": "valkey://cache:6379",
            "VALKEY_KEY_PREFIX": "city-a",
        }
    )
    assert settings.heartbeat_stale_seconds == 45
    assert not settings.valkey_cluster
    assert settings.valkey_key_prefix == "city-a"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("HEARTBEAT_STALE_SECONDS", "soon"),
        ("HEARTBEAT_STALE_SECONDS", "0"),
        ("MITRA_AUTO_OFFLINE_SWEEP_SECONDS", "-5"),
        ("HEARTBEAT_MIRROR_INTERVAL_SECONDS", "x"),
        ("VALKEY_ONLINE_MIRROR_SWEEP_SECONDS", "0"),
        ("VALKEY_CLUSTER", "maybe"),
        ("VALKEY_URL", "http://cache"),
        ("DATABASE_URL", "mysql://db"),
        ("GRPC_ADDRESS", "nowhere"),
        ("GRPC_ADDRESS", "0.0.0.0:50051"),
        ("VALKEY_KEY_PREFIX", "has{brace}"),
        ("DEFAULT_MAX_CONCURRENT_SESSIONS", "0"),
        ("LOG_FORMAT", "xml"),
        ("LOG_SLOW_RPC_SECONDS", "0"),
        ("VALKEY_SLOW_SECONDS", "0"),
        ("POSTGRES_SLOW_SECONDS", "slow"),
    ],
)
def test_bad_value_names_the_setting(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({**BASE, name: value})


def test_missing_required_setting_is_named() -> None:
    with pytest.raises(SettingsError, match="DATABASE_URL"):
        Settings.from_env({"VALKEY_URL": "redis://x"})


def test_binding_beyond_loopback_needs_explicit_consent() -> None:
    settings = Settings.from_env(
        {**BASE, "GRPC_ADDRESS": "0.0.0.0:50051", "ALLOW_INSECURE_NETWORK": "true"}
    )
    assert settings.grpc_address == "0.0.0.0:50051"


def test_serve_with_bad_setting_exits_with_one_line() -> None:
    env = {**os.environ, **BASE, "HEARTBEAT_STALE_SECONDS": "ninety"}
    result = subprocess.run(
        [sys.executable, "-m", "availability", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "HEARTBEAT_STALE_SECONDS" in lines[0]
    assert "Traceback" not in result.stderr


def test_cluster_mode_takes_a_seed_node_of_database_0() -> None:
    seed = {**BASE, "VALKEY_CLUSTER": "true", "VALKEY_URL": "redis://10.0.0.5:7000"}
    assert Settings.from_env(seed).valkey_cluster
    with pytest.raises(SettingsError, match="VALKEY_CLUSTER"):
        Settings.from_env({**seed, "VALKEY_URL": "redis://10.0.0.5:7000/2"})


def test_beyond_loopback_is_refused_without_tokens_or_mutual_tls() -> None:
    with pytest.raises(SettingsError, match="AUTH_TOKENS") as refused:
        Settings.from_env({**BASE, "GRPC_ADDRESS": "0.0.0.0:50051"})
    assert "ALLOW_INSECURE_NETWORK" in str(refused.value)


def test_tokens_allow_binding_beyond_loopback_and_rotate(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {**BASE, "GRPC_ADDRESS": "0.0.0.0:50051", "AUTH_TOKENS": " old-token , new-token ,"}
    )
    assert settings.auth_tokens == ("old-token", "new-token")
    assert "old-token" not in repr(settings), "tokens stay out of logs"


def test_mutual_tls_allows_binding_beyond_loopback(tmp_path: Path) -> None:
    for name in ("cert.pem", "key.pem", "ca.pem"):
        (tmp_path / name).write_text("x")
    settings = Settings.from_env(
        {
            **BASE,
            "GRPC_ADDRESS": "0.0.0.0:50051",
            "TLS_CERT_FILE": str(tmp_path / "cert.pem"),
            "TLS_KEY_FILE": str(tmp_path / "key.pem"),
            "TLS_CLIENT_CA_FILE": str(tmp_path / "ca.pem"),
        }
    )
    assert settings.mutual_tls


def test_sentinel_mode_takes_the_sentinels_and_the_master_name_together() -> None:
    sentinel = {
        **BASE,
        "VALKEY_SENTINELS": "10.0.0.7:26379, [fd00::8]:26379",
        "VALKEY_SENTINEL_MASTER": "availability",
        "VALKEY_SENTINEL_PASSWORD": "s3cret",
    }
    settings = Settings.from_env(sentinel)
    assert settings.valkey_sentinels == ("10.0.0.7:26379", "[fd00::8]:26379")
    assert settings.valkey_sentinel_master == "availability"
    assert settings.valkey_sentinel_password == "s3cret" and "s3cret" not in repr(settings)
    without_master = {k: v for k, v in sentinel.items() if k != "VALKEY_SENTINEL_MASTER"}
    with pytest.raises(SettingsError, match="VALKEY_SENTINEL_MASTER"):
        Settings.from_env(without_master)
    with pytest.raises(SettingsError, match="VALKEY_SENTINELS"):
        Settings.from_env({**BASE, "VALKEY_SENTINEL_MASTER": "availability"})
    with pytest.raises(SettingsError, match="VALKEY_SENTINELS"):
        Settings.from_env({**sentinel, "VALKEY_SENTINELS": "10.0.0.7"})
    with pytest.raises(SettingsError, match="VALKEY_CLUSTER"):
        Settings.from_env({**sentinel, "VALKEY_CLUSTER": "true"})


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"TLS_CERT_FILE": "cert.pem"}, "TLS_KEY_FILE"),
        ({"TLS_KEY_FILE": "key.pem"}, "TLS_CERT_FILE"),
        ({"TLS_CLIENT_CA_FILE": "ca.pem"}, "TLS_CLIENT_CA_FILE"),
        ({"TLS_CERT_FILE": "missing.pem", "TLS_KEY_FILE": "key.pem"}, "TLS_CERT_FILE"),
        ({"AUTH_TOKENS": " , "}, "AUTH_TOKENS"),
        ({"GRPC_REFLECTION": "maybe"}, "GRPC_REFLECTION"),
    ],
)
def test_bad_security_settings_are_named(tmp_path: Path, env: dict[str, str], named: str) -> None:
    (tmp_path / "cert.pem").write_text("x")
    (tmp_path / "key.pem").write_text("x")
    resolved = {k: str(tmp_path / v) if k.startswith("TLS_") else v for k, v in env.items()}
    with pytest.raises(SettingsError, match=named):
        Settings.from_env({**BASE, **resolved})


def test_metrics_address_defaults_on_and_empty_turns_it_off() -> None:
    assert Settings.from_env(BASE).metrics_address == "127.0.0.1:9464"
    assert Settings.from_env({**BASE, "METRICS_ADDRESS": ""}).metrics_address == ""
    with pytest.raises(SettingsError, match="METRICS_ADDRESS"):
        Settings.from_env({**BASE, "METRICS_ADDRESS": "9464"})
