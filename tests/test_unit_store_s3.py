"""The S3 build store against a real S3 server (moto_server, started here): publish, fetch, cache, gc."""

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from shared.errors import NotFound
from shared.store import BuildStore, Manifest, StoreError
from shared.store_gc import choose, collect
from shared.store_s3 import S3BuildStore, S3Location, client
from tests.s3_server import aws_env, make_certificate, moto_server, seaweedfs_server

MIB = 1 << 20
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory):
    with moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as env, aws_env(env):
        yield env


@pytest.fixture(scope="module")
def seaweedfs_env(tmp_path_factory, s3_env):
    with seaweedfs_server(tmp_path_factory.mktemp("seaweedfs")) as env:
        yield env


@pytest.fixture(params=["moto"])
def server_env(request, s3_env):
    """The S3 server a test runs against: moto by default; tests of the conditional put's race
    also run on SeaweedFS, whose check-and-write is atomic."""
    if request.param == "moto":
        yield s3_env
        return
    env = request.getfixturevalue("seaweedfs_env")
    with aws_env(env):
        yield env


@pytest.fixture()
def bucket_url(server_env):
    name = f"ls-{uuid.uuid4().hex[:12]}"
    client().create_bucket(Bucket=name)
    return f"s3://{name}/team/builds"


@pytest.fixture()
def make_store(bucket_url, tmp_path):
    def make(name="a", **kw) -> S3BuildStore:
        kw.setdefault("multipart_bytes", 5 * MIB)
        return S3BuildStore(bucket_url, cache_dir=tmp_path / f"cache-{name}", **kw).ensure()
    return make


both_servers = pytest.mark.parametrize("server_env", ["moto", "seaweedfs"], indirect=True)


def _manifest(build_id="b1", model="m", created_at=0.0, source="/src"):
    return Manifest(build_id=build_id, model_name=model, source_path=source, source_sha256="abc", recipe="fp32",
                    recipe_details={}, target_pool="cpu", execution_provider="cpu", context_length=128,
                    max_batch=4, tool_versions={"x": "1"}, created_at=created_at)


def _stage(store: BuildStore, build_id: str, files: dict[str, bytes]) -> Path:
    staging = store.new_staging(build_id)
    for rel, data in files.items():
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        (staging / rel).write_bytes(data)
    return staging


def _objects(store: S3BuildStore, *parts: str) -> dict[str, dict]:
    return {o["Key"]: o for o in store._keys(store.loc.key(*parts))}


def test_locations_parse_and_refuse():
    assert S3Location.parse("s3://my-bucket") == S3Location("my-bucket", "")
    assert S3Location.parse("s3://my-bucket/a/b/").key("blobs", "x") == "a/b/blobs/x"
    for bad in ("s3://", "s3://B", "s3://ok-bucket/../x", "s3://ok-bucket/a b", "http://x/y"):
        with pytest.raises(ValueError):
            S3Location.parse(bad)


def test_publish_uploads_each_blob_once_multipart_for_large_files_then_fetches(make_store):
    compiler, replica = make_store("compiler"), make_store("replica")
    big = os.urandom(11 * MIB)
    files = {"model.onnx": b"graph", "model.onnx.data": big, "copy/model.onnx.data": big, "tokenizer.json": b"{}"}
    published = compiler.publish(_stage(compiler, "b1", files), _manifest())
    blobs = _objects(compiler, "blobs", "sha256", "")
    assert len(blobs) == 3  # the two copies of the large file are one blob
    big_key = compiler.loc.key("blobs", "sha256", hashlib.sha256(big).hexdigest())
    assert compiler.s3.head_object(Bucket=compiler.loc.bucket, Key=big_key)["ETag"].endswith('-3"')  # 3 parts
    assert compiler.exists("b1") and not replica.cache.has("b1")
    assert [m.build_id for m in replica.list()] == ["b1"]

    manifest = replica.verify("b1")
    assert manifest.files == published.files
    local = replica.path("b1")
    assert {rel: (local / rel).read_bytes() for rel in files} == files
    assert replica.cache.downloaded_bytes == len(big) + len(b"graph") + len(b"{}")

    # a second build sharing a blob uploads only its new one
    before = {k: o["LastModified"] for k, o in _objects(compiler, "blobs", "").items()}
    compiler.publish(_stage(compiler, "b2", {"model.onnx.data": big, "model.onnx": b"graph2"}), _manifest("b2"))
    after = _objects(compiler, "blobs", "")
    assert len(after) == 4 and all(after[k]["LastModified"] == t for k, t in before.items())

    with pytest.raises(NotFound):
        replica.verify("nope")


def test_update_manifest_keeps_files_and_needs_the_build(make_store):
    store = make_store()
    m = store.publish(_stage(store, "b1", {"f": b"x"}), _manifest())
    m.tenants = ["t1", "t2"]
    store.update_manifest(m)
    assert store.manifest("b1").tenants == ["t1", "t2"]
    m.files = []
    with pytest.raises(StoreError, match="may not change"):
        store.update_manifest(m)

    # concurrent rewrites all land (the last one wins); none recreates a manifest gc removed
    errors = []

    def rewrite(i: int) -> None:
        try:
            copy = store.manifest("b1")
            copy.tenants = [f"t{i}"]
            store.update_manifest(copy)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=rewrite, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and store.manifest("b1").tenants[0] in {"t0", "t1", "t2", "t3"}
    gone = store.manifest("b1")
    assert store.delete("b1")
    with pytest.raises(NotFound):
        store.update_manifest(gone)
    assert not store.exists("b1")


@both_servers
def test_two_concurrent_publishers_leave_one_whole_build(make_store):
    stores = [make_store("p1"), make_store("p2")]
    files = {f"w{i}.bin": os.urandom(64 * 1024) for i in range(6)}
    results: dict[tuple[str, int], Manifest] = {}
    builds = [f"c{n}" for n in range(6)]
    start = threading.Barrier(2)

    def publisher(i: int) -> None:
        start.wait()
        for build_id in builds:
            # the two manifests differ (source), so which one won is visible
            results[build_id, i] = stores[i].publish(_stage(stores[i], build_id, files),
                                                     _manifest(build_id, source=f"/from-{i}"))
    # (a publisher that raised leaves its results missing: the KeyError below fails the test)

    threads = [threading.Thread(target=publisher, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reader = make_store("reader")
    for build_id in builds:
        stored = reader.manifest(build_id)
        assert results[build_id, 0] == results[build_id, 1] == stored  # the loser got the winner's build back
        reader.verify(build_id)  # whole: every blob present and matching
    assert len(_objects(reader, "blobs", "")) == len(files)


_KILLED_PUBLISHER = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, sys.argv[1])
    from pathlib import Path
    from shared.store_s3 import S3BuildStore
    from tests.test_unit_store_s3 import _manifest
    store = S3BuildStore(sys.argv[2], cache_dir=sys.argv[3], lease_s=1.0).ensure()
    staging = store.new_staging("k1")
    for i in range(300):
        (staging / f"part-{i:03d}.bin").write_bytes(os.urandom(32 * 1024))
    store.publish(staging, _manifest("k1"))
    print("PUBLISHED", flush=True)
""")


@both_servers
def test_publisher_killed_mid_upload_leaves_no_build(make_store, bucket_url, tmp_path):
    observer = make_store("observer", lease_s=1.0)
    child = subprocess.Popen([sys.executable, "-c", _KILLED_PUBLISHER, str(ROOT), bucket_url, str(tmp_path / "child")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(_objects(observer, "blobs", "")) < 5:
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
    finally:
        out, _ = child.communicate()
    assert "PUBLISHED" not in out
    uploaded = len(_objects(observer, "blobs", ""))
    assert 5 <= uploaded < 300
    assert not observer.exists("k1") and list(observer.list()) == []
    with pytest.raises(NotFound):
        observer.verify("k1")

    # its lease keeps the orphan blobs while live (a gc that allows 60 s between renewals)...
    report = collect(make_store("patient", lease_s=60.0), set(), keep_last=0, grace_s=0)
    assert report.blobs_removed == 0
    # ... and once expired (not renewed for 1 s: the child renewed it every 1/3 s), gc sweeps them
    time.sleep(1.2)
    report = collect(observer, set(), keep_last=0, grace_s=0)
    assert report.blobs_removed == uploaded and _objects(observer, "blobs", "") == {}
    assert _objects(observer, "leases", "") == {}


def test_interrupted_download_resumes_with_a_range_get(make_store):
    compiler, replica = make_store("compiler"), make_store("replica")
    data = os.urandom(3 * MIB + 17)
    compiler.publish(_stage(compiler, "b1", {"w.bin": data}), _manifest())
    digest = hashlib.sha256(data).hexdigest()
    replica.cache.ensure()
    # what an interrupted download leaves: the first bytes, in the partial file
    (replica.cache.blobs / f"{digest}.partial").write_bytes(data[:MIB])
    replica.verify("b1")
    assert replica.cache.downloaded_bytes == len(data) - MIB
    assert (replica.path("b1") / "w.bin").read_bytes() == data
    assert not (replica.cache.blobs / f"{digest}.partial").exists()

    # a partial file whose bytes are wrong: the resumed blob does not match, so it is fetched whole
    other = make_store("other")
    other.cache.ensure()
    (other.cache.blobs / f"{digest}.partial").write_bytes(b"\0" * MIB)
    other.verify("b1")
    assert other.cache.downloaded_bytes == (len(data) - MIB) + len(data)
    assert (other.path("b1") / "w.bin").read_bytes() == data


class _BrokenAfter:
    """A response body whose connection drops after `limit` bytes (what a network fault does)."""

    def __init__(self, body, limit: int):
        self.body, self.left = body, limit

    def read(self, n: int) -> bytes:
        if self.left <= 0:
            raise ConnectionResetError("connection reset by peer")
        chunk = self.body.read(min(n, self.left))
        self.left -= len(chunk)
        return chunk

    def close(self) -> None:
        self.body.close()


def test_a_download_broken_mid_blob_continues_with_range_gets(make_store):
    compiler, replica = make_store("compiler"), make_store("replica")
    data = os.urandom(3 * MIB)
    compiler.publish(_stage(compiler, "b1", {"w.bin": data}), _manifest())
    offsets = []

    def flaky(sha256: str, offset: int):
        offsets.append(offset)
        body = replica._read_blob(sha256, offset)
        return _BrokenAfter(body, MIB) if len(offsets) <= 2 else body

    manifest = replica.manifest("b1")
    path = replica.cache.materialize(manifest, flaky)
    assert offsets == [0, MIB, 2 * MIB]  # each reconnect asks for the rest only
    assert replica.cache.downloaded_bytes == len(data)
    assert (path / "w.bin").read_bytes() == data

    # a blob gc removed from the store: refused at once, nothing kept
    digest = hashlib.sha256(data).hexdigest()
    compiler.s3.delete_object(Bucket=compiler.loc.bucket, Key=compiler._blob_key(digest))
    late = make_store("late")
    with pytest.raises(StoreError, match="missing from the store"):
        late.verify("b1")
    assert not late.cache.has("b1")


@pytest.mark.parametrize("tamper", [lambda d: d[:-1] + bytes([d[-1] ^ 1]), lambda d: d[:100]])
def test_a_corrupted_blob_is_refused(make_store, tamper):
    compiler, replica = make_store("compiler"), make_store("replica")
    data = os.urandom(MIB)
    compiler.publish(_stage(compiler, "b1", {"w.bin": data, "ok.txt": b"fine"}), _manifest())
    digest = hashlib.sha256(data).hexdigest()
    compiler.s3.put_object(Bucket=compiler.loc.bucket, Key=compiler._blob_key(digest), Body=tamper(data))
    with pytest.raises(StoreError, match="does not match its sha256"):
        replica.verify("b1")
    assert not replica.cache.has("b1")
    assert not (replica.cache.blobs / digest).exists()
    assert not (replica.cache.blobs / f"{digest}.partial").exists()


def test_cache_is_bounded_lru_and_never_evicts_a_pinned_build(make_store):
    compiler = make_store("compiler")
    for n in range(1, 5):
        compiler.publish(_stage(compiler, f"b{n}", {"w.bin": os.urandom(MIB)}), _manifest(f"b{n}"))
    replica = make_store("replica", cache_bytes=int(2.5 * MIB))
    replica.pin("b1")
    replica.verify("b1")
    time.sleep(0.01)
    replica.verify("b2")
    time.sleep(0.01)
    replica.verify("b3")  # over the bound: b2 goes (b1 is older but pinned)
    assert [replica.cache.has(b) for b in ("b1", "b2", "b3")] == [True, False, True]
    assert replica.cache.used_bytes() <= 2.5 * MIB
    replica.unpin("b1")
    time.sleep(0.01)
    replica.verify("b4")  # b1 is now the least recently used, and free
    assert [replica.cache.has(b) for b in ("b1", "b3", "b4")] == [False, True, True]


def test_choose_keeps_aliases_newest_per_model_and_recent_builds():
    ms = [_manifest(f"m{i}", "m", created_at=100 + i) for i in range(4)] + [_manifest("n0", "n", created_at=50)]
    kept, doomed = choose(ms, {"m0"}, keep_last=1, grace_s=10, now=1000)
    assert kept == ["m0", "m3", "n0"] and doomed == ["m1", "m2"]
    kept, doomed = choose(ms, set(), keep_last=0, grace_s=898.5, now=1000)
    assert kept == ["m2", "m3"]


def test_gc_removes_unreferenced_builds_and_their_blobs_but_not_one_being_loaded(make_store):
    store = make_store("compiler")
    shared_blob = os.urandom(1000)
    for i in range(4):
        store.publish(_stage(store, f"g{i}", {"shared.bin": shared_blob, "own.bin": os.urandom(1000)}),
                      _manifest(f"g{i}", created_at=1000.0 + i))
    dry = collect(store, {"g0"}, keep_last=1, grace_s=0, dry_run=True)
    assert dry.removed == ["g1", "g2"] and dry.blobs_removed == 2 and len(list(store.list())) == 4
    loader = make_store("loader")
    with loader.lease("g1"):  # a replica is fetching g1 (its lease comes before it reads the manifest)
        report = collect(store, {"g0"}, keep_last=1, grace_s=0)
        assert report.kept == ["g0", "g3"] and report.removed == ["g2"] and report.in_use == ["g1"]
        loader.verify("g1")  # still whole
    assert report.blobs_removed == 1  # g2's own blob; the shared one stays
    assert {m.build_id for m in store.list()} == {"g0", "g1", "g3"}

    # a replica that pins g1 in its cache keeps serving it from there after gc removes it from S3
    loader.pin("g1")
    report = collect(store, {"g0"}, keep_last=1, grace_s=0)
    assert report.removed == ["g1"] and report.blobs_removed == 1
    assert (loader.path("g1") / "own.bin").stat().st_size == 1000
    loader.unpin("g1")
    with pytest.raises(NotFound):  # the manifest is gone: a new load fails cleanly, never half a build
        make_store("late").verify("g1")
    for build_id in ("g0", "g3"):
        make_store(f"check-{build_id}").verify(build_id)


class _PausedReplica(S3BuildStore):
    """A replica whose first blob download waits until the test lets it go on."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.reading, self.go_on = threading.Event(), threading.Event()

    def _read_blob(self, sha256, offset):
        self.reading.set()
        assert self.go_on.wait(30)
        return super()._read_blob(sha256, offset)


def test_gc_while_a_replica_is_mid_download_leaves_it_the_whole_build(make_store, bucket_url, tmp_path):
    store = make_store("compiler")
    for i in range(3):
        store.publish(_stage(store, f"h{i}", {"w.bin": os.urandom(MIB), "t.json": b"{}"}),
                      _manifest(f"h{i}", created_at=1000.0 + i))
    replica = _PausedReplica(bucket_url, cache_dir=tmp_path / "paused").ensure()
    result = {}
    loading = threading.Thread(target=lambda: result.setdefault("m", replica.verify("h0")))
    loading.start()
    try:
        assert replica.reading.wait(30)  # lease written, manifest read, first blob requested
        report = collect(store, set(), keep_last=0, grace_s=0)
        assert report.in_use == ["h0"] and report.removed == ["h1", "h2"]
    finally:
        replica.go_on.set()
        loading.join(30)
    assert result["m"].build_id == "h0" and (replica.path("h0") / "w.bin").stat().st_size == MIB
    assert collect(store, set(), keep_last=0, grace_s=0).removed == ["h0"]  # its lease is gone now
    assert _objects(store, "blobs", "") == {}


def test_gc_keeps_young_blobs_of_a_publish_in_progress(make_store):
    store = make_store()
    store.s3.put_object(Bucket=store.loc.bucket, Key=store._blob_key("ab" * 32), Body=b"orphan")
    assert collect(store, set(), keep_last=0, grace_s=3600).blobs_removed == 0
    assert collect(store, set(), keep_last=0, grace_s=0).blobs_removed == 1


def test_directory_store_gc_skips_a_pinned_build(tmp_path):
    store = BuildStore(tmp_path).ensure()
    for i in range(3):
        store.publish(_stage(store, f"d{i}", {"f": b"x"}), _manifest(f"d{i}", created_at=1.0 + i))
    store.pin("d0")
    report = collect(store, set(), keep_last=1, grace_s=0)
    assert report.removed == ["d1"] and report.in_use == ["d0"] and report.kept == ["d2"]
    store.unpin("d0")
    assert collect(store, set(), keep_last=1, grace_s=0).removed == ["d0"]
    assert [m.build_id for m in store.list()] == ["d2"]


def test_the_store_setting_is_checked_at_start_up():
    from shared import config

    assert config.resolve(config.STORE, {"store": "s3://my-bucket/p"}).store == "s3://my-bucket/p"
    assert config.resolve(config.STORE, {"store": "./dir"}).store == "./dir"
    for bad in ("s3://No_Such", "gs://bucket/x"):
        with pytest.raises(config.ConfigError, match="--store"):
            config.resolve(config.STORE, {"store": bad})


def test_an_unreachable_bucket_stops_start_up(s3_env, tmp_path):
    with pytest.raises(StoreError, match="not reachable"):
        S3BuildStore("s3://no-such-bucket-here/x", cache_dir=tmp_path).ensure()


def test_https_to_s3_with_a_test_made_certificate(tmp_path):
    tls = make_certificate(tmp_path)
    with moto_server(tmp_path / "moto-tls.log", tls) as env, aws_env(env):
        assert env["AWS_ENDPOINT_URL"].startswith("https://")
        client().create_bucket(Bucket="tls-bucket")
        store = S3BuildStore("s3://tls-bucket/x", cache_dir=tmp_path / "a").ensure()
        store.publish(_stage(store, "b1", {"f.bin": b"over tls"}), _manifest())
        replica = S3BuildStore("s3://tls-bucket/x", cache_dir=tmp_path / "b").ensure()
        assert (replica.path("b1") / "f.bin").read_bytes() == b"over tls"
        (tmp_path / "other").mkdir()
        with aws_env({"AWS_CA_BUNDLE": str(make_certificate(tmp_path / "other")[0])}):
            with pytest.raises(StoreError, match="not reachable.*(SSL|certificate)"):  # a certificate not trusted
                S3BuildStore("s3://tls-bucket/x", cache_dir=tmp_path / "c").ensure()
