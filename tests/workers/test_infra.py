"""What can be checked of infra/ without a Docker engine: the files parse, every referenced file and
module exists, ports agree between compose, Prometheus, the code defaults and the local stack, and
every ``tongkuan_*`` metric the dashboard or Prometheus config uses is defined in the code."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
DASHBOARD = INFRA / "grafana" / "dashboards" / "tongkuan.json"
# Metric names the dashboard shows that a colleague's process is still to define (the query API's
# per-stage latency, tongkuan.api). Remove a name here once it is defined.
PENDING_METRICS: set[str] = set()
PENDING_MODULES: set[str] = set()

import yaml  # noqa: E402 - the dev extra


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(INFRA / "docker-compose.yml")


def defined_metric_names() -> set[str]:
    """Every ``"tongkuan_..."`` literal in source files that use prometheus_client."""
    names: set[str] = set()
    for path in REPO.rglob("*.py"):
        rel = path.relative_to(REPO).parts
        if rel[0] in {".venv", "tests", "var", "models", "reports"}:
            continue
        text = path.read_text(errors="replace")
        if "prometheus_client" in text:
            names |= set(re.findall(r"[\"'](tongkuan_[a-z0-9_]+)[\"']", text))
    return names


def is_defined(name: str, defined: set[str]) -> bool:
    for suffix in ("", "_total", "_bucket", "_sum", "_count", "_created"):
        if suffix and not name.endswith(suffix):
            continue
        base = name[: len(name) - len(suffix)] if suffix else name
        if base in defined or f"{base}_total" in defined or (suffix == "_total" and base in defined):
            return True
    return False


def used_metric_names(text: str) -> set[str]:
    return set(re.findall(r"\b(tongkuan_[a-z0-9_]+)", text))


def test_all_yaml_and_json_parse(compose):
    assert compose["services"]
    for path in [INFRA / "prometheus.yml", *sorted((INFRA / "grafana" / "provisioning").rglob("*.yml"))]:
        assert isinstance(load_yaml(path), dict), path
    json.loads(DASHBOARD.read_text())


def test_compose_services_reference_existing_things(compose):
    services = compose["services"]
    expected = {"kafka", "kafka-init", "redis", "qdrant", "api", "dispatcher", "worker", "prometheus", "grafana"}
    assert expected <= set(services)
    assert "KRaft" in (INFRA / "docker-compose.yml").read_text()
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        if "build" in svc:
            context = (INFRA / svc["build"]["context"]).resolve()
            assert context == REPO and (context / svc["build"]["dockerfile"]).is_file(), name
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("./secrets"):
                continue  # made by the operator (`tongkuan keys add`, the compose header), never committed
            if src.startswith("."):
                assert (INFRA / src).exists(), f"{name}: {src}"
            else:
                assert src in compose["volumes"], f"{name}: named volume {src}"
        deps = svc.get("depends_on", {})
        for dep in deps if isinstance(deps, list) else deps.keys():
            assert dep in services, f"{name} depends on unknown {dep}"


def _module_of(command: list[str]) -> str:
    if command[:2] == ["celery", "-A"]:
        return command[2]
    if command[:2] == ["python", "-m"]:
        return command[2]
    if command[0] == "uvicorn":
        return next(c for c in command if ":" in c).split(":")[0]
    raise AssertionError(f"unknown command {command}")


def test_our_service_commands_name_existing_modules(compose):
    for name in ("api", "dispatcher", "worker", "worker-gpu", "features"):
        module = _module_of(compose["services"][name]["command"])
        if module in PENDING_MODULES and importlib.util.find_spec(module) is None:
            continue
        assert importlib.util.find_spec(module) is not None, f"{name}: {module}"


def test_topics_match_the_code(compose):
    from events.topics import ALL_TOPICS
    from infra.tansu import DEFAULT_TOPICS

    script = compose["services"]["kafka-init"]["command"][0]
    specs = dict(s.split(":") for s in re.search(r"for spec in ([^;]+);", script).group(1).split())
    assert set(specs) == set(ALL_TOPICS)
    assert {k: int(v) for k, v in specs.items()} == DEFAULT_TOPICS


def test_ports_agree(compose):
    from feature_store.consumer import FeatureConsumerSettings
    from workers.settings import DispatcherSettings, WorkerSettings

    prom = load_yaml(INFRA / "prometheus.yml")
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    services = compose["services"]
    api_cmd = services["api"]["command"]
    assert jobs["api"]["static_configs"][0]["targets"] == [f"api:{api_cmd[api_cmd.index('--port') + 1]}"]
    disp_port = services["dispatcher"]["environment"]["TONGKUAN_DISPATCHER__METRICS_PORT"]
    assert jobs["dispatcher"]["static_configs"][0]["targets"] == [f"dispatcher:{disp_port}"]
    assert int(disp_port) == DispatcherSettings.model_fields["metrics_port"].default
    worker_port = services["worker"]["environment"]["TONGKUAN_WORKER__METRICS_PORT"]
    assert jobs["worker"]["dns_sd_configs"][0] == {"names": ["worker"], "type": "A", "port": int(worker_port)}
    assert int(worker_port) == WorkerSettings.model_fields["metrics_port"].default
    feat_port = services["features"]["environment"]["TONGKUAN_FEATURES__METRICS_PORT"]
    assert jobs["features"]["static_configs"][0]["targets"] == [f"features:{feat_port}"]
    assert int(feat_port) == FeatureConsumerSettings.model_fields["metrics_port"].default
    for name, component in (("dispatcher", "DISPATCHER"), ("worker", "WORKER"), ("features", "FEATURES")):
        env = services[name]["environment"]  # reachable from Prometheus, not only on loopback
        assert env[f"TONGKUAN_{component}__METRICS_ADDR"] == "0.0.0.0"
    from infra.stack import main as _  # noqa: F401 - importable
    stack = (INFRA / "stack.py").read_text()
    assert f'"--worker-metrics-port", type=int, default={worker_port}' in stack
    assert f'"--dispatcher-metrics-port", type=int, default={disp_port}' in stack
    assert f'"--features-metrics-port", type=int, default={feat_port}' in stack
    dockerfile = (INFRA / "Dockerfile").read_text()
    for port in ("8000", worker_port, disp_port, feat_port):
        assert re.search(rf"^EXPOSE .*\b{port}\b", dockerfile, re.M), port


def test_the_production_api_has_keys_and_prometheus_presents_one(compose):
    """Production refuses to start without a keys file, and the API's /metrics needs the admin
    scope: the compose API gets the keys file from the mounted secrets, Prometheus its key."""
    api = compose["services"]["api"]
    keys_file = api["environment"]["TONGKUAN_API__KEYS_FILE"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in api["volumes"]}
    assert str(Path(keys_file).parent) in mounts
    job = {j["job_name"]: j for j in load_yaml(INFRA / "prometheus.yml")["scrape_configs"]}["api"]
    assert job["authorization"]["type"] == "Bearer"
    prom_mounts = {m.split(":")[1] for m in compose["services"]["prometheus"]["volumes"]}
    assert job["authorization"]["credentials_file"] in prom_mounts
    assert api["environment"]["TONGKUAN_ENVIRONMENT"] == "production"


def test_every_metric_in_dashboard_and_prometheus_is_defined():
    defined = defined_metric_names()
    assert "tongkuan_ingest_event_to_searchable_seconds" in defined  # the scan works
    used = used_metric_names(DASHBOARD.read_text()) | used_metric_names((INFRA / "prometheus.yml").read_text())
    missing = {n for n in used if not is_defined(n, defined) and not is_defined(n, PENDING_METRICS)}
    assert not missing, f"used but not defined in code: {sorted(missing)}"


def test_dashboard_covers_what_operators_watch():
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    ds = load_yaml(INFRA / "grafana" / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    assert all(p["datasource"]["uid"] == ds["uid"] for p in dash["panels"])
    for needle in ("tongkuan_query_stage_seconds", "tongkuan_ingest_event_to_searchable_seconds_bucket",
                   "tongkuan_dispatcher_lag_records", "tongkuan_celery_queue_depth", "tongkuan_dlq_events_total",
                   "tongkuan_ingest_batch_events_bucket", "tongkuan_ingest_stage_seconds_bucket",
                   "tongkuan_hook_requests_total", "tongkuan_api_requests_total", "tongkuan_api_request_seconds_bucket",
                   "tongkuan_query_no_match_total", "tongkuan_query_errors_total"):
        assert needle in exprs, needle
    prov = load_yaml(INFRA / "grafana" / "provisioning" / "dashboards" / "tongkuan.yml")
    grafana = load_yaml(INFRA / "docker-compose.yml")["services"]["grafana"]
    assert f"./grafana/dashboards:{prov['providers'][0]['options']['path']}:ro" in grafana["volumes"]


def test_dockerfile_copies_existing_paths():
    for line in (INFRA / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            for src in line.split()[1:-1]:
                assert src == "." or (REPO / src).exists(), src


def test_stack_stop_ends_a_service_by_its_pid_file(tmp_path):
    from infra.stack import pid_alive, read_pid, stop_pid_file

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        pid_file = tmp_path / "svc.pid"
        pid_file.write_text(str(proc.pid))
        assert read_pid(pid_file) == proc.pid and pid_alive(proc.pid)
        t0 = time.monotonic()
        stop_pid_file("svc", pid_file, grace=5)
        proc.wait(timeout=5)
        assert proc.returncode == -signal.SIGTERM and time.monotonic() - t0 < 5
        assert not pid_file.exists()
        stop_pid_file("svc", pid_file, grace=1)  # idempotent
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def test_compose_environment_names_real_settings_and_accepted_worker_layouts(compose):
    """Every TONGKUAN_* variable in compose is a setting of some process (the shared block serves
    them all; a typo would be ignored by the processes that do not read that component), the
    service's own process reads its environment without an error, and each worker's pool layout is
    one the worker accepts at start-up (``workers.runtime.check_layout``)."""
    from tongkuan.config import PROCESSES, WorkerConfig, component_classes
    from workers.runtime import check_layout

    roles = {"api": "api", "dispatcher": "dispatcher", "worker": "worker", "worker-gpu": "worker",
             "features": "features"}
    def names(prefix: str, annotation) -> set[str]:
        """The variables of a setting: itself, or those of its model's fields (nested too)."""
        out: set[str] = set()
        for cls in component_classes(annotation):
            for f, sub in cls.model_fields.items():
                out |= names(f"{prefix}__{f.upper()}", sub.annotation)
        return out or {prefix}

    known = set()
    for root in PROCESSES.values():
        for component, field in root.model_fields.items():
            known |= names(f"TONGKUAN_{component.upper()}", field.annotation)
    for name, svc in compose["services"].items():
        env = {k: str(v) for k, v in (svc.get("environment") or {}).items() if k.startswith("TONGKUAN_")}
        if not env:
            continue
        unknown = set(env) - known
        assert not unknown, f"{name}: {sorted(unknown)}"
        root = PROCESSES[roles[name]]
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            if "TONGKUAN_HOOK__SECRET" in env:
                mp.setenv("TONGKUAN_HOOK__SECRET", "x" * 40)  # the compose file asks the operator for it
            cfg = root()  # every value parses and validates as that process would read it
        if isinstance(cfg, WorkerConfig):
            check_layout(cfg.index, cfg.worker, cfg.worker.pool, cfg.worker.concurrency)
