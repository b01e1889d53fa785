"""In-graph tensors every layer shares: GroupQueryAttention's seqlens_k and total length, and
the query positions it uses (so the chunk mask and temperature tuning agree with its rotary)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from compiler_service.llama4.onnx_writer import GraphWriter


@dataclass
class SharedInputs:
    seqlens_k: str  # int32 [B]: valid tokens per row after this step, minus one
    total_length: str  # int32 scalar: attention_mask width
    positions: str | None = None  # int64 [B, S]
    chunk_bias: str | None = None  # float [B, 1, S, T]
    temperature: str | None = None  # float [B, S, 1]


def shared_inputs(g: GraphWriter, *, chunk: int | None, floor_scale: float | None, attn_scale: float) -> SharedInputs:
    p = "/model/shared"
    one = g.const([1])
    valid = g.op("ReduceSum", ["attention_mask", one], f"{p}/valid", keepdims=0)  # int64 [B]
    seqlens = g.op("Cast", [g.op("Sub", [valid, one], f"{p}/valid_minus_1")], f"{p}/seqlens_k", to=6)
    mask_shape = g.op("Shape", ["attention_mask"], f"{p}/mask_shape")
    total64 = g.op("Gather", [mask_shape, g.const(1)], f"{p}/total64", axis=0)
    total = g.op("Cast", [total64], f"{p}/total_length", to=6)
    out = SharedInputs(seqlens, total)
    if chunk is None and floor_scale is None:
        return out

    ids_shape = g.op("Shape", ["input_ids"], f"{p}/ids_shape")
    seq = g.op("Gather", [ids_shape, g.const(1)], f"{p}/seq_len", axis=0)
    steps = g.op("Range", [g.const(0), seq, g.const(1)], f"{p}/steps")  # [S]
    # GroupQueryAttention: a first prompt (S == T) starts every row at 0 (right padding);
    # later, row b's new tokens start at seqlens_k[b] + 1 - S.
    first = g.op("Equal", [seq, total64], f"{p}/is_first_prompt")
    start = g.op("Where", [first, g.const(0), g.op("Sub", [valid, seq], f"{p}/past_len")], f"{p}/start")
    pos = g.op("Add", [g.op("Unsqueeze", [start, one], f"{p}/start_col"),
                       g.op("Unsqueeze", [steps, g.const([0])], f"{p}/steps_row")], f"{p}/positions_raw")
    out.positions = g.op("Max", [pos, g.const(0)], f"{p}/positions")
    if chunk is not None:
        size = g.const(chunk)
        q_chunk = g.op("Unsqueeze", [g.op("Div", [out.positions, size], f"{p}/q_chunk"), g.const([2])],
                       f"{p}/q_chunk3")
        keys = g.op("Range", [g.const(0), total64, g.const(1)], f"{p}/keys")
        k_chunk = g.op("Div", [keys, size], f"{p}/k_chunk")
        same = g.op("Equal", [q_chunk, k_chunk], f"{p}/same_chunk")  # [B, S, T]
        masked = g.fconst(np.finfo(g.float_type).min)
        bias = g.op("Where", [same, g.fconst(0.0), masked], f"{p}/chunk_bias3")
        out.chunk_bias = g.op("Unsqueeze", [bias, one], f"{p}/chunk_bias")
    if floor_scale is not None:
        posf = g.op("Cast", [out.positions], f"{p}/positions_f", to=1)
        ratio = g.op("Div", [g.op("Add", [posf, g.const(1.0, np.float32)], f"{p}/pos_plus_1"),
                             g.const(np.float32(floor_scale), np.float32)], f"{p}/pos_over_floor")
        log = g.op("Log", [g.op("Add", [g.op("Floor", [ratio], f"{p}/floor"), g.const(1.0, np.float32)],
                                f"{p}/floor_plus_1")], f"{p}/log1p")
        scale = g.op("Add", [g.op("Mul", [log, g.const(np.float32(attn_scale), np.float32)], f"{p}/log_scaled"),
                             g.const(1.0, np.float32)], f"{p}/temperature2")
        if g.float_type != np.float32:  # computed in float32 (positions past 2048 are not exact in float16)
            scale = g.op("Cast", [scale], f"{p}/temperature_narrow", to=g.onnx_float)
        out.temperature = g.op("Unsqueeze", [scale, g.const([2])], f"{p}/temperature")
    return out
