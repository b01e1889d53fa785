"""Upload store: declared files, in-order appends, resume, sha256 verification, safe paths."""

import hashlib

import pytest

from compiler_service.uploads import UploadConflict, UploadStore
from shared.errors import InvalidArgument, NotFound

DATA = bytes(range(256)) * 40  # 10 KiB


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_upload_in_chunks_with_a_resume(tmp_path):
    store = UploadStore(tmp_path)
    state = store.create([("model.safetensors", len(DATA), sha(DATA)), ("sub/config.json", 2, sha(b"{}"))])
    uid = state.upload_id
    store.append(uid, "model.safetensors", 0, DATA[:4000])
    # the connection dropped; a re-sent chunk at an old offset is refused, not appended twice
    with pytest.raises(UploadConflict, match="4000 bytes arrived"):
        store.append(uid, "model.safetensors", 0, DATA[:4000])
    assert store.get(uid).file("model.safetensors").received == 4000  # what GetUpload reports
    with pytest.raises(InvalidArgument, match="incomplete"):
        store.checkpoint_dir(uid)
    store.append(uid, "model.safetensors", 4000, DATA[4000:])
    state = store.append(uid, "sub/config.json", 0, b"{}")
    assert state.complete and state.received_bytes == state.total_bytes
    d = store.checkpoint_dir(uid)
    assert (d / "model.safetensors").read_bytes() == DATA and (d / "sub" / "config.json").read_bytes() == b"{}"


def test_wrong_hash_discards_the_file_and_it_can_be_sent_again(tmp_path):
    store = UploadStore(tmp_path)
    uid = store.create([("w.bin", 4, sha(b"good"))]).upload_id
    with pytest.raises(InvalidArgument, match="sha256 of the received bytes"):
        store.append(uid, "w.bin", 0, b"evil")
    assert store.get(uid).file("w.bin").received == 0
    assert store.append(uid, "w.bin", 0, b"good").complete
    with pytest.raises(UploadConflict, match="already complete"):
        store.append(uid, "w.bin", 0, b"good")


@pytest.mark.parametrize("files, message", [
    ([("../etc/passwd", 1, "0" * 64)], "without '..'"),
    ([("/abs", 1, "0" * 64)], "relative path"),
    ([("a", 1, "xyz")], "sha256"),
    ([("a", 1, "0" * 64), ("a", 1, "0" * 64)], "declared twice"),
    ([], "at least one"),
])
def test_bad_declarations(tmp_path, files, message):
    with pytest.raises(InvalidArgument, match=message):
        UploadStore(tmp_path).create(files)


def test_unknown_upload_and_oversized_chunk(tmp_path):
    store = UploadStore(tmp_path)
    with pytest.raises(NotFound):
        store.get("up-" + "0" * 24)
    with pytest.raises(NotFound):
        store.get("../../x")
    uid = store.create([("a", 2, sha(b"ab"))]).upload_id
    with pytest.raises(InvalidArgument, match="more bytes than"):
        store.append(uid, "a", 0, b"abc")
    with pytest.raises(InvalidArgument, match="was not declared"):
        store.append(uid, "b", 0, b"x")


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
