"""Checkpoints for the benchmark: the trained demo model, and Llama-shaped checkpoints of
realistic proportions with random weights (decode speed does not depend on weight values)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from llamaship.demo_model import BOS, DEFAULT_DIR, EOS, make_model, read_corpus, train_tokenizer, write_tokenizer_files

STAMP = ".llamaship-bench-model.json"


@dataclass(frozen=True)
class RandomLlamaSpec:
    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int = 4096
    seed: int = 0


SHAPES = {
    "llama-125m": RandomLlamaSpec("llama-125m", 768, 2048, 12, 12, 4, 32000, False),
    "llama-3.2-1b": RandomLlamaSpec("llama-3.2-1b", 2048, 8192, 16, 32, 8, 128256, True),
}


def random_llama(out: Path, spec: RandomLlamaSpec) -> Path:
    """Write a LlamaForCausalLM with random weights and a tokenizer whose vocabulary covers every id."""
    stamp = out / STAMP
    if stamp.is_file() and json.loads(stamp.read_text()) == asdict(spec):
        return out
    import torch
    from tokenizers import AddedToken
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = train_tokenizer(read_corpus(500_000), 2048)
    # Pad the vocabulary with plain (non-special) tokens so every id the model emits decodes.
    tok.add_tokens([AddedToken(f"<t{i}>", special=False) for i in range(spec.vocab_size - tok.get_vocab_size())])
    torch.manual_seed(spec.seed)
    config = LlamaConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads, max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tok.token_to_id(BOS), eos_token_id=tok.token_to_id(EOS), pad_token_id=0,
        tie_word_embeddings=spec.tie_word_embeddings, torch_dtype="float32",
    )
    with torch.no_grad():
        model = LlamaForCausalLM(config)
        model.init_weights()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    write_tokenizer_files(tok, out)
    stamp.write_text(json.dumps(asdict(spec)))
    return out


def bench_checkpoint(name: str, cache: Path) -> Path:
    if name == "demo":
        return make_model(DEFAULT_DIR)
    if name not in SHAPES:
        raise ValueError(f"unknown bench model {name!r}; known: demo, {', '.join(SHAPES)}")
    return random_llama(cache / name, SHAPES[name])
