"""Settings from the environment (incl. the AWS fallbacks) and offline DuckDB extensions."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from app.settings import Settings
from projections.query.extensions import EXTENSIONS, install_extensions


def test_aws_variables_work_and_ledgerlake_s3_settings_override_them() -> None:
    env = {
        "AWS_ENDPOINT_URL": "http://aws-endpoint:9000",
        "AWS_ACCESS_KEY_ID": "aws-key",
        "AWS_SECRET_ACCESS_KEY": "aws-secret",
        "AWS_REGION": "eu-west-1",
        "LEDGERLAKE_STORAGE_URL": "s3://bucket/prefix",
        "LEDGERLAKE_S3_ACCESS_KEY_ID": "ll-key",
        "LEDGERLAKE_DATA_DIR": "/tmp/somewhere",
    }
    s = Settings.from_env(env)
    assert s.s3_endpoint_url == "http://aws-endpoint:9000"
    assert s.s3_access_key_id == "ll-key"  # LEDGERLAKE_S3_* wins
    assert s.s3_secret_access_key == "aws-secret"
    assert s.s3_region == "eu-west-1"
    assert s.data_dir == Path("/tmp/somewhere")


@pytest.mark.parametrize(
    "env",
    [
        {"LEDGERLAKE_STORAGE_URL": "gs://bucket"},
        {"LEDGERLAKE_LOG_FORMAT": "xml"},
        {"LEDGERLAKE_PORT": "eighty"},
        {"LEDGERLAKE_REDIS_SENTINELS": "host-without-port"},
        {"LEDGERLAKE_REDIS_CLUSTER": "true"},
        {"LEDGERLAKE_MCP_TOKEN_BUDGET": "10"},
        {"LEDGERLAKE_ARCHIVE_SEGMENT_EVENTS": "0"},
        {"LEDGERLAKE_ARCHIVE_INTERVAL_S": "-1"},
        {"LEDGERLAKE_STREAM_RETENTION_S": "60", "LEDGERLAKE_ARCHIVE": "false"},
        {"LEDGERLAKE_MCP_TIMEOUT_S": "0"},
        {"LEDGERLAKE_MCP_TIMEOUT_S": "900"},  # above the query's own maximum
        {"LEDGERLAKE_MCP_MAX_CONCURRENT_PER_PRINCIPAL": "0"},
    ],
)
def test_bad_settings_stop_the_start_with_a_message(env: dict[str, str]) -> None:
    with pytest.raises(SystemExit) as err:
        Settings.from_env(env)
    assert str(err.value)


def test_sentinel_target() -> None:
    s = Settings.from_env({"LEDGERLAKE_REDIS_SENTINELS": "10.0.0.1:26379, 10.0.0.2:26380"})
    target = s.redis_target()
    assert target.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26380))
    assert s.external_redis


def test_extensions_install_offline_and_load(tmp_path: Path) -> None:
    install_extensions(tmp_path, EXTENSIONS)
    install_extensions(tmp_path, EXTENSIONS)  # idempotent
    con = duckdb.connect(
        config={
            "extension_directory": str(tmp_path),
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
        }
    )
    for name in EXTENSIONS:
        con.execute(f"LOAD {name}")
    loaded = con.execute(
        "select extension_name from duckdb_extensions() where loaded and installed"
    ).fetchall()
    assert {"httpfs", "delta", "iceberg"} <= {row[0] for row in loaded}


@pytest.mark.parametrize(
    "env",
    [{"LEDGERLAKE_STORAGE_URL": "s3://bucket/data[1]"}, {"LEDGERLAKE_DATA_DIR": "/tmp/x*y"}],
)
def test_glob_characters_in_the_data_location_are_refused(env: dict[str, str]) -> None:
    with pytest.raises(SystemExit, match="must not contain"):
        Settings.from_env(env)
