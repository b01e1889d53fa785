"""End to end with `--store s3://...`: the real stack compiles the demo model into an S3 server
(moto_server, started here), a replica fetches it into its cache and serves it through the
gateway, token for token as the stack with a directory store does; `builds gc` keeps what an
alias references."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from shared.proto_gen.llamaship.compiler.v1 import compiler_pb2
from tests.conftest import ROOT
from tests.s3_server import aws_env, moto_server

pytestmark = pytest.mark.integration
PROMPT = "def main(argv):\n    "


@pytest.fixture(scope="module")
def s3_stack(tmp_path_factory, demo_model):
    from llamaship.stack import Stack, StackConfig
    from shared.store_s3 import client

    base = tmp_path_factory.mktemp("s3stack")
    with moto_server(base / "moto.log") as aws, aws_env(aws):
        bucket = f"ls-e2e-{uuid.uuid4().hex[:8]}"
        client().create_bucket(Bucket=bucket)
        url = f"s3://{bucket}/llamaship"
        cfg = StackConfig(store=url, log_dir=base / "logs", slots=2,
                          env={**aws, "LLAMASHIP_STORE_CACHE_DIR": str(base / "cache"),
                               "LLAMASHIP_JOB_LEASE_S": "6", "LLAMASHIP_QUEUE_TIMEOUT_S": "60"})
        stack = Stack(cfg).start()
        try:
            yield stack, url, base, aws
        finally:
            stack.stop()


def test_s3_store_compiles_serves_and_matches_the_directory_store(s3_stack, client, fp32_build, demo_model):
    from llamaship.client import GatewayClient
    from shared.store import BuildPins
    from shared.store_s3 import S3BuildStore

    stack, url, base, aws = s3_stack
    with GatewayClient(stack.gateway_address) as s3_client:
        job = s3_client.compile(str(demo_model), "demo", "fp32")
        assert job.state == compiler_pb2.JOB_STATE_SUCCEEDED, job.message
        assert job.build_id == fp32_build  # same checkpoint, recipe and tools: the same build id
        out = s3_client.generate("demo", PROMPT, 32)
    local = client.generate("demo", PROMPT, 32)
    assert out.build_id == fp32_build and len(out.token_ids) >= 16
    assert out.token_ids == local.token_ids and out.text == local.text

    # the build is in S3 (content-addressed blobs + manifest), not in any store directory
    viewer = S3BuildStore(url, cache_dir=base / "viewer").ensure()
    manifest = viewer.manifest(job.build_id)
    blobs = {o["Key"].rsplit("/", 1)[-1] for o in viewer._keys(viewer.loc.key("blobs", "sha256", ""))}
    assert {f.sha256 for f in manifest.files} <= blobs
    # the replica serves it from its local cache, pinned there
    cache = base / "cache"
    assert (cache / "builds" / job.build_id / "model.onnx").is_file()
    assert BuildPins(cache / ".locks").pinned(job.build_id)

    # gc keeps the build the alias references, even with nothing else kept
    env = {**os.environ, **aws, "LLAMASHIP_STORE_CACHE_DIR": str(base / "gc-cache")}
    done = subprocess.run([sys.executable, "-m", "llamaship.cli", "builds", "gc", "--store", url, "--redis-url",
                           stack.redis_url, "--keep", "0", "--grace-s", "0", "--json"],
                          env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["kept"] == [job.build_id] and report["removed"] == [] and report["blobs_removed"] == 0
    assert viewer.exists(job.build_id)

