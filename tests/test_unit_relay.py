"""The relay's cheap paths: chunks written with only their set fields, and token chunks the gateway
read together sent as one (never holding a token back)."""

from gateway.gen_queue import coalesced
from shared.generation import Chunk


def test_a_chunk_carries_only_its_set_fields_and_reads_back_whole():
    c = Chunk("tokens", text=" hi", token_ids=[5, 6], build_id="b1", replica_id="cpu-0")
    fields = c.to_fields()
    assert "finish_reason" not in fields["c"] and "queue_ms" not in fields["c"]
    assert Chunk.from_fields(fields) == c
    end = Chunk("end", finish_reason="length", prompt_tokens=3, completion_tokens=2, queue_ms=1.5)
    assert Chunk.from_fields(end.to_fields()) == end
    assert Chunk.from_fields(Chunk("tokens").to_fields()) == Chunk("tokens")


def test_token_chunks_read_together_become_one_under_the_last_cursor():
    read = [("1-0", Chunk("tokens", text="a", token_ids=[1], build_id="b")),
            ("1-1", Chunk("tokens", text="b", token_ids=[2], build_id="b")),
            ("1-2", Chunk("tokens", text="c", token_ids=[3], build_id="b")),
            ("2-0", Chunk("end", text="!", finish_reason="length", build_id="b"))]
    out = coalesced(read)
    assert [cursor for cursor, _ in out] == ["1-2", "2-0"]
    assert out[0][1].text == "abc" and out[0][1].token_ids == [1, 2, 3]
    assert out[1][1] == read[3][1]
    assert read[0][1].token_ids == [1]  # the chunks read are not changed


def test_one_chunk_and_chunks_of_different_builds_stay_as_they_are():
    one = [("1-0", Chunk("tokens", text="a", token_ids=[1], build_id="b"))]
    assert coalesced(one) == one
    two = [("1-0", Chunk("tokens", token_ids=[1], build_id="b")), ("1-1", Chunk("tokens", token_ids=[2], build_id="c"))]
    assert coalesced(two) == two
    assert coalesced([]) == []
