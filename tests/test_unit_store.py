import os

import pytest

from shared.errors import NotFound
from shared.store import BuildStore, Manifest, StoreError


def _manifest(build_id="b1"):
    return Manifest(build_id=build_id, model_name="m", source_path="/src", source_sha256="abc", recipe="fp32",
                    recipe_details={}, target_pool="cpu", execution_provider="cpu", context_length=128,
                    max_batch=4, tool_versions={"x": "1"})


def test_publish_is_atomic_and_verified(tmp_path):
    store = BuildStore(tmp_path).ensure()
    staging = store.new_staging("b1")
    (staging / "model.onnx").write_bytes(b"onnx")
    (staging / "sub").mkdir()
    (staging / "sub" / "w.bin").write_bytes(b"12345")
    assert not store.exists("b1")
    m = store.publish(staging, _manifest())
    assert store.exists("b1") and not staging.exists()
    assert {f.path: f.size for f in m.files} == {"model.onnx": 4, "sub/w.bin": 5}
    assert store.verify("b1").build_id == "b1"
    assert [x.build_id for x in store.list()] == ["b1"]
    (store.path("b1") / "sub" / "w.bin").write_bytes(b"12346")
    with pytest.raises(StoreError, match="sha256"):
        store.verify("b1")
    os.remove(store.path("b1") / "model.onnx")
    with pytest.raises(StoreError, match="missing"):
        store.verify("b1", full=False)


def test_second_publish_of_same_id_keeps_the_first(tmp_path):
    store = BuildStore(tmp_path).ensure()
    for content in (b"a", b"a"):
        staging = store.new_staging("b1")
        (staging / "f").write_bytes(content)
        store.publish(staging, _manifest())
    assert list(store.staging_root.iterdir()) == []


def test_empty_staging_is_refused_and_unknown_build_not_found(tmp_path):
    store = BuildStore(tmp_path).ensure()
    with pytest.raises(StoreError):
        store.publish(store.new_staging("b2"), _manifest("b2"))
    with pytest.raises(NotFound):
        store.manifest("nope")
    with pytest.raises(NotFound):
        store.path("../etc")


def test_manifest_round_trips():
    m = _manifest()
    assert Manifest.from_json(m.to_json()) == m
