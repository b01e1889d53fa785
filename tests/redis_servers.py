"""Real Redis deployments for tests, from Debian's redis-server 7 (installed by `make setup`):
a 3-master Redis Cluster, a primary + replica + 3 sentinels, and a TLS server with an ACL user.
Each runs on free loopback ports in its own directory and is removed by close()."""

from __future__ import annotations

import datetime
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from llamaship.stack import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"


def require_binaries() -> None:
    if not (Path(REDIS_SERVER).exists() and Path(REDIS_CLI).exists()):
        pytest.fail("redis-server/redis-cli (Debian's redis-server package) are missing: run `make setup`")


def _wait(predicate, what: str, timeout_s: float = 20.0, step_s: float = 0.05) -> None:
    deadline = time.time() + timeout_s
    while not predicate():
        if time.time() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(step_s)


def _cli(port: int, *args: str, extra: tuple[str, ...] = ()) -> str:
    out = subprocess.run([REDIS_CLI, "-h", "127.0.0.1", "-p", str(port), *extra, *args], capture_output=True,
                         text=True, timeout=20)
    return out.stdout.strip()


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


class Deployment:
    """Processes in one temporary directory; close() stops them (SIGTERM, then SIGKILL) and removes it."""

    def __init__(self, name: str):
        self.dir = Path(tempfile.mkdtemp(prefix=f"llamaship-{name}-"))
        self.procs: dict[int, subprocess.Popen] = {}

    def server(self, port: int, *args: str, sentinel_conf: str | None = None) -> subprocess.Popen:
        work = self.dir / str(port)
        work.mkdir(exist_ok=True)
        if sentinel_conf is not None:
            conf = work / "sentinel.conf"
            conf.write_text(sentinel_conf)
            cmd = [REDIS_SERVER, str(conf), "--sentinel"]
        else:
            cmd = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                   "--dir", str(work), *args]
        log = open(work / "log", "w")
        self.procs[port] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=work)
        log.close()
        return self.procs[port]

    def kill(self, port: int) -> None:
        proc = self.procs.pop(port)
        proc.kill()
        proc.wait(10)

    def close(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self.procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Cluster(Deployment):
    """Three masters, slots split by `redis-cli --cluster create`."""

    def __init__(self, masters: int = 3):
        super().__init__("cluster")
        self.ports = [free_port() for _ in range(masters)]
        try:
            for port in self.ports:  # the bus port is explicit: port + 10000 may not exist
                self.server(port, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                            "--cluster-node-timeout", "2000", "--cluster-port", str(free_port()))
            for port in self.ports:
                _wait(lambda: _listening(port), f"cluster node {port}")
            out = subprocess.run([REDIS_CLI, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                                  "--cluster-replicas", "0", "--cluster-yes"], capture_output=True, text=True,
                                 timeout=60)
            if out.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {out.stdout}{out.stderr}")
            for port in self.ports:
                _wait(lambda: "cluster_state:ok" in _cli(port, "CLUSTER", "INFO"), f"cluster state ok on {port}")
        except BaseException:
            self.close()
            raise

    @property
    def nodes(self) -> str:
        return ",".join(f"127.0.0.1:{p}" for p in self.ports)


class SentinelGroup(Deployment):
    """A primary, one replica and three sentinels that monitor the primary as `master`."""

    MASTER = "llamaship"

    def __init__(self):
        super().__init__("sentinel")
        self.primary, self.replica = free_port(), free_port()
        self.sentinel_ports = [free_port() for _ in range(3)]
        try:
            self.server(self.primary)
            self.server(self.replica, "--replicaof", "127.0.0.1", str(self.primary))
            for port in self.sentinel_ports:
                self.server(port, sentinel_conf=(
                    f"port {port}\nbind 127.0.0.1\ndir {self.dir / str(port)}\n"
                    f"sentinel monitor {self.MASTER} 127.0.0.1 {self.primary} 2\n"
                    f"sentinel down-after-milliseconds {self.MASTER} 1000\n"
                    f"sentinel failover-timeout {self.MASTER} 10000\n"
                    f"sentinel parallel-syncs {self.MASTER} 1\n"))
            _wait(lambda: "master_link_status:up" in _cli(self.replica, "INFO", "replication"), "the replica's sync")
            for port in self.sentinel_ports:
                _wait(lambda: "slaves=1,sentinels=3" in _cli(port, "INFO", "sentinel"),
                      f"sentinel {port} to see the replica and the other sentinels")
        except BaseException:
            self.close()
            raise

    @property
    def sentinels(self) -> str:
        return ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)

    def master_port(self) -> int:
        addr = _cli(self.sentinel_ports[0], "SENTINEL", "get-master-addr-by-name", self.MASTER).split()
        return int(addr[1]) if len(addr) == 2 else 0


def make_certs(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate signed by it
    (PEM files: ca, cert, key, client_cert, client_key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("llamaship test CA")).issuer_name(name("llamaship test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    paths = {"ca": directory / "ca.pem"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for prefix, cn, sans in (("", "127.0.0.1", [x509.DNSName("localhost"),
                                                 x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                             ("client_", "llamaship client", [x509.DNSName("client")])):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .sign(ca_key, hashes.SHA256()))
        paths[prefix + "cert"] = directory / f"{prefix or 'server_'}cert.pem"
        paths[prefix + "key"] = directory / f"{prefix or 'server_'}key.pem"
        paths[prefix + "cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[prefix + "key"].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                            serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()))
    return paths


class TlsServer(Deployment):
    """One server on a TLS port only that requires a client certificate from its CA, with ACL user
    `user`/`password` and the default user off."""

    def __init__(self, user: str, password: str):
        super().__init__("tls")
        self.port = free_port()
        self.certs = make_certs(self.dir)
        try:
            self.server(0, "--tls-port", str(self.port), "--tls-cert-file", str(self.certs["cert"]),
                        "--tls-key-file", str(self.certs["key"]), "--tls-ca-cert-file", str(self.certs["ca"]),
                        "--tls-auth-clients", "yes", "--user", "default", "off",
                        "--user", user, "on", f">{password}", "~*", "&*", "+@all")
            _wait(lambda: _listening(self.port), "the TLS port")
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"
