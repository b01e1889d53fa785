"""A Llama 4 text config as the graph builder needs it, derived exactly as transformers'
Llama4TextConfig derives its defaults, and tolerant of the quirks of published configs."""

from __future__ import annotations

import math
from dataclasses import dataclass

from compiler_service.checkpoint import CheckpointError

ARCHITECTURES = ("Llama4ForCausalLM", "Llama4ForConditionalGeneration")
ROPE_TYPES = ("default", "llama3")


@dataclass(frozen=True)
class Llama4TextSpec:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    intermediate_size_mlp: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    num_experts: int
    top_k: int
    moe_layers: tuple[int, ...]
    rope_layers: tuple[bool, ...]
    chunked_layers: tuple[bool, ...]
    attention_chunk_size: int | None
    use_qk_norm: bool
    temperature_tuning: bool
    floor_scale: float
    attn_scale: float
    rope: dict
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    max_position_embeddings: int
    weight_prefix: str

    @property
    def scale(self) -> float:
        return self.head_dim ** -0.5


def _int(cfg: dict, key: str, default: int | None = None) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointError(f"config.json: {key} must be a positive integer, got {str(value)[:40]}")
    return value


def _float(cfg: dict, key: str, default: float) -> float:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"config.json: {key} must be a finite number, got {str(value)[:40]}")
    return float(value)


def _token_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise CheckpointError(f"config.json: eos_token_id must be a token id or a list of them, got {str(value)[:40]}")
    return tuple(values)


def _rope(cfg: dict) -> dict:
    """rope_parameters (transformers 5) or rope_scaling + rope_theta (published configs)."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    params.setdefault("rope_theta", cfg.get("rope_theta", 500000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise CheckpointError(f"config.json: rope type {str(rope_type)[:40]} is not supported (only {', '.join(ROPE_TYPES)})")
    params["rope_type"] = rope_type
    if rope_type == "llama3":
        for key in ("factor", "low_freq_factor", "high_freq_factor"):
            _float(params, key, float("nan"))
        params.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings"))
        _int(params, "original_max_position_embeddings")
    _float(params, "rope_theta", float("nan"))
    return params


def _layer_list(cfg: dict, key: str, n: int) -> list | None:
    value = cfg.get(key)
    if value is None or value == []:
        return None
    if not isinstance(value, list) or len(value) < n:
        raise CheckpointError(f"config.json: {key} must list at least num_hidden_layers ({n}) entries")
    return value[:n]


def text_config(config: dict) -> tuple[dict, str]:
    """The text model's config and the prefix its weights carry in the checkpoint."""
    archs = config.get("architectures") or []
    if "Llama4ForConditionalGeneration" in archs or config.get("model_type") == "llama4":
        text = config.get("text_config")
        if not isinstance(text, dict):
            raise CheckpointError("config.json: a Llama4ForConditionalGeneration config needs a text_config object")
        return text, "language_model."
    return config, ""


def parse(config: dict) -> Llama4TextSpec:
    cfg, prefix = text_config(config)
    n = _int(cfg, "num_hidden_layers")
    heads = _int(cfg, "num_attention_heads")
    hidden = _int(cfg, "hidden_size")
    head_dim = _int(cfg, "head_dim", hidden // heads if hidden % heads == 0 else 0)
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"config.json: hidden_act {str(cfg.get('hidden_act'))[:40]} is not supported (only silu)")
    if cfg.get("attention_bias"):
        raise CheckpointError("config.json: attention_bias=true is not supported")
    kv_heads = _int(cfg, "num_key_value_heads", heads)
    if heads % kv_heads:
        raise CheckpointError(f"config.json: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    if head_dim % 2:
        raise CheckpointError(f"config.json: head_dim {head_dim} must be even for rotary embeddings")

    step = _int(cfg, "interleave_moe_layer_step", 1)
    moe = cfg.get("moe_layers")
    if moe is None:
        moe = list(range(step - 1, n, step))
    if not isinstance(moe, list) or not all(isinstance(i, int) and 0 <= i < n for i in moe):
        raise CheckpointError(f"config.json: moe_layers must list layer indices below {n}")

    interval = _int(cfg, "no_rope_layer_interval", 4)
    no_rope = _layer_list(cfg, "no_rope_layers", n) or [int((i + 1) % interval != 0) for i in range(n)]
    rope_layers = tuple(bool(v) for v in no_rope)
    chunk = cfg.get("attention_chunk_size", 8192)
    if chunk is not None:
        chunk = _int(cfg, "attention_chunk_size", 8192)
    layer_types = _layer_list(cfg, "layer_types", n) or [
        "chunked_attention" if r and chunk is not None else "full_attention" for r in rope_layers]
    unknown = sorted({t for t in layer_types if t not in ("chunked_attention", "full_attention")})
    if unknown:
        raise CheckpointError(f"config.json: layer type {str(unknown[0])[:40]} is not supported")
    chunked = tuple(t == "chunked_attention" for t in layer_types)
    if any(chunked) and chunk is None:
        raise CheckpointError("config.json: layer_types names chunked_attention but attention_chunk_size is null")

    if _float(cfg, "floor_scale", 8192) <= 0:
        raise CheckpointError("config.json: floor_scale must be positive")
    experts = _int(cfg, "num_local_experts", 16)
    top_k = _int(cfg, "num_experts_per_tok", 1)
    if top_k > experts:
        raise CheckpointError(f"config.json: num_experts_per_tok {top_k} exceeds num_local_experts {experts}")
    intermediate = _int(cfg, "intermediate_size", 8192)
    return Llama4TextSpec(
        vocab_size=_int(cfg, "vocab_size"), hidden_size=hidden, intermediate_size=intermediate,
        intermediate_size_mlp=_int(cfg, "intermediate_size_mlp", 16384), num_layers=n, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim,
        rms_norm_eps=_float(cfg, "rms_norm_eps", 1e-5), num_experts=experts, top_k=top_k,
        moe_layers=tuple(sorted(set(moe))), rope_layers=rope_layers, chunked_layers=chunked,
        attention_chunk_size=chunk, use_qk_norm=bool(cfg.get("use_qk_norm", True)),
        # published Scout configs carry attn_temperature_tuning: 4; transformers treats it as a flag
        temperature_tuning=bool(cfg.get("attn_temperature_tuning", True)),
        floor_scale=_float(cfg, "floor_scale", 8192), attn_scale=_float(cfg, "attn_scale", 0.1),
        rope=_rope(cfg), bos_token_id=cfg.get("bos_token_id", config.get("bos_token_id")),
        eos_token_ids=_token_ids(cfg.get("eos_token_id", config.get("eos_token_id"))),
        pad_token_id=cfg.get("pad_token_id", config.get("pad_token_id")),
        max_position_embeddings=_int(cfg, "max_position_embeddings", 131072), weight_prefix=prefix,
    )
