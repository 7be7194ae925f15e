"""The local stack for ``make up`` / ``make down``: Tansu broker, Celery worker, dispatcher, the
feature-event consumer, API.

    python -m infra.stack start|stop|status [--api-port 8000] [--worker-metrics-port 9102] ...

Redis must already run on the broker URL's host (the dev machines run one on 127.0.0.1:6379);
``start`` refuses to go on without it. Tansu is started through ``infra.tansu`` (its state in
``var/stack/tansu/``). Every other process runs in its own session with its pid file and log under
``var/stack/``; ``start`` waits for each health check (worker and dispatcher: ``/metrics`` answers;
API: ``/healthz``), ``stop`` sends SIGTERM to each process group in reverse order and SIGKILL after a
grace period. Embedded mode: the one worker process owns the Edge index; it runs two tasks at once on
the threads pool (``--worker-pool threads --worker-concurrency 2``: 13–19 % more items/s than
``solo`` on the 2-core dev machine, ``make bench-ingest``), and the dispatcher keeps four batches in
flight so both stay fed.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
STATE_DIR = REPO_ROOT / "var" / "stack"
SERVICE_NAMES = ("worker", "dispatcher", "features", "api")  # started in this order, stopped in reverse


@dataclass
class Service:
    name: str
    argv: list[str]
    health_url: str
    env: dict[str, str]

    def pid_file(self, state: Path) -> Path:
        return state / f"{self.name}.pid"

    def log_file(self, state: Path) -> Path:
        return state / f"{self.name}.log"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def healthy(url: str, timeout: float = 1.0) -> bool:
    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return check()


def start_service(svc: Service, state: Path, timeout: float) -> None:
    pid = read_pid(svc.pid_file(state))
    if pid and pid_alive(pid):
        print(f"{svc.name}: already running (pid {pid})")
        return
    with open(svc.log_file(state), "ab") as log:
        proc = subprocess.Popen(svc.argv, cwd=REPO_ROOT, env={**os.environ, **svc.env}, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    svc.pid_file(state).write_text(str(proc.pid))
    ok = wait_until(lambda: proc.poll() is None and healthy(svc.health_url), timeout)
    if not ok:
        raise RuntimeError(f"{svc.name} not healthy after {timeout:.0f}s (exit {proc.poll()}); "
                           f"see {svc.log_file(state)}")
    print(f"{svc.name}: up (pid {proc.pid}) {svc.health_url}, log {svc.log_file(state)}")


def stop_pid_file(name: str, pid_file: Path, grace: float) -> None:
    pid = read_pid(pid_file)
    if pid is None:
        print(f"{name}: not running")
        return
    if pid_alive(pid):
        try:
            os.killpg(pid, signal.SIGTERM)  # the service's own session (start_new_session)
        except ProcessLookupError:
            pass
        if not wait_until(lambda: not pid_alive(pid), grace):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            wait_until(lambda: not pid_alive(pid), 5)
        print(f"{name}: stopped (pid {pid})")
    pid_file.unlink(missing_ok=True)


def services(a: argparse.Namespace, bootstrap: str, hook_secret: str) -> list[Service]:
    py = sys.executable
    common = {
        "TONGKUAN_ENVIRONMENT": "development",
        "TONGKUAN_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "TONGKUAN_CELERY__BROKER_URL": a.broker_url,
        "TONGKUAN_INDEX__BACKEND": "edge",
        # Object keys in events resolve here (the worker fetches them, the API's page serves them).
        "TONGKUAN_FETCH__OBJECT_ROOT": str(a.object_root),
        "TONGKUAN_SEARCH__IMAGE_BASE_URL": "/images",
        # The feature store: the consumer writes it, the API's re-ranker reads it (online in Redis).
        "TONGKUAN_FEATURE_STORE__DATA_DIR": str(a.state / "features"),
        "TONGKUAN_FEATURE_STORE__ONLINE__TYPE": "redis",
        "TONGKUAN_FEATURE_STORE__ONLINE__URL": a.broker_url,
        "TONGKUAN_RERANK__MODELS_DIR": str(a.state / "rerank" / "models"),
    }
    return [
        Service("worker",
                [py, "-m", "celery", "-A", "tongkuan.worker", "worker", f"--pool={a.worker_pool}",
                 f"--concurrency={a.worker_concurrency}", "--loglevel=INFO", "--without-gossip", "--without-mingle"],
                f"http://127.0.0.1:{a.worker_metrics_port}/metrics",
                {**common, "TONGKUAN_WORKER__POOL": a.worker_pool,
                 "TONGKUAN_WORKER__CONCURRENCY": str(a.worker_concurrency),
                 "TONGKUAN_WORKER__INGEST_PROCESSES": str(a.ingest_processes),
                 "TONGKUAN_WORKER__METRICS_PORT": str(a.worker_metrics_port),
                 "TONGKUAN_WORKER__METRICS_ADDR": "127.0.0.1",
                 # The worker owns the embedded index and serves reads of it to the API.
                 "TONGKUAN_WORKER__INDEX_READ_PORT": str(a.index_read_port),
                 "TONGKUAN_WORKER__INDEX_READ_ADDR": "127.0.0.1"}),
        Service("dispatcher", [py, "-m", "tongkuan.dispatcher"],
                f"http://127.0.0.1:{a.dispatcher_metrics_port}/metrics",
                {**common, "TONGKUAN_DISPATCHER__METRICS_PORT": str(a.dispatcher_metrics_port),
                 "TONGKUAN_DISPATCHER__MAX_IN_FLIGHT": str(a.max_in_flight),
                 "TONGKUAN_DISPATCHER__METRICS_ADDR": "127.0.0.1"}),
        Service("features", [py, "-m", "tongkuan.features"], f"http://127.0.0.1:{a.features_metrics_port}/metrics",
                {**common, "TONGKUAN_FEATURES__METRICS_PORT": str(a.features_metrics_port)}),
        Service("api",
                [py, "-m", "uvicorn", "--factory", "tongkuan.api:create_app", "--host", "127.0.0.1",
                 "--port", str(a.api_port)],
                f"http://127.0.0.1:{a.api_port}/readyz",
                {**common, "TONGKUAN_HOOK__SECRET": hook_secret,
                 # The embedded index belongs to the worker (one process per Edge index): search
                 # embeds here and sends the vectors to the worker's index read service.
                 "TONGKUAN_API__INDEX_OWNER_URL": f"http://127.0.0.1:{a.index_read_port}",
                 # impressions and feedback on the broker (search.interactions), feedback checked in Redis
                 "TONGKUAN_INTERACTIONS__SINK": "kafka", "TONGKUAN_INTERACTIONS__LEDGER": "redis"}),
    ]


def hook_secret(state: Path) -> str:
    """TONGKUAN_HOOK__SECRET if set, else one generated for this checkout (var/stack/hook_secret)."""
    if os.environ.get("TONGKUAN_HOOK__SECRET"):
        return os.environ["TONGKUAN_HOOK__SECRET"]
    path = state / "hook_secret"
    if not path.exists():
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return path.read_text().strip()


def redis_ok(url: str) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except redis.exceptions.RedisError:
        return False


def tansu(action: str, state: Path) -> int:
    """``python -m infra.tansu`` with its state in ``<state>/tansu`` (this stack's own broker)."""
    return subprocess.call([sys.executable, "-m", "infra.tansu", action, "--state-dir", str(state / "tansu")],
                           cwd=REPO_ROOT)


def cmd_start(a: argparse.Namespace) -> int:
    a.state.mkdir(parents=True, exist_ok=True)
    a.object_root.mkdir(parents=True, exist_ok=True)
    if not redis_ok(a.broker_url):
        print(f"Redis not reachable at {a.broker_url}: start it first", file=sys.stderr)
        return 1
    if tansu("start", a.state) != 0:
        return 1
    bootstrap = (a.state / "tansu" / "bootstrap").read_text().strip()
    try:
        for svc in services(a, bootstrap, hook_secret(a.state)):
            start_service(svc, a.state, a.timeout)
    except RuntimeError as e:
        print(f"start failed: {e}; stopping what started", file=sys.stderr)
        cmd_stop(a)
        return 1
    print(f"stack up: kafka {bootstrap}, hook http://127.0.0.1:{a.api_port}/v1/hooks/catalog, search page "
          f"http://127.0.0.1:{a.api_port}/ (object keys resolve under {a.object_root})")
    return 0


def cmd_stop(a: argparse.Namespace) -> int:
    for name in reversed(SERVICE_NAMES):  # producers first, the index owner last
        stop_pid_file(name, a.state / f"{name}.pid", a.grace)
    tansu("stop", a.state)
    return 0


def cmd_status(a: argparse.Namespace) -> int:
    bootstrap = ""
    if (a.state / "tansu" / "bootstrap").exists():
        bootstrap = (a.state / "tansu" / "bootstrap").read_text().strip()
    all_ok = tansu("status", a.state) == 0
    for svc in services(a, bootstrap, "-"):
        pid = read_pid(svc.pid_file(a.state))
        alive = bool(pid and pid_alive(pid))
        ok = alive and healthy(svc.health_url)
        all_ok &= ok
        state = "healthy" if ok else ("running, not healthy" if alive else "not running")
        print(f"{svc.name}: {state}" + (f" (pid {pid})" if alive else ""))
    print(f"redis ({a.broker_url}): {'up' if redis_ok(a.broker_url) else 'down'}")
    return 0 if all_ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m infra.stack", description="local tongkuan stack")
    ap.add_argument("action", choices=["start", "stop", "status"])
    ap.add_argument("--state", type=Path, default=STATE_DIR)
    ap.add_argument("--broker-url", default=os.environ.get("TONGKUAN_CELERY__BROKER_URL", "redis://127.0.0.1:6379/0"))
    ap.add_argument("--api-port", type=int, default=8000)
    ap.add_argument("--worker-metrics-port", type=int, default=9102)
    ap.add_argument("--dispatcher-metrics-port", type=int, default=9103)
    ap.add_argument("--features-metrics-port", type=int, default=9104)
    ap.add_argument("--object-root", type=Path, default=STATE_DIR / "objects",
                    help="where events' object keys resolve (catalog images to upload)")
    ap.add_argument("--index-read-port", type=int, default=9110, help="the worker's index read service")
    ap.add_argument("--worker-pool", choices=("threads", "solo"), default="threads")
    ap.add_argument("--worker-concurrency", type=int, default=2, help="tasks at once (threads pool)")
    ap.add_argument("--ingest-processes", type=int, default=2,
                    help="the worker's embedding processes (0: embed on its task threads; README)")
    ap.add_argument("--max-in-flight", type=int, default=4, help="dispatcher batches in flight")
    ap.add_argument("--timeout", type=float, default=90.0, help="seconds per service health check")
    ap.add_argument("--grace", type=float, default=15.0, help="seconds between SIGTERM and SIGKILL")
    a = ap.parse_args(argv)
    return {"start": cmd_start, "stop": cmd_stop, "status": cmd_status}[a.action](a)


if __name__ == "__main__":
    sys.exit(main())
