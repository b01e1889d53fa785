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
