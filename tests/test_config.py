"""Configuration: the seed's schema, every error with its path, environment overrides, the CLI check."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import Config, load_config
from pipeline.durations import format_duration, parse_duration
from pipeline.errors import ConfigError
from tests.procs import ROOT

EXAMPLE = ROOT / "configs" / "config.yaml.example"


def problems_of(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> list[str]:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env or {})
    return info.value.problems


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("100ms", 0.1), ("30s", 30), ("5m", 300), ("1h30m", 5400), ("1.5s", 1.5), ("0s", 0), ("7d", 604800)],
)
def test_durations_parse(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5 sec", "5", "s", "1w", "-1s", "1s2", "ms100"])
def test_bad_durations_are_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_format_duration_round_trips_the_seeds_values() -> None:
    for text in ("100ms", "5s", "30s", "5m", "2h"):
        assert format_duration(parse_duration(text)) == text


def test_the_example_file_is_valid_and_matches_the_seed() -> None:
    config = load_config(EXAMPLE, env={})
    assert [lv.name for lv in config.queue.levels] == ["realtime", "high", "normal", "low"]
    assert config.queue.levels[0].max_wait_time.seconds == pytest.approx(0.1)
    assert config.queue.worker.process_interval.seconds == 1
    assert config.queue.retry.max_backoff.seconds == 60
    assert config.loadbalancer.session_timeout.seconds == 1800
    assert config.database.postgres is not None and config.database.postgres.sslmode == "require"
    assert config.server.port == 8080 and config.metrics.port == 8081


def test_defaults_work_without_a_file() -> None:
    config = load_config(None, env={})
    assert isinstance(config, Config)
    assert config.database.redis is None and config.redis.addr == "localhost:6379"
    assert [lv.name for lv in config.queue.levels] == ["realtime", "high", "normal", "low"]


def test_every_error_is_reported_with_its_path(tmp_path: Path) -> None:
    problems = problems_of(
        tmp_path,
        """
server: {port: 99999, colour: blue}
queue:
  default_max_size: -5
  levels:
    - {name: realtime, priority: 1, max_wait_time: "100ms", max_concurrent: 10}
    - {name: high, priority: 2, max_wait_time: "5 sec", max_concurrent: 20}
    - {name: low, priority: "4", max_wait_time: "2m"}
  worker: {max_batch_size: 0}
scheduler: {strategy: fifo}
loadbalancer: {algorithm: random, enable_session_affinity: "yes"}
logging: {format: xml}
""",
    )
    assert problems == [
        "server.colour: unknown field "
        "(expected one of: host, max_batch, max_body_bytes, max_poll_wait, mode, port, sync_timeout)",
        "server.port: 99999 must be <= 65535",
        'queue.levels[1].max_wait_time: invalid duration "5 sec" (write it like "100ms", "30s", "5m")',
        'queue.levels[2].priority: expected an integer, got str "4"',
        "queue.levels[2].max_concurrent: required field is missing",
        "queue.default_max_size: -5 must be >= 0",
        "queue.worker.max_batch_size: 0 must be >= 1",
        'scheduler.strategy: unknown value "fifo" (expected one of: deadline, priority_based, weighted)',
        'loadbalancer.algorithm: unknown value "random" (expected one of: least_connections, round_robin, weighted)',
        'loadbalancer.enable_session_affinity: expected true or false, got str "yes"',
        'logging.format: unknown value "xml" (expected one of: json, text)',
    ]


def test_semantic_errors(tmp_path: Path) -> None:
    problems = problems_of(
        tmp_path,
        """
database:
  redis: {url: "http://redis:6379"}
queue:
  levels:
    - {name: a, priority: 1, max_wait_time: 1s, max_concurrent: 1}
    - {name: a, priority: 1, max_wait_time: 1s, max_concurrent: 1}
  retry: {initial_backoff: 10s, max_backoff: 1s, factor: 0.5}
  worker: {claim_timeout: 1s, process_interval: 2s}
backends:
  - {name: x, url: "http://x"}
  - {name: x, url: "ftp://y"}
""",
    )
    assert problems == [
        "queue.levels[1].name: duplicate level name 'a' (also queue.levels[0])",
        "queue.levels[1].priority: duplicate priority 1 (also queue.levels[0])",
        "queue.retry.max_backoff: 1s is less than initial_backoff 10s",
        "queue.retry.factor: 0.5 must be >= 1",
        "queue.worker.claim_timeout: 1s must exceed process_interval 2s",
        "backends[1].name: duplicate backend name 'x'",
        "backends[1].url: 'ftp://y' must start with http://, https:// or echo:// "
        "(an in-process echo backend, for measuring the queue itself)",
        "database.redis.url: scheme must be redis://, rediss:// or unix://, got 'http://redis:6379'",
    ]


def test_empty_levels_are_rejected(tmp_path: Path) -> None:
    assert problems_of(tmp_path, "queue: {levels: []}") == ["queue.levels: at least one level is required"]


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    [problem] = problems_of(tmp_path, "server:\n  port: [8080\n")
    assert problem.startswith("line 3, column 1: invalid YAML")


def test_a_non_mapping_file_is_rejected(tmp_path: Path) -> None:
    assert problems_of(tmp_path, "- just\n- a list\n") == ["<root>: expected a mapping of sections, got list"]


def test_a_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml", env={})
    assert info.value.problems == ["<file>: cannot read: No such file or directory"]


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("database:\n  redis: {addr: 'file:6379'}\nserver: {port: 8080}\n")
    config = load_config(
        path,
        env={
            "LLMQ_REDIS_URL": "rediss://:secret@redis.internal:6380/2",
            "LLMQ_DATABASE_URL": "postgresql://u@db/llm_queue?sslmode=require",
            "LLMQ_SERVER__PORT": "9000",
            "LLMQ_QUEUE__WORKER__MAX_BATCH_SIZE": "250",
            "LLMQ_QUEUE__ENABLE_AUTO_SCALING": "false",
            "LLMQ_API_KEYS": "k1, k2",
            "LLMQ_KEY_PREFIX": "{tenant-a}",
            "LLMQ_TEST_REDIS_URL": "ignored: not configuration",
        },
    )
    assert config.redis.url == "rediss://:secret@redis.internal:6380/2"
    assert config.redis.addr == "file:6379"  # the file's value stays; the URL wins when connecting
    assert config.database.postgres is not None
    assert config.database.postgres.conninfo == "postgresql://u@db/llm_queue?sslmode=require"
    assert config.server.port == 9000
    assert config.queue.worker.max_batch_size == 250
    assert config.queue.enable_auto_scaling is False
    assert config.api_keys == ["k1", "k2"]
    assert config.redis.key_prefix == "{tenant-a}"


def test_config_path_variable_picks_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("server: {port: 7000}\n")
    assert load_config(None, env={"CONFIG_PATH": str(path)}).server.port == 7000


def test_a_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, env={"LLMQ_SERVER__PORT": "eighty", "LLMQ_NOSUCH__THING": "1"})
    assert info.value.problems == [
        "nosuch: unknown field (expected one of: api_keys, backends, database, loadbalancer, logging, metrics, "
        "queue, scheduler, server) (from LLMQ_NOSUCH__THING)",
        'server.port: expected an integer, got str "eighty" (from LLMQ_SERVER__PORT)',
    ]


def test_postgres_fields_make_a_quoted_conninfo() -> None:
    config = load_config(None, env={"LLMQ_DATABASE__POSTGRES__PASSWORD": "it's secret"})
    assert config.database.postgres is not None
    assert config.database.postgres.conninfo == (
        "host='localhost' port='5432' user='llmqueue' dbname='llm_queue' sslmode='prefer' password='it\\'s secret'"
    )


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60
    )


def test_cli_validate_exits_0_with_a_summary() -> None:
    result = cli("config", "validate", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1
    assert "4 levels [realtime(100ms), high(5s), normal(30s), low(120s)]" in result.stdout


def test_cli_validate_prints_every_error_and_exits_3(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("queue:\n  levels:\n    - {name: a, priority: 1, max_wait_time: '5 sec', max_concurrent: -1}\n")
    result = cli("config", "validate", str(path))
    assert result.returncode == 3
    assert f"invalid configuration {path}" in result.stderr
    assert 'queue.levels[0].max_wait_time: invalid duration "5 sec"' in result.stderr
    assert "queue.levels[0].max_concurrent: -1 must be >= 1" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_validate_without_a_path_is_a_usage_error() -> None:
    result = cli("config", "validate", env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert "give a PATH or set CONFIG_PATH" in result.stderr
