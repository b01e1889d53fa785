"""Weight-carrying nodes at the precision each group asks for: MatMul (float) or MatMulNBits
for projections, MoE or QMoE for the routed experts. Float means the graph's compute type:
float32 on the cpu pool, float16 on cuda (whose GroupQueryAttention takes no float32)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from compiler_service.llama4.onnx_writer import MS, GraphWriter
from compiler_service.llama4.quant import BLOCK, quantize

GROUPS = ("attn", "mlp", "shared_expert", "experts", "lm_head")
ACCURACY_LEVEL = 0  # float activations: a 4-bit build computes exactly with its dequantized weights
FLOAT_TYPES = {"cpu": np.float32, "cuda": np.float16}
# CUDA's QMoE (float16) reads quantized experts in tiles of 64 along K: hidden and expert width
# must be multiples of 64 there (ORT 1.31 refuses others at run time); such experts stay float.
CUDA_QMOE_TILE = 64


@dataclass(frozen=True)
class Precision:
    name: str
    bits: dict[str, int | None]  # group → 4, 8 or None (float)
    description: str
    pools: tuple[str, ...] = ("cpu", "cuda")


def _all(bits: int | None) -> dict[str, int | None]:
    return {group: bits for group in GROUPS}


PRECISIONS = {p.name: p for p in (
    Precision("fp32", _all(None), "every weight float32", ("cpu",)),
    Precision("fp16", _all(None), "every weight float16", ("cuda",)),
    Precision("int8", _all(8), "projections MatMulNBits 8-bit, experts QMoE 8-bit (block 32, symmetric RTN)"),
    Precision("int4", _all(4), "projections MatMulNBits 4-bit, experts QMoE 4-bit (block 32, symmetric RTN)"),
    Precision("hybrid-int4", {**_all(None), "experts": 4}, "experts QMoE 4-bit; attention, dense MLP, shared "
              "expert and lm_head float (float32 on cpu, float16 on cuda)"),
)}


_BITS = {"float": None, "fp32": None, "int8": 8, "int4": 4}


def precision_named(name: str) -> Precision:
    """A preset (fp32, int8, int4, hybrid-int4), or per-group choices written
    'groups:attn=int8,mlp=float,shared_expert=int8,experts=int4,lm_head=int8' (unnamed groups float)."""
    if name in PRECISIONS:
        return PRECISIONS[name]
    if not name.startswith("groups:"):
        raise ValueError(f"Llama 4 precision {name[:40]} is not supported (one of {', '.join(PRECISIONS)}, "
                         f"or groups:<group>=<float|int8|int4>,...)")
    bits = _all(None)
    for item in filter(None, name[len("groups:"):].split(",")):
        group, _, value = item.partition("=")
        if group not in GROUPS or value not in _BITS:
            raise ValueError(f"Llama 4 precision item {item[:40]} is not <group>=<float|int8|int4> "
                             f"with a group among {', '.join(GROUPS)}")
        bits[group] = _BITS[value]
    return Precision(name, bits, "per group: " + ", ".join(f"{g} {f'int{b}' if b else 'float'}"
                                                          for g, b in bits.items()))


def float_type(precision: Precision, pool: str) -> np.dtype:
    """The compute type of `precision`'s builds for `pool`; ValueError where the pool cannot run it."""
    if pool not in FLOAT_TYPES:
        raise ValueError(f"Llama 4 builds run on the pools {', '.join(FLOAT_TYPES)}, not {pool[:40]}")
    if pool not in precision.pools:
        raise ValueError(f"Llama 4 precision {precision.name} is for the {', '.join(precision.pools)} pool, not {pool}")
    return np.dtype(FLOAT_TYPES[pool])


class Linears:
    def __init__(self, g: GraphWriter, precision: Precision):
        self.g, self.precision = g, precision
        self.used: dict[str, str] = {}
        self.float_name = g.float_type.name

    def _bits(self, group: str, *dims: int) -> int | None:
        bits = self.precision.bits[group]
        return bits if bits and all(d % BLOCK == 0 for d in dims) else None

    def matmul(self, group: str, name: str, weight: np.ndarray, x: str, node: str,
               outputs: list[str] | None = None) -> str:
        """x @ weight.T for a [N, K] (nn.Linear layout) weight."""
        n, k = weight.shape
        bits = self._bits(group, k)
        out = outputs or 1
        if bits is None:
            self.used.setdefault(group, f"MatMul {self.float_name}")
            return self.g.node("MatMul", [x, self.g.weight(name, weight.T)], node, out)[0]
        packed, scales = quantize(weight, bits)
        self.used.setdefault(group, f"MatMulNBits {bits}-bit block {BLOCK}")
        inputs = [x, self.g.weight(f"{name}.q{bits}", packed), self.g.weight(f"{name}.scales", scales)]
        return self.g.node("MatMulNBits", inputs, node, out, MS, K=k, N=n, bits=bits, block_size=BLOCK,
                           accuracy_level=ACCURACY_LEVEL)[0]

    def matmul_rows(self, group: str, name: str, shape: tuple[int, int], blocks: Callable[[], Iterator[np.ndarray]],
                    x: str, node: str, outputs: list[str] | None = None) -> str:
        """x @ W.T for a large [N, K] weight given as consecutive row blocks, never whole in memory."""
        n, k = shape
        bits = self._bits(group, k)
        out = outputs or 1
        if bits is None:
            self.used.setdefault(group, f"FusedMatMul {self.float_name} (transB)")
            weight = self.g.weight_parts(name, np.float32, shape, blocks())
            return self.g.node("FusedMatMul", [x, weight], node, out, MS, transB=1)[0]
        self.used.setdefault(group, f"MatMulNBits {bits}-bit block {BLOCK}")
        scales: list[np.ndarray] = []

        def packed_parts():
            for rows in blocks():
                packed, s = quantize(rows, bits)
                scales.append(s)
                yield packed

        packed = self.g.weight_parts(f"{name}.q{bits}", np.uint8, (n, k // BLOCK, BLOCK * bits // 8), packed_parts())
        inputs = [x, packed, self.g.weight(f"{name}.scales", np.concatenate(scales))]
        return self.g.node("MatMulNBits", inputs, node, out, MS, K=k, N=n, bits=bits, block_size=BLOCK,
                           accuracy_level=ACCURACY_LEVEL)[0]

    def experts(self, name: str, shape: tuple[int, int, int], fc1_rows: Callable[[int], np.ndarray],
                fc2_rows: Callable[[int], np.ndarray]) -> tuple[str, list[str], dict]:
        """(op, weight inputs after router_probs, attributes) for E experts of hidden H and width I;
        fc1_rows(e) is [2I, H] (gate/up interleaved), fc2_rows(e) is [H, I]; one expert in memory at a time."""
        e, h, i = shape
        bits = self._bits("experts", h, i)
        if bits and self.g.float_type == np.float16 and (h % CUDA_QMOE_TILE or i % CUDA_QMOE_TILE):
            bits = None
        if bits is None:
            self.used.setdefault("experts", f"MoE {self.float_name}")
            fc1 = self.g.weight_parts(f"{name}.fc1", np.float32, (e, 2 * i, h), (fc1_rows(x) for x in range(e)))
            fc2 = self.g.weight_parts(f"{name}.fc2", np.float32, (e, h, i), (fc2_rows(x) for x in range(e)))
            return "MoE", [fc1, "", fc2], {}
        self.used.setdefault("experts", f"QMoE {bits}-bit block {BLOCK}")
        inputs = []
        for label, rows, n, k in (("fc1", fc1_rows, 2 * i, h), ("fc2", fc2_rows, h, i)):
            scales: list[np.ndarray] = []

            def packed_parts(rows=rows, scales=scales):
                for x in range(e):
                    packed, s = quantize(rows(x), bits)
                    scales.append(s)
                    yield packed.reshape(packed.shape[0], -1)

            weights = self.g.weight_parts(f"{name}.{label}.q{bits}", np.uint8, (e, n, k * bits // 8), packed_parts())
            inputs += [weights, self.g.weight(f"{name}.{label}.scales", np.stack(scales)), ""]
        return "QMoE", inputs[:-1], dict(expert_weight_bits=bits, block_size=BLOCK, quant_type="int",
                                         weights_prepacked=0, accuracy_level=ACCURACY_LEVEL)
