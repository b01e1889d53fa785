"""Emits the whole Llama 4 text graph, one layer at a time, with the same inputs and outputs as
the GenAI builder's Llama builds (so the same serving code runs it)."""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
from onnx import TensorProto, helper

from compiler_service.llama4.attention import attention
from compiler_service.llama4.config import Llama4TextSpec
from compiler_service.llama4.ffn import moe, swiglu_mlp
from compiler_service.llama4.linear import Linears
from compiler_service.llama4.onnx_writer import MS, GraphWriter
from compiler_service.llama4.positions import shared_inputs
from compiler_service.llama4.rope import cos_sin_caches
from compiler_service.llama4.weights import Weights


def _io(spec: Llama4TextSpec, kv_type: int) -> tuple[list, list]:
    kv = ["batch_size", spec.num_kv_heads, None, spec.head_dim]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", spec.vocab_size])]
    for kind in ("key", "value"):
        for i in range(spec.num_layers):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", kv_type,
                                                        [d if d is not None else "past_sequence_length" for d in kv]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", kv_type,
                                                         [d if d is not None else "total_sequence_length" for d in kv]))
    return inputs, outputs


def _skip_norm(g: GraphWriter, residual: str, x: str, weight: str, name: str, eps: float) -> list[str]:
    """(normed, '', '', residual + x)"""
    return g.node("SkipSimplifiedLayerNormalization", [residual, x, weight], name,
                  [f"{name}/output_0", "", "", f"{name}/output_3"], MS, epsilon=eps)


def emit(lin: Linears, w: Weights, spec: Llama4TextSpec, context_length: int,
         on_layer: Callable[[int], None]) -> dict[str, str]:
    """Write every node and weight; returns {feature: how the graph implements it}."""
    g, features = lin.g, {}
    if any(spec.chunked_layers) and spec.attention_chunk_size >= context_length:
        # every position of this build lies in the first chunk: chunked layers are plainly causal
        spec = dataclasses.replace(spec, chunked_layers=tuple(False for _ in spec.chunked_layers))
        features["chunked_attention"] = (f"causal only: the build's context ({context_length}) fits in one "
                                         f"chunk ({spec.attention_chunk_size})")
    h, eps = spec.hidden_size, spec.rms_norm_eps
    needs_tuning = spec.temperature_tuning and not all(spec.rope_layers)
    shared = shared_inputs(g, chunk=spec.attention_chunk_size if any(spec.chunked_layers) else None,
                           floor_scale=spec.floor_scale if needs_tuning else None, attn_scale=spec.attn_scale)
    caches = None
    if any(spec.rope_layers):
        cos, sin = cos_sin_caches(spec.rope, spec.head_dim, context_length)
        caches = (g.weight("cos_cache", cos), g.weight("sin_cache", sin))
        features["rope"] = f"GroupQueryAttention do_rotary=1 rotary_interleaved=1, {spec.rope['rope_type']} cos/sin caches"
    if not all(spec.rope_layers):
        features["nope"] = "GroupQueryAttention do_rotary=0"

    vocab = (spec.vocab_size, h)
    embed = g.weight_parts("model.embed_tokens.weight", np.float32, vocab, w.row_blocks("model.embed_tokens.weight", vocab))
    residual = g.op("Gather", [embed, "input_ids"], "/model/embed_tokens")
    ffn_out = None
    for layer in range(spec.num_layers):
        src, p = f"model.layers.{layer}", f"/model/layers.{layer}"
        norm_w = g.weight(f"{src}.input_layernorm.weight", w.read(f"{src}.input_layernorm.weight", (h,)))
        if ffn_out is None:
            x = g.op("SimplifiedLayerNormalization", [residual, norm_w], f"{p}/input_layernorm",
                     epsilon=eps, axis=-1, stash_type=1)
        else:
            x, _, _, residual = _skip_norm(g, residual, ffn_out, norm_w, f"{p}/input_layernorm", eps)
        attn = attention(lin, w, spec, layer, x, shared, caches, features)
        post_w = g.weight(f"{src}.post_attention_layernorm.weight", w.read(f"{src}.post_attention_layernorm.weight", (h,)))
        x, _, _, residual = _skip_norm(g, residual, attn, post_w, f"{p}/post_attention_layernorm", eps)
        if layer in spec.moe_layers:
            ffn_out = moe(lin, w, spec, layer, x, features)
        else:
            ffn_out = swiglu_mlp(lin, "mlp", w, spec, f"{src}.feed_forward", f"{p}/mlp", x, spec.intermediate_size_mlp)
        on_layer(layer)

    final_w = g.weight("model.norm.weight", w.read("model.norm.weight", (h,)))
    x = _skip_norm(g, residual, ffn_out, final_w, "/model/norm", eps)[0]
    wide = g.float_type == np.float32  # logits leave the graph as float32 whatever it computes in
    logits = lin.matmul_rows("lm_head", "lm_head.weight", vocab, lambda: w.row_blocks("lm_head.weight", vocab), x,
                             "/lm_head", ["logits"] if wide else None)
    if not wide:
        g.node("Cast", [logits], "/lm_head/to_float32", ["logits"], to=TensorProto.FLOAT)
    features["residual_norms"] = "SkipSimplifiedLayerNormalization"
    features.update({f"weights.{group}": how for group, how in lin.used.items()})
    return features


def save(g: GraphWriter, spec: Llama4TextSpec) -> None:
    inputs, outputs = _io(spec, g.onnx_float)
    g.save(inputs, outputs)
