"""Configuration: the seed's schema, every error with its path, environment overrides, the CLI check."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import msgspec.inspect as mi
import pytest
from click.testing import Result
from typer.testing import CliRunner

from llmq.cli.app import app
from llmq.pipeline.config import Config, load_config
from llmq.pipeline.config.durations import format_duration, parse_duration
from llmq.pipeline.config.rules import IGNORED_FIELDS
from llmq.pipeline.errors import ConfigError
from tests.support.procs import ROOT

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
    # it says production, so it names a key (a placeholder that LLMQ_API_KEYS replaces in deployments)
    assert config.server.mode == "production" and config.api_keys and not config.server.allow_anonymous


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
        "(expected one of: allow_anonymous, api_keys_file, host, max_batch, max_body_bytes, max_poll_wait, mode, "
        "port, sync_timeout)",
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
        "backends[1].url: scheme must be http://, https:// or echo:// "
        "(an in-process echo backend, for measuring the queue itself), got 'ftp://'",
        "database.redis.url: scheme must be redis://, rediss:// or unix://, got 'http://'",
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
        "nosuch: unknown field (expected one of: api_keys, backends, batches, database, loadbalancer, logging, "
        "metrics, queue, scheduler, server, tenant_defaults, tenants, webhooks) (from LLMQ_NOSUCH__THING)",
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
        [sys.executable, "-m", "llmq.cli", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60
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


def validate(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Result:
    """``llmq-stage config validate`` on a file with this text."""
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return CliRunner().invoke(app, ["config", "validate", str(path)], env=env)


def test_the_example_file_validates_without_a_warning() -> None:
    result = CliRunner().invoke(app, ["config", "validate", str(EXAMPLE)], env={"LLMQ_API_KEYS": None})
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output


# --- secrets: a problem line names the field, never the value -----------------------------------------

SECRET = "Hunter2-Xq7"
SPLIT_SECRET = "Pw-Xq7/Zr9"
"""A password with an unescaped '/': a URL parser reads its parts as a host, a port or a path."""


@pytest.mark.parametrize(
    ("text", "env", "line"),
    [
        ("database: {redis: {password: 4815162342}}", {}, "database.redis.password: expected a string, got int"),
        (f'database: {{redis: "redis://:{SECRET}@redis:6379/0"}}', {}, "database.redis: expected a mapping, got str"),
        (f'database: {{postgres: "host=db password={SECRET}"}}', {}, "database.postgres: expected a mapping, got str"),
        (f'api_keys: "sk-{SECRET}"', {}, "api_keys: expected a list, got str"),
        ("api_keys: [4815162342]", {}, "api_keys[0]: expected a string, got int"),
        (
            f'database: {{redis: {{addr: "redis://:{SECRET}@redis:6379"}}}}',
            {},
            "database.redis.addr: must be host:port",
        ),
        (
            f'database: {{redis: {{url: "http://:{SECRET}@redis:6379"}}}}',
            {},
            "database.redis.url: scheme must be redis://, rediss:// or unix://, got 'http://'",
        ),
        ("{}", {"LLMQ_REDIS_URL": f"redis://:{SPLIT_SECRET}@redis:6379/0"}, "database.redis.url: the host, port or"),
        # an '@' in the password, then a '/': the host would be read from the password's tail
        ("{}", {"LLMQ_REDIS_URL": f"redis://:Pw@{SPLIT_SECRET}@redis:6379/0"}, "database.redis.url: the host, port or"),
        ("{}", {"LLMQ_REDIS_URL": "redis://:Pw[Xq7]@redis:6379/0"}, "database.redis.url: the host, port or"),
        (
            "{}",
            {"LLMQ_DATABASE_URL": f"postgresql://llmq:{SPLIT_SECRET}@db:5432/llmq"},
            "database.postgres.dsn: the user info does not parse",
        ),
        (f'database: {{postgres: {{host: "llmq:{SECRET}@db"}}}}', {}, "database.postgres.host: must be a host name"),
        (
            f'backends: [{{name: a, url: "http://a/v1", api_key_env: "sk-{SECRET}"}}]',
            {},
            "backends[0].api_key_env: must be the name of the environment variable",
        ),
        (
            f'backends: [{{name: a, url: "ftp://u:{SECRET}@a/v1"}}]',
            {},
            "backends[0].url: scheme must be http://, https:// or echo://",
        ),
        # a key in the query: the endpoint would be appended after it, and errors would carry it
        (
            f'backends: [{{name: a, url: "https://a/v1?api-key={SECRET}"}}]',
            {},
            "backends[0].url: must end with the API's base path",
        ),
    ],
)
def test_a_secret_in_a_wrong_place_is_named_by_its_path_and_never_shown(
    tmp_path: Path, text: str, env: dict[str, str], line: str
) -> None:
    # Given a password, a URL with one or an API key where it does not belong
    # When the file is validated
    result = validate(tmp_path, text, env)
    # Then the problem names the field, and no part of the secret is printed
    assert result.exit_code == 3, result.output
    assert f"  {line}" in result.output
    for part in (SECRET, "4815162342", *SPLIT_SECRET.split("/"), "Pw[Xq7]"):
        assert part not in result.output


def test_secrets_in_their_places_are_not_printed(tmp_path: Path) -> None:
    # Given every kind of secret in its place, and a file that also gets warnings
    text = f"""
database:
  redis: {{password: "{SECRET}-r"}}
  postgres: {{password: "{SECRET}-p", dsn: "postgresql://llmq:{SECRET}-d@db:5432/llmq"}}
api_keys: ["{SECRET}-k"]
backends: [{{name: a, url: "http://a/v1", api_key_env: OPENAI_API_KEY}}]
queue: {{enable_metrics: true}}
scheduler: {{timeout: 60s}}
"""
    # When it is validated, with a Redis URL holding a password in the environment too
    result = validate(tmp_path, text, {"LLMQ_REDIS_URL": f"rediss://llmq:{SECRET}-u@redis:6380/0"})
    # Then it passes with its warnings, and no secret is printed
    assert result.exit_code == 0, result.output
    assert result.output.count("warning: ") == 2 and "ok: " in result.output
    assert SECRET not in result.output


# --- production mode needs API keys ---------------------------------------------------------------------

PRODUCTION_REFUSED = (
    "api_keys: server.mode is production but no API key is set, so anyone could read every result and replay "
    "dead letters; set api_keys (or LLMQ_API_KEYS, or server.api_keys_file), or server.allow_anonymous: true to "
    "mean it"
)


def test_production_mode_without_api_keys_is_refused(tmp_path: Path) -> None:
    assert problems_of(tmp_path, "server: {mode: production}") == [PRODUCTION_REFUSED]
    assert problems_of(tmp_path, "server: {mode: production}", env={"LLMQ_API_KEYS": " , "}) == [
        f"{PRODUCTION_REFUSED} (from LLMQ_API_KEYS)"
    ]


@pytest.mark.parametrize(
    ("text", "env"),
    [
        ("server: {mode: production}", {"LLMQ_API_KEYS": "k1,k2"}),
        ("server: {mode: production}\napi_keys: [k1]", {}),
        ("server: {mode: production, allow_anonymous: true}", {}),
        ("server: {mode: development}", {}),
    ],
)
def test_production_mode_starts_with_keys_or_when_told_to_be_open(
    tmp_path: Path, text: str, env: dict[str, str]
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert isinstance(load_config(path, env=env), Config)


def test_an_empty_api_key_is_refused(tmp_path: Path) -> None:
    # An empty key would match every request that sends no key at all.
    assert problems_of(tmp_path, 'api_keys: [k1, ""]') == [
        "api_keys[1]: an empty key would let in every request that sends none"
    ]


# --- warnings: allowed, but likely wrong ------------------------------------------------------------------


def test_fields_that_do_nothing_get_one_warning_naming_each(tmp_path: Path) -> None:
    # Given the seed's fields that llmq accepts but does not use, three in the file and one from the environment
    text = "queue: {enable_metrics: true}\nscheduler: {max_retries: 5}\nmetrics: {enabled: false}\n"
    # When the file is validated
    result = validate(tmp_path, text, {"LLMQ_QUEUE__ENABLE_AUTO_SCALING": "false"})
    # Then it passes, with one warning line naming each field (and the variable that set one)
    assert result.exit_code == 0, result.output
    [warning] = [line for line in result.output.splitlines() if line.startswith("warning: ")]
    for field in ("queue.enable_metrics", "scheduler.max_retries", "metrics.enabled", "queue.enable_auto_scaling"):
        assert field in warning
    assert "(from LLMQ_QUEUE__ENABLE_AUTO_SCALING)" in warning
    assert "queue.retry.max_retries" in warning  # what to use instead


def test_a_file_without_them_gets_no_warning(tmp_path: Path) -> None:
    result = validate(tmp_path, "queue: {retry: {max_retries: 5}}\nmetrics: {port: 9100}\n")
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output


@pytest.mark.parametrize(
    ("grace", "timeout", "warns"), [("30s", "300s", True), ("5m", "300s", False), ("30s", "30s", False)]
)
def test_a_shutdown_grace_shorter_than_a_call_warns(tmp_path: Path, grace: str, timeout: str, warns: bool) -> None:
    # Given a grace period and the longest a backend call may take
    text = f"queue: {{worker: {{shutdown_grace: {grace}}}}}\nscheduler: {{timeout: {timeout}}}\n"
    # When the file is validated
    result = validate(tmp_path, text)
    # Then a grace shorter than a call is a warning naming both, not an error
    assert result.exit_code == 0, result.output
    expected = (
        f"warning: queue.worker.shutdown_grace: {grace} is shorter than scheduler.timeout {timeout}: on SIGTERM a "
        "longer backend call is abandoned, reclaimed and made again"
    )
    assert (expected in result.output) is warns, result.output


def test_a_password_of_digits_from_the_environment_stays_text() -> None:
    config = load_config(None, env={"LLMQ_DATABASE__REDIS__PASSWORD": "0123456789"})
    assert config.redis.password == "0123456789"


def test_every_config_field_is_in_the_example_file() -> None:
    # An operator learns the schema from configs/config.yaml.example: each field is there, set or commented
    # out, but for the seed's fields that do nothing (left out on purpose, the file says so)
    text = (ROOT / "configs" / "config.yaml.example").read_text()
    missing: list[str] = []

    def walk(t: mi.Type, path: str) -> None:
        if isinstance(t, mi.StructType):
            for f in t.fields:
                at = f"{path}.{f.encode_name}" if path else f.encode_name
                named = re.search(rf"(^|[\s{{,#]){re.escape(f.encode_name)}:", text, re.M)
                if not named and at.replace("[]", "") not in IGNORED_FIELDS:
                    missing.append(at)
                walk(f.type, at)
        elif isinstance(t, mi.UnionType):
            for u in t.types:
                walk(u, path)
        elif isinstance(t, mi.ListType):
            walk(t.item_type, path + "[]")

    walk(mi.type_info(Config), "")
    assert missing == []


def test_a_batchs_level_is_the_lowest_unless_named_and_a_named_one_must_exist() -> None:
    assert load_config(None, env={}).batch_level == "low"
    each = "max_wait_time: 1s, max_concurrent: 4"
    levels = ", ".join(f"{{name: {n}, priority: {p}, {each}}}" for n, p in (("now", 1), ("later", 9), ("soon", 5)))
    levels = f"[{levels}]"
    assert load_config(None, env={"LLMQ_QUEUE__LEVELS": levels}).batch_level == "later"
    assert load_config(None, env={"LLMQ_BATCHES__LEVEL": "high"}).batch_level == "high"
    with pytest.raises(ConfigError) as info:
        load_config(None, env={"LLMQ_BATCHES__LEVEL": "bulk"})
    assert info.value.problems == [
        "batches.level: 'bulk' is no level of queue.levels (realtime, high, normal, low) (from LLMQ_BATCHES__LEVEL)"
    ]


def test_webhook_endpoints_name_their_secret_by_variable_and_tenants_stay_within_them() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(
            None,
            env={
                "LLMQ_WEBHOOKS__ENDPOINTS": '[{url: "ftp://x/", secret_env: "whsec_c2VjcmV0"}]',
                "LLMQ_TENANTS": '[{name: a, webhook_url: "http://169.254.169.254/"}]',
            },
        )
    problems = "\n".join(info.value.problems)
    assert "webhooks.endpoints[0].url: must be an http(s) URL" in problems
    assert "webhooks.endpoints[0].secret_env: must be the name of the environment variable" in problems
    assert "tenants[0].webhook_url: is under none of webhooks.endpoints[].url open to it" in problems
    assert "c2VjcmV0" not in problems  # (a secret given by mistake is never shown)
