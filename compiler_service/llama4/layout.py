"""Every tensor a Llama 4 text build reads, with the shape the config implies; checked against
the safetensors headers before any weight is converted."""

from __future__ import annotations

from compiler_service.llama4.config import Llama4TextSpec


def expected_tensors(spec: Llama4TextSpec) -> dict[str, tuple[int, ...]]:
    h, d, v = spec.hidden_size, spec.head_dim, spec.vocab_size
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,),
                                       "lm_head.weight": (v, h)}
    for i in range(spec.num_layers):
        p = f"model.layers.{i}"
        out[f"{p}.input_layernorm.weight"] = (h,)
        out[f"{p}.post_attention_layernorm.weight"] = (h,)
        out[f"{p}.self_attn.q_proj.weight"] = (spec.num_heads * d, h)
        out[f"{p}.self_attn.k_proj.weight"] = (spec.num_kv_heads * d, h)
        out[f"{p}.self_attn.v_proj.weight"] = (spec.num_kv_heads * d, h)
        out[f"{p}.self_attn.o_proj.weight"] = (h, spec.num_heads * d)
        f = f"{p}.feed_forward"
        if i in spec.moe_layers:
            e, m = spec.num_experts, spec.intermediate_size
            out[f"{f}.router.weight"] = (e, h)
            out[f"{f}.experts.gate_up_proj"] = (e, h, 2 * m)
            out[f"{f}.experts.down_proj"] = (e, m, h)
            mlp, width = f"{f}.shared_expert", m
        else:
            mlp, width = f, spec.intermediate_size_mlp
        out[f"{mlp}.gate_proj.weight"] = (width, h)
        out[f"{mlp}.up_proj.weight"] = (width, h)
        out[f"{mlp}.down_proj.weight"] = (h, width)
    return out
