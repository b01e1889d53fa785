"""Tokenization as the checkpoint's Hugging Face tokenizer does it, incremental detokenization
and stop strings. Uses the `tokenizers` library only (no transformers in the serving image)."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

NORMALIZER_MARGIN = 4


class PromptTokenizer:
    """Encodes prompts with the build's tokenizer.json, special tokens (BOS) included."""

    def __init__(self, build_dir: Path):
        self.tokenizer = Tokenizer.from_file(str(build_dir / "tokenizer.json"))
        self._encode_batch = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        self.bos_id: int | None = None
        cfg_path = build_dir / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        bos = cfg.get("bos_token")
        if isinstance(bos, dict):
            bos = bos.get("content")
        if cfg.get("add_bos_token") and bos is not None:
            bos_id = self.tokenizer.token_to_id(bos)
            # tokenizer.json normally adds BOS in its post-processor; add it here when it doesn't,
            # as transformers does for add_bos_token=True.
            if bos_id is not None and self.tokenizer.encode("a").ids[:1] != [bos_id]:
                self.bos_id = bos_id
        # The most UTF-8 bytes of input one token can stand for, with a margin for normalizers
        # that shorten text (NFKC): a prompt longer than context x this has too many tokens for
        # the context, and is refused before it is tokenized.
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        self.max_bytes_per_token = NORMALIZER_MARGIN * max((len(t.encode()) for t in vocab), default=1)

    def too_long(self, prompt: str, context_length: int) -> bool:
        """True when `prompt` cannot possibly fit `context_length` tokens (checked without tokenizing)."""
        return len(prompt.encode()) > context_length * self.max_bytes_per_token

    def encode(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        """Thread-friendly: the batch entry point releases the GIL while it works (`encode` holds it
        throughout, which stalls the event loop even from a worker thread).
        `add_special_tokens=False` for text a chat template rendered: it holds its BOS as text."""
        ids = self._encode_batch([prompt], add_special_tokens=add_special_tokens)[0].ids
        if self.bos_id is not None and add_special_tokens:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that concatenate to the full text.

    Decodes a short window that starts a few tokens back (so that tokenizers which merge or
    strip leading spaces render the boundary right) and holds back text that ends in an
    incomplete UTF-8 sequence until the next token completes it.
    """

    def __init__(self, tok: PromptTokenizer, prompt_ids: list[int], context_tokens: int = 5):
        self.tok = tok
        self.ids = list(prompt_ids[-context_tokens:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tok.decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix) :]
        return ""


class StopMatcher:
    """Finds stop strings across deltas; holds back a tail that may be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, delta: str) -> tuple[str, bool]:
        """Returns (text safe to emit, stopped)."""
        buf = self.pending + delta
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return buf[: min(hits)], True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self.pending = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
