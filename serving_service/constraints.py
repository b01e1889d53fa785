"""Structured output as a token mask: an llguidance matcher per constrained row says which tokens
may come next; the sampler drops the others before it picks (greedy or sampled alike) and feeds
the pick back. Once the JSON is complete the mask allows only the end-of-sequence tokens.

The matcher's tokenizer is built from the build's tokenizer.json with llguidance's own loader
(no transformers in the replica), once per build and process.
"""

from __future__ import annotations

import functools
import logging
import os
import threading

import numpy as np

log = logging.getLogger("llamaship.serving.constraints")


_building = threading.Lock()  # one build of a tokenizer at a time: a prewarm and a request never both build it


def tokenizer(tokenizer_json: str, vocab_size: int, eos: tuple[int, ...]):
    """llguidance's tokenizer for a build: its vocabulary padded to the model's logits, the build's
    end-of-sequence ids as the tokens that end a complete output."""
    with _building:
        return _tokenizer(os.path.abspath(tokenizer_json), vocab_size, eos)


@functools.lru_cache(maxsize=4)
def _tokenizer(tokenizer_json: str, vocab_size: int, eos: tuple[int, ...]):
    import llguidance

    with open(tokenizer_json, encoding="utf-8") as f:
        text = f.read()
    return llguidance.LLTokenizer(text, n_vocab=vocab_size, eos_token=list(eos))


def prewarm(tokenizer_json: str, vocab_size: int, eos: frozenset[int]) -> threading.Thread:
    """Build a build's tokenizer in the background at load (seconds for a large vocabulary), so
    the first constrained request does not stall every row of its batch while it is built."""
    def build() -> None:
        try:
            tokenizer(tokenizer_json, vocab_size, tuple(sorted(eos)))
        except Exception:  # noqa: BLE001 - the first constrained request reports it
            log.warning("could not prepare structured output for %s", tokenizer_json, exc_info=True)

    thread = threading.Thread(target=build, name="llguidance-tokenizer", daemon=True)
    thread.start()
    return thread


def guidance_options(schema: str, tokenizer_json: str, vocab_size: int, eos: frozenset[int]) -> dict:
    """What a constrained row's search options carry to the decode worker (picklable)."""
    return {"schema": schema, "tokenizer": tokenizer_json, "vocab_size": vocab_size, "eos": sorted(eos)}


class Constraint:
    def __init__(self, guidance: dict):
        import llguidance

        from shared.json_output import grammar

        tok = tokenizer(guidance["tokenizer"], int(guidance["vocab_size"]), tuple(sorted(guidance["eos"])))
        self.eos = list(guidance["eos"])
        self.matcher = llguidance.LLMatcher(tok, grammar(guidance["schema"]))
        if self.matcher.is_error():
            raise ValueError(f"response_format.json_schema: {self.matcher.get_error()}")

    def allowed(self, vocab: int) -> np.ndarray:
        """A boolean mask over the first `vocab` token ids."""
        if self.matcher.is_error():  # cannot happen with masked picks; end the row rather than loop
            log.error("constraint matcher failed: %s", self.matcher.get_error())
            allowed = np.zeros(vocab, dtype=bool)
            allowed[[e for e in self.eos if e < vocab]] = True
            return allowed
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[:vocab].astype(bool)
        if allowed.shape[0] < vocab:
            allowed = np.concatenate([allowed, np.zeros(vocab - allowed.shape[0], dtype=bool)])
        return allowed

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """`logits` with every token the grammar forbids at -inf (a new array)."""
        return np.where(self.allowed(logits.shape[-1]), logits, -np.inf)

    def consume(self, token: int) -> None:
        if not self.matcher.is_stopped():
            self.matcher.consume_token(int(token))
