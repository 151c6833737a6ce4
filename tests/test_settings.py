"""Settings: read once from the environment; a bad value stops start-up with one clear line."""

from __future__ import annotations

import os
import subprocess
import sys

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


@pytest.mark.parametrize(
    ("name", "value"),
    [("AUTH_TOKENS", "secret"), ("TLS_CERT_FILE", "/x.pem"), ("VALKEY_CLUSTER", "true")],
)
def test_settings_this_version_cannot_honour_stop_start_up(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({**BASE, name: value})
