import pytest

from serving_service.text import IncrementalDetokenizer, PromptTokenizer, StopMatcher


@pytest.fixture(scope="module")
def tok(demo_model):
    return PromptTokenizer(demo_model)


def test_prompt_gets_bos_like_transformers(tok, demo_model):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(demo_model)
    for text in ["def f(x):\n    return x", "  leading spaces", "ünïcödé → ✓"]:
        assert tok.encode(text) == hf(text)["input_ids"]


def test_deltas_concatenate_to_the_full_decode(tok):
    text = "def f(x):\n    return 'héllo ✓ wörld'  # ok\n"
    ids = tok.tokenizer.encode(text, add_special_tokens=False).ids
    prompt = tok.encode("x = 1\n")
    detok = IncrementalDetokenizer(tok, prompt)
    out = "".join(detok.push(i) for i in ids)
    assert out == tok.decode(ids) == text


def test_stop_matcher_holds_back_partial_matches():
    m = StopMatcher(["END", "\n\n"])
    assert m.push("abc E") == ("abc ", False)
    assert m.push("N") == ("", False)
    assert m.push("X") == ("ENX", False)
    assert m.push("yy EN") == ("yy ", False)
    assert m.push("D and more") == ("", True)


def test_stop_matcher_earliest_stop_wins_and_flush():
    m = StopMatcher(["b", "a"])
    assert m.push("xxab") == ("xx", True)
    m = StopMatcher(["zz"])
    assert m.push("az") == ("a", False)
    assert m.flush() == "z"


def test_encoding_a_long_prompt_in_a_thread_leaves_the_event_loop_free(tok):
    """A replica tokenizes off the loop; `Tokenizer.encode` held the GIL for the whole call, so
    even from a thread it stalled every other stream (2.3 s for a 4 MB prompt)."""
    import asyncio
    import time

    text = "hello world, this is a prompt. " * 40000  # about a second to tokenize here

    async def main() -> tuple[float, float]:
        gaps: list[float] = []

        async def ticker() -> None:
            last = time.perf_counter()
            while True:
                await asyncio.sleep(0.005)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        ticking = asyncio.create_task(ticker())
        await asyncio.sleep(0.02)
        t0 = time.perf_counter()
        ids = await asyncio.to_thread(tok.encode, text)
        took = time.perf_counter() - t0
        ticking.cancel()
        assert len(ids) > 100_000
        return took, max(gaps)

    took, worst_gap = asyncio.run(main())
    assert worst_gap < took / 3, f"the loop stalled {worst_gap:.2f}s of a {took:.2f}s tokenization"


def test_encode_matches_the_tokenizer_exactly(tok):
    text = "def f(x):\n    return x  # ünïcödé\n" * 50
    assert tok.encode(text) == tok.tokenizer.encode(text).ids


def test_a_prompt_too_long_for_any_tokenization_is_refused_without_tokenizing(tok):
    longest = max(len(t.encode()) for t in tok.tokenizer.get_vocab(with_added_tokens=True))
    assert not tok.too_long("x" * longest * 64, 64)
    assert tok.too_long("x" * (tok.max_bytes_per_token * 64 + 1), 64)
