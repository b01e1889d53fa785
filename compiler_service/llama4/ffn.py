"""Feed-forward blocks: the dense SwiGLU MLP, and the routed MoE (com.microsoft MoE with one
expert per call, the sigmoid router score scaling the expert input) plus its shared expert."""

from __future__ import annotations

import numpy as np

from compiler_service.llama4.config import Llama4TextSpec
from compiler_service.llama4.linear import Linears
from compiler_service.llama4.onnx_writer import MS
from compiler_service.llama4.weights import Weights



def swiglu_mlp(lin: Linears, group: str, w: Weights, spec: Llama4TextSpec, src: str, p: str, x: str,
               width: int) -> str:
    g, h = lin.g, spec.hidden_size
    gate = lin.matmul(group, f"{src}.gate_proj.weight", w.read(f"{src}.gate_proj.weight", (width, h)), x, f"{p}/gate_proj")
    up = lin.matmul(group, f"{src}.up_proj.weight", w.read(f"{src}.up_proj.weight", (width, h)), x, f"{p}/up_proj")
    act = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{p}/act/sigmoid")], f"{p}/act/silu")
    hidden = g.op("Mul", [act, up], f"{p}/gate_times_up")
    return lin.matmul(group, f"{src}.down_proj.weight", w.read(f"{src}.down_proj.weight", (h, width)), hidden,
                      f"{p}/down_proj")


def fc1_rows(gate_up: np.ndarray) -> np.ndarray:
    """One expert's [H, 2I] (gate | up, used as x @ W) → [2I, H] rows gate0, up0, gate1, up1...
    (MoE's swiglu_fusion=1 layout)."""
    i = gate_up.shape[1] // 2
    rows = np.empty((2 * i, gate_up.shape[0]), dtype=np.float32)
    rows[0::2], rows[1::2] = gate_up[:, :i].T, gate_up[:, i:].T
    return rows


def moe(lin: Linears, w: Weights, spec: Llama4TextSpec, layer: int, x: str, features: dict[str, str]) -> str:
    g, p = lin.g, f"/model/layers.{layer}/moe"
    src = f"model.layers.{layer}.feed_forward"
    h, e, k = spec.hidden_size, spec.num_experts, spec.top_k
    rows = g.op("Reshape", [x, g.const([-1, h])], f"{p}/rows")
    router = w.read(f"{src}.router.weight", (e, h)).T
    logits = g.op("MatMul", [rows, g.weight(f"{src}.router.weight", router)], f"{p}/router")
    i, gate_up, down = spec.intermediate_size, f"{src}.experts.gate_up_proj", f"{src}.experts.down_proj"
    op, weights, extra = lin.experts(f"{src}.experts", (e, h, i),
                                     lambda x: fc1_rows(w.read_slice(gate_up, (e, h, 2 * i), x)),
                                     lambda x: np.ascontiguousarray(w.read_slice(down, (e, i, h), x).T))
    attrs = dict(k=1, normalize_routing_weights=1, activation_type="swiglu", swiglu_fusion=1,
                 activation_alpha=1.0, activation_beta=0.0, swiglu_limit=float("inf"), use_sparse_mixer=0, **extra)
    routed: list[str] = []
    if k == 1:
        # MoE takes softmax then top-1 with the chosen weight normalized to exactly 1; the
        # sigmoid of the top logit scales the input, as transformers does.
        score = g.op("Sigmoid", [g.op("ReduceMax", [logits, g.const([-1])], f"{p}/top_logit", keepdims=1)],
                     f"{p}/score")
        scaled = g.op("Mul", [rows, score], f"{p}/scaled_input")
        routed.append(g.op(op, [scaled, logits, *weights], f"{p}/{op}", MS, **attrs))
        features["moe"] = f"com.microsoft {op} (k=1, input scaled by sigmoid of the top logit)"
    else:
        values, indices = g.node("TopK", [logits, g.const([k])], f"{p}/topk", 2, axis=-1, largest=1, sorted=1)
        experts = g.const(np.arange(e))
        for j in range(k):
            col = g.const([j])
            idx = g.op("Gather", [indices, col], f"{p}/choice{j}/index", axis=1)  # [N, 1]
            chosen = g.op("Equal", [idx, experts], f"{p}/choice{j}/onehot")  # [N, E]
            never = g.fconst(np.finfo(g.float_type).min)  # a logit that softmax turns into exactly 0
            probs = g.op("Where", [chosen, logits, never], f"{p}/choice{j}/logits")
            score = g.op("Sigmoid", [g.op("Gather", [values, col], f"{p}/choice{j}/logit", axis=1)],
                         f"{p}/choice{j}/score")
            scaled = g.op("Mul", [rows, score], f"{p}/choice{j}/scaled_input")
            routed.append(g.op(op, [scaled, probs, *weights], f"{p}/choice{j}/{op}", MS, **attrs))
        features["moe"] = f"com.microsoft {op} once per chosen expert (k={k}), inputs scaled by each sigmoid score"
    out = swiglu_mlp(lin, "shared_expert", w, spec, f"{src}.shared_expert", f"{p}/shared_expert", rows,
                     spec.intermediate_size)
    for j, r in enumerate(routed):
        out = g.op("Add", [out, r], f"{p}/add_routed{j}")
    return g.op("Reshape", [out, g.op("Shape", [x], f"{p}/in_shape")], f"{p}/unrows")
