"""One Llama 4 attention block: GroupQueryAttention with rotary on RoPE layers, the weightless
QK norm, the chunk mask as attention_bias, and temperature tuning on NoPE layers."""

from __future__ import annotations

import numpy as np

from compiler_service.llama4.config import Llama4TextSpec
from compiler_service.llama4.linear import Linears
from compiler_service.llama4.onnx_writer import MS, GraphWriter
from compiler_service.llama4.positions import SharedInputs
from compiler_service.llama4.weights import Weights


def _qk_norm(g: GraphWriter, x: str, name: str, spec: Llama4TextSpec) -> str:
    heads = g.op("Reshape", [x, g.const([0, 0, -1, spec.head_dim])], f"{name}/heads")
    normed = g.op("SimplifiedLayerNormalization", [heads, g.fconst(np.ones(spec.head_dim))],
                  f"{name}/norm", epsilon=spec.rms_norm_eps, axis=-1, stash_type=1)
    return g.op("Reshape", [normed, g.const([0, 0, -1])], f"{name}/flat")


def attention(lin: Linears, w: Weights, spec: Llama4TextSpec, layer: int, x: str, shared: SharedInputs,
              caches: tuple[str, str] | None, features: dict[str, str]) -> str:
    g = lin.g
    p = f"/model/layers.{layer}/attn"
    src = f"model.layers.{layer}.self_attn"
    h, d = spec.hidden_size, spec.head_dim
    q_rows, kv_rows = spec.num_heads * d, spec.num_kv_heads * d
    qkv_weight = np.concatenate([w.read(f"{src}.q_proj.weight", (q_rows, h)), w.read(f"{src}.k_proj.weight", (kv_rows, h)),
                                 w.read(f"{src}.v_proj.weight", (kv_rows, h))], axis=0)
    qkv = lin.matmul("attn", f"{src}.qkv_proj.weight", qkv_weight, x, f"{p}/qkv_proj")
    del qkv_weight

    rope = spec.rope_layers[layer]
    qk_norm = spec.use_qk_norm and rope
    tuned = spec.temperature_tuning and not rope
    query, key, value = qkv, "", ""
    if qk_norm or tuned:
        query, key, value = g.node("Split", [qkv, g.const([q_rows, kv_rows, kv_rows])], f"{p}/split_qkv", 3, axis=-1)
    if qk_norm:
        # transformers normalizes after rotary; a weightless RMS norm over each head commutes with
        # the rotation (it preserves every pair's norm), so GroupQueryAttention may rotate after it.
        query, key = _qk_norm(g, query, f"{p}/q_norm", spec), _qk_norm(g, key, f"{p}/k_norm", spec)
        features["qk_norm"] = "SimplifiedLayerNormalization (ones) before fused rotary"
    if tuned:
        query = g.op("Mul", [query, shared.temperature], f"{p}/temperature_tuning")
        features["temperature_tuning"] = "composed (Floor/Log/Mul on in-graph positions)"
    chunked = spec.chunked_layers[layer]
    if chunked:
        features["chunked_attention"] = "GroupQueryAttention attention_bias from in-graph chunk mask"
    cos, sin = caches if rope and caches else ("", "")
    inputs = [query, key, value, f"past_key_values.{layer}.key", f"past_key_values.{layer}.value",
              shared.seqlens_k, shared.total_length, cos, sin, "", shared.chunk_bias if chunked else ""]
    while inputs[-1] == "":
        inputs.pop()
    out = g.node("GroupQueryAttention", inputs, f"{p}/GroupQueryAttention",
                 [f"{p}/GroupQueryAttention/output_0", f"present.{layer}.key", f"present.{layer}.value"], MS,
                 num_heads=spec.num_heads, kv_num_heads=spec.num_kv_heads, scale=spec.scale, local_window_size=-1,
                 do_rotary=int(rope), rotary_interleaved=1)[0]
    return lin.matmul("attn", f"{src}.o_proj.weight", w.read(f"{src}.o_proj.weight", (h, q_rows)), out, f"{p}/o_proj")
