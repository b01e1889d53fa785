"""Upload store: declared files, in-order appends, resume, sha256 verification, safe paths."""

import hashlib

import pytest

from compiler_service.uploads import UploadConflict, UploadLimits, UploadStore
from shared.errors import InvalidArgument, LlamashipError, NotFound, ResourceExhausted
from shared.tenancy import Caller

ALICE, BOB, ADMIN = Caller("alice", False), Caller("bob", False), Caller("ops", True)

DATA = bytes(range(256)) * 40  # 10 KiB


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_upload_in_chunks_with_a_resume(tmp_path):
    store = UploadStore(tmp_path)
    state = store.create([("model.safetensors", len(DATA), sha(DATA)), ("sub/config.json", 2, sha(b"{}"))], ALICE)
    uid = state.upload_id
    store.append(uid, "model.safetensors", 0, DATA[:4000], ALICE)
    # the connection dropped; a re-sent chunk at an old offset is refused, not appended twice
    with pytest.raises(UploadConflict, match="4000 bytes arrived"):
        store.append(uid, "model.safetensors", 0, DATA[:4000], ALICE)
    assert store.get(uid, ALICE).file("model.safetensors").received == 4000  # what GetUpload reports
    with pytest.raises(InvalidArgument, match="incomplete"):
        store.checkpoint_dir(uid, ALICE)
    store.append(uid, "model.safetensors", 4000, DATA[4000:], ALICE)
    state = store.append(uid, "sub/config.json", 0, b"{}", ALICE)
    assert state.complete and state.received_bytes == state.total_bytes
    d = store.checkpoint_dir(uid, ALICE)
    assert (d / "model.safetensors").read_bytes() == DATA and (d / "sub" / "config.json").read_bytes() == b"{}"


def test_wrong_hash_discards_the_file_and_it_can_be_sent_again(tmp_path):
    store = UploadStore(tmp_path)
    uid = store.create([("w.bin", 4, sha(b"good"))], ALICE).upload_id
    with pytest.raises(InvalidArgument, match="sha256 of the received bytes"):
        store.append(uid, "w.bin", 0, b"evil", ALICE)
    assert store.get(uid, ALICE).file("w.bin").received == 0
    assert store.append(uid, "w.bin", 0, b"good", ALICE).complete
    with pytest.raises(UploadConflict, match="already complete"):
        store.append(uid, "w.bin", 0, b"good", ALICE)


@pytest.mark.parametrize("files, message", [
    ([("../etc/passwd", 1, "0" * 64)], "without '..'"),
    ([("/abs", 1, "0" * 64)], "relative path"),
    ([("a", 1, "xyz")], "sha256"),
    ([("a", 1, "0" * 64), ("a", 1, "0" * 64)], "declared twice"),
    ([], "at least one"),
    ([("a\0b", 1, "0" * 64)], "control characters"),
    ([("d/" + "x" * 256, 1, "0" * 64)], "over 255"),
    ([("a", 1, "0" * 64), ("a/b", 1, "0" * 64)], "as a file and as a folder"),
    ([("a/b/c", 1, "0" * 64), ("a/b", 1, "0" * 64)], "as a file and as a folder"),
    ([(".git/config", 1, "0" * 64)], "hidden"),
])
def test_bad_declarations_are_invalid_and_leave_nothing_behind(tmp_path, files, message):
    with pytest.raises(InvalidArgument, match=message):
        UploadStore(tmp_path).create(files, ALICE)
    assert not (tmp_path / "uploads").exists() or not any((tmp_path / "uploads").iterdir())


def test_unknown_upload_and_oversized_chunk(tmp_path):
    store = UploadStore(tmp_path)
    with pytest.raises(NotFound):
        store.get("up-" + "0" * 24, ALICE)
    with pytest.raises(NotFound):
        store.get("../../x", ALICE)
    uid = store.create([("a", 2, sha(b"ab"))], ALICE).upload_id
    with pytest.raises(InvalidArgument, match="more bytes than"):
        store.append(uid, "a", 0, b"abc", ALICE)
    with pytest.raises(InvalidArgument, match="was not declared"):
        store.append(uid, "b", 0, b"x", ALICE)


def test_eval_prompts_file_of_an_upload(tmp_path):
    from compiler_service.sources import SourceError, upload_prompts

    assert upload_prompts(tmp_path) is None
    f = tmp_path / "eval_prompts.jsonl"
    f.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n')
    assert upload_prompts(tmp_path) == ["a", "b"]
    f.write_text('{"prompt": "a"}\nnot json\n')
    with pytest.raises(SourceError, match="eval_prompts.jsonl:2"):
        upload_prompts(tmp_path)
    f.write_text('{"text": "a"}\n')
    with pytest.raises(SourceError, match="eval_prompts.jsonl:1"):
        upload_prompts(tmp_path)
    f.write_text("\n")
    with pytest.raises(SourceError, match="no prompts"):
        upload_prompts(tmp_path)


def test_upload_errors_are_domain_errors():
    assert issubclass(UploadConflict, LlamashipError)


def test_another_tenants_upload_does_not_exist_for_it(tmp_path):
    store = UploadStore(tmp_path)
    uid = store.create([("a", 2, sha(b"ab"))], ALICE).upload_id
    for call in (lambda: store.get(uid, BOB), lambda: store.append(uid, "a", 0, b"ab", BOB),
                 lambda: store.checkpoint_dir(uid, BOB), lambda: store.snapshot(uid, BOB, tmp_path / "s")):
        with pytest.raises(NotFound, match="no upload"):
            call()
    assert store.get(uid, ALICE).received_bytes == 0  # bob's chunk never landed
    assert store.append(uid, "a", 0, b"ab", ADMIN).complete  # an admin may act on any upload
    assert store.get(uid, ALICE).tenant == "alice"


def test_no_folder_or_file_is_made_until_bytes_arrive(tmp_path):
    store = UploadStore(tmp_path)
    files = [(f"d{i}/e{i}/w{i}.bin", 1, sha(b"x")) for i in range(50)] + [("empty/e.txt", 0, sha(b""))]
    uid = store.create(files, ALICE).upload_id
    assert sorted(p.name for p in (tmp_path / "uploads" / uid).rglob("*")) == ["files", "state.json"]
    for i in range(50):
        store.append(uid, f"d{i}/e{i}/w{i}.bin", 0, b"x", ALICE)
    d = store.checkpoint_dir(uid, ALICE)
    assert (d / "empty" / "e.txt").read_bytes() == b"" and (d / "d7" / "e7" / "w7.bin").read_bytes() == b"x"


def test_quotas_per_tenant_and_free_disk(tmp_path):
    store = UploadStore(tmp_path, UploadLimits(quota_bytes=100, max_active=2, expiry_s=3600, min_free_bytes=0))
    with pytest.raises(ResourceExhausted, match="quota"):
        store.create([("a", 101, sha(b""))], ALICE)
    store.create([("a", 60, sha(b""))], ALICE)
    with pytest.raises(ResourceExhausted, match="quota of 100"):
        store.create([("a", 41, sha(b""))], ALICE)
    store.create([("a", 40, sha(b""))], ALICE)
    with pytest.raises(ResourceExhausted, match="holds 2 uploads"):
        store.create([("a", 0, sha(b""))], ALICE)
    store.create([("a", 100, sha(b""))], BOB)  # another tenant has its own quota
    full = UploadStore(tmp_path / "other", UploadLimits(min_free_bytes=1 << 60))
    with pytest.raises(ResourceExhausted, match="free disk"):
        full.create([("a", 1, sha(b""))], ALICE)
    huge = UploadStore(tmp_path / "huge")
    with pytest.raises(ResourceExhausted):  # 1 TiB declared: past the default quota or the free disk
        huge.create([("a", 1 << 40, sha(b""))], ALICE)


def test_expired_uploads_are_gone_and_swept(tmp_path):
    store = UploadStore(tmp_path, UploadLimits(quota_bytes=1 << 20, max_active=8, expiry_s=60, min_free_bytes=0))
    old = store.create([("a", 2, sha(b"ab"))], ALICE)
    assert old.expires_at == pytest.approx(old.created_at + 60)
    store.append(old.upload_id, "a", 0, b"ab", ALICE)
    snap = store.snapshot(old.upload_id, ALICE, tmp_path / "job" / "source")
    assert store.sweep(now=old.created_at + 30) == []
    assert store.sweep(now=old.created_at + 61) == [old.upload_id]
    assert not (tmp_path / "uploads" / old.upload_id).exists()
    assert (snap / "a").read_bytes() == b"ab"  # a compile's own copy outlives the upload
    with pytest.raises(NotFound):
        store.get(old.upload_id, ALICE)
    # and the slot it held is free again
    assert store.create([("a", 1 << 20, sha(b""))], ALICE).upload_id
