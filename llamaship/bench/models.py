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
    if name in LLAMA4_SHAPES:
        return llama4_checkpoint(name, cache)
    if name not in SHAPES:
        raise ValueError(f"unknown bench model {name!r}; known: {', '.join(MODEL_NAMES)}")
    return random_llama(cache / name, SHAPES[name])


# -- Llama 4 ----------------------------------------------------------------------------------
# llama4-tiny: make_llama4's defaults (float32, one shard). llama4-16e: a mid-size routed model,
# 16 experts, top-1, about 103M parameters read per token of 481M, bf16, sharded as published
# checkpoints are (model-0000i-of-0000n.safetensors + model.safetensors.index.json).
LLAMA4_SHAPES: dict = {
    "llama4-tiny": {},
    "llama4-16e": dict(hidden_size=1024, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=64, intermediate_size=512, intermediate_size_mlp=2048, num_experts=16, top_k=1,
                       init_std=0.02, dtype="bfloat16", max_shard_size="300MB"),
}
DEFAULT_MODELS = ("demo", "llama-125m")
MODEL_NAMES = ("demo", *SHAPES, *LLAMA4_SHAPES)
QUANT_BLOCK = 32  # the builder's block: one float32 scale per 32 weights, no zero points
LLAMA4_CPU_RECIPES = ("fp32", "int8", "hybrid-int4", "int4", "auto")


def llama4_bits(builder_precision: str) -> dict:
    """Group → bits (None: float32) of a Llama 4 build, from the builder precision its manifest
    records (a preset such as int4, or auto's groups:attn=int8,...)."""
    from compiler_service.llama4.linear import precision_named  # a name parser: nothing is compiled

    return dict(precision_named(builder_precision).bits)


def is_llama4(name: str) -> bool:
    return name in LLAMA4_SHAPES


def resolve_models(names: list[str] | None, quick: bool, large: bool) -> list[str]:
    """The models a run measures: `--models` as given (in order, once each), else the default set
    (demo with --quick; demo and llama-125m, plus llama-3.2-1b with --large)."""
    if not names:
        return ["demo"] if quick else [*DEFAULT_MODELS] + (["llama-3.2-1b"] if large else [])
    unknown = [n for n in names if n not in MODEL_NAMES]
    if unknown:
        raise ValueError(f"unknown bench model {unknown[0]!r}; known: {', '.join(MODEL_NAMES)}")
    return list(dict.fromkeys(names))


def llama4_spec(name: str):
    from llamaship.llama4_model import Llama4Spec

    return Llama4Spec(**LLAMA4_SHAPES[name])


def _weight_bytes(params: int, bits: int | None, k: int) -> float:
    """Bytes of a [N, K] weight of `params` values at `bits` (the builder keeps it float32 where
    K is not a multiple of its block)."""
    if bits is None or k % QUANT_BLOCK:
        return params * 4.0
    return params * (bits / 8 + 4 / QUANT_BLOCK)


def llama4_active_bytes(config: dict, bits: dict, dtype_bytes: float | None = None) -> dict:
    """Bytes of weights one decoded token reads in a Llama 4 build (or in PyTorch at
    `dtype_bytes` per weight): per layer attention, the norms, and on MoE layers the router, the
    top-k chosen experts and the shared expert (dense layers: the dense MLP); one embedding row,
    the final norm and lm_head. `dense_bytes` is the same with every expert read (what a kernel
    that computes all experts reads). `bits` maps the builder's groups to 4, 8 or None (float32)."""
    from compiler_service.llama4.config import parse  # config parsing only (no compile)

    s = parse(config)
    h, d, v = s.hidden_size, s.head_dim, s.vocab_size

    def w(group: str, n: int, k: int, quantizable: bool = True) -> float:
        if dtype_bytes is not None:
            return n * k * dtype_bytes
        return _weight_bytes(n * k, bits.get(group) if quantizable else None, k)

    f32 = dtype_bytes if dtype_bytes is not None else 4.0
    attn = w("attn", s.num_heads * d, h) + 2 * w("attn", s.num_kv_heads * d, h) + w("attn", h, s.num_heads * d)
    m = s.intermediate_size
    # gate+up [2m, h] and down [h, m] per expert (K: h, m); QMoE quantizes both only if h and m are block multiples
    both = h % QUANT_BLOCK == 0 and m % QUANT_BLOCK == 0
    one_expert = w("experts", 2 * m, h, both) + w("experts", h, m, both)
    shared = w("shared_expert", 2 * m, h) + w("shared_expert", h, m)
    dense_mlp = w("mlp", 2 * s.intermediate_size_mlp, h) + w("mlp", h, s.intermediate_size_mlp)
    active = dense = 0.0
    parts = {"attention": 0.0, "experts": 0.0, "shared_expert": 0.0, "router": 0.0, "dense_mlp": 0.0, "norms": 0.0}
    for i in range(s.num_layers):
        parts["attention"] += attn
        parts["norms"] += 2 * h * f32
        if i in s.moe_layers:
            parts["router"] += s.num_experts * h * f32
            parts["shared_expert"] += shared
            parts["experts"] += s.top_k * one_expert
            dense += (s.num_experts - s.top_k) * one_expert
        else:
            parts["dense_mlp"] += dense_mlp
    parts["embedding_row"] = h * f32
    parts["final_norm"] = h * f32
    parts["lm_head"] = w("lm_head", v, h)
    active = sum(parts.values())
    return {"active_bytes": int(active), "dense_bytes": int(active + dense), "parts": {k: int(x) for k, x in parts.items()},
            "active_params": int(_params(s, s.top_k)), "total_params": int(_params(s, s.num_experts))}


def _params(s, experts_read: int) -> float:
    h, d, m = s.hidden_size, s.head_dim, s.intermediate_size
    attn = (2 * s.num_heads + 2 * s.num_kv_heads) * d * h
    total = 0
    for i in range(s.num_layers):
        total += attn + 2 * h
        total += (s.num_experts * h + (experts_read + 1) * 3 * h * m) if i in s.moe_layers else 3 * h * s.intermediate_size_mlp
    return total + h + h + s.vocab_size * h  # embedding row, final norm, lm_head


def llama4_checkpoint(name: str, cache: Path) -> Path:
    from llamaship.llama4_model import make_llama4

    return make_llama4(cache / name, llama4_spec(name))


def checkpoint_bytes(checkpoint: Path) -> int:
    return sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
