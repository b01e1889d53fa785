"""Publish and fetch times of a build through the S3 store, on loopback.

    .venv/bin/python scripts/bench_store_s3.py [--mb 500] [--server seaweedfs|moto] [--files 4]

Starts the S3 server (tests/s3_server.py), publishes a build of --files random files totalling
--mb MiB from one cache directory, fetches it into a fresh one (every blob sha256-checked), then
re-publishes it (every blob already there: HEADs only) and prints the times as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.store import Manifest  # noqa: E402
from shared.store_s3 import S3BuildStore, client  # noqa: E402
from tests.s3_server import aws_env, moto_server, seaweedfs_server  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=500)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--server", choices=("seaweedfs", "moto"), default="seaweedfs")
    ap.add_argument("--multipart-mb", type=int, default=64)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp:
        base = Path(tmp)
        server = seaweedfs_server(base / "weed") if args.server == "seaweedfs" else moto_server(base / "moto.log")
        with server as env, aws_env(env):
            bucket = f"bench-{uuid.uuid4().hex[:8]}"
            client().create_bucket(Bucket=bucket)
            url = f"s3://{bucket}/bench"
            kw = {"multipart_bytes": args.multipart_mb << 20}
            compiler = S3BuildStore(url, cache_dir=base / "compiler", **kw).ensure()
            staging = compiler.new_staging("bench")
            per_file = (args.mb << 20) // args.files
            for i in range(args.files):
                with open(staging / f"part-{i}.bin", "wb") as f:
                    for _ in range(per_file >> 20):
                        f.write(os.urandom(1 << 20))
            manifest = Manifest(build_id="bench", model_name="bench", source_path="-", source_sha256="-",
                                recipe="fp32", recipe_details={}, target_pool="cpu", execution_provider="cpu",
                                context_length=1, max_batch=1, tool_versions={})
            t0 = time.perf_counter()
            compiler.publish(staging, manifest)
            publish_s = time.perf_counter() - t0

            replica = S3BuildStore(url, cache_dir=base / "replica", **kw).ensure()
            t0 = time.perf_counter()
            replica.verify("bench", full=False)
            fetch_s = time.perf_counter() - t0

            again = compiler.new_staging("bench")
            for f in staging.glob("part-*"):
                os.link(f, again / f.name)
            t0 = time.perf_counter()
            compiler.publish(again, Manifest(**{**manifest.__dict__, "files": []}))
            republish_s = time.perf_counter() - t0
    mib = args.files * per_file / (1 << 20)
    print(json.dumps({"server": args.server, "mib": mib, "files": args.files, "multipart_mb": args.multipart_mb,
                      "publish_s": round(publish_s, 2), "fetch_s": round(fetch_s, 2),
                      "republish_existing_s": round(republish_s, 2),
                      "publish_mib_s": round(mib / publish_s, 1), "fetch_mib_s": round(mib / fetch_s, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
