"""Builds an ONNX graph whose initializers go straight to the external data file as they are
added, so the model's weights are never all in memory at once."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ALIGN = 4096
MS = "com.microsoft"
_ONNX_TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.int64): TensorProto.INT64,
               np.dtype(np.int32): TensorProto.INT32, np.dtype(np.uint8): TensorProto.UINT8,
               np.dtype(np.float16): TensorProto.FLOAT16}


class GraphWriter:
    """`float_type`: the graph's compute type (float32, or float16 for the cuda pool). Float weights
    and `fconst` constants are written in it, whatever the checkpoint's dtype."""

    def __init__(self, out_dir: Path, model_name: str = "model.onnx", float_type=np.float32):
        self.float_type = np.dtype(float_type)
        self.onnx_float = _ONNX_TYPES[self.float_type]
        self.model_path = out_dir / model_name
        self.data_name = model_name + ".data"
        self._data = open(out_dir / self.data_name, "wb")
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.ops: set[str] = set()
        self._names: set[str] = set()
        self._consts: dict[tuple, str] = {}

    def close(self) -> None:
        if not self._data.closed:
            self._data.close()

    def weight(self, name: str, array: np.ndarray) -> str:
        """Append `array` to the external data file; the graph keeps only its location."""
        return self.weight_parts(name, array.dtype, array.shape, iter([array]))

    def weight_parts(self, name: str, dtype, shape: tuple[int, ...], parts: Iterator[np.ndarray]) -> str:
        """A weight written from consecutive slices along its first axis, one in memory at a time."""
        dtype = np.dtype(dtype)
        if dtype == np.float32 and self.float_type != dtype:
            dtype, parts = self.float_type, (self._narrowed(name, part) for part in parts)
        offset = self._data.tell()
        pad = (-offset) % ALIGN
        if pad:
            self._data.write(b"\0" * pad)
            offset += pad
        for part in parts:
            self._data.write(np.ascontiguousarray(part, dtype=dtype).tobytes())
        length = self._data.tell() - offset
        if length != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise ValueError(f"weight {name}: wrote {length} bytes for shape {list(shape)}")
        t = TensorProto(name=name, data_type=_ONNX_TYPES[dtype], dims=list(shape))
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.data_name), ("offset", str(offset)), ("length", str(length))):
            t.external_data.add(key=key, value=value)
        self.initializers.append(t)
        return name

    def _narrowed(self, name: str, part: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            out = np.asarray(part, dtype=np.float32).astype(self.float_type)
        if not np.isfinite(out).all() and np.isfinite(part).all():
            raise ValueError(f"weight {name} holds values beyond {self.float_type.name}'s range "
                             f"(largest magnitude {float(np.abs(part).max()):.4g}); use a quantized recipe")
        return out

    def fconst(self, value) -> str:
        """A small constant in the compute type."""
        return self.const(value, self.float_type)

    def const(self, value, dtype=np.int64) -> str:
        """A small inline constant, shared by value."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            name = f"const/{array.dtype.name}/{len(self._consts)}"
            self.initializers.append(numpy_helper.from_array(array, name))
            self._consts[key] = name
        return self._consts[key]

    def node(self, op: str, inputs: list[str], name: str, outputs: int | list[str] = 1, domain: str = "",
             **attrs) -> list[str]:
        """Add a node; `outputs` is a count (named after the node) or the output names."""
        if name in self._names:
            raise ValueError(f"duplicate node name {name}")
        self._names.add(name)
        outs = outputs if isinstance(outputs, list) else [f"{name}/output_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain, **attrs))
        self.ops.add(f"{domain + '.' if domain else ''}{op}")
        return outs

    def op(self, op: str, inputs: list[str], name: str, domain: str = "", **attrs) -> str:
        return self.node(op, inputs, name, 1, domain, **attrs)[0]

    def save(self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto]) -> None:
        self.close()
        graph = helper.make_graph(self.nodes, "llama4_text", inputs, outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)],
                                  producer_name="llamaship-llama4")
        model.ir_version = 10
        with open(self.model_path, "wb") as f:
            f.write(model.SerializeToString())
