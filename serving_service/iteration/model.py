"""The build's decoder model as one ONNX Runtime session, run over a range of KV slots.

Builds from the GenAI builder and the Llama 4 graph builder share the interface: input_ids,
attention_mask, past_key_values.N.key/value in; logits, present.N.key/value out; attention is
GroupQueryAttention, which takes each row's length from the attention mask.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from serving_service.iteration.kv import START_LEN, KVBuffers, KVShape

MIN_START_LEN = 64  # a budget that cannot give every slot this many tokens is refused at load

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
       "tensor(int32)": np.int32}


def _providers(provider: str | None) -> list:
    if provider == "cuda":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if provider in (None, "", "cpu"):
        return ["CPUExecutionProvider"]
    raise ValueError(f"the iteration engine does not run provider {provider!r}")


class DecoderModel:
    def __init__(self, build_dir: str | Path, provider: str | None, threads: int, max_rows: int,
                 max_len: int | None = None, start_len: int = START_LEN, kv_budget_bytes: int = 0):
        import onnxruntime as ort

        build_dir = Path(build_dir)
        genai = json.loads((build_dir / "genai_config.json").read_text())["model"]
        dec = genai["decoder"]
        self.context_length = int(genai["context_length"])
        self.vocab_size = int(genai["vocab_size"])
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(build_dir / dec.get("filename", "model.onnx")), so,
                                            providers=_providers(provider))
        types = {i.name: i.type for i in self.session.get_inputs()}
        names_in, names_out = dec["inputs"], dec["outputs"]
        self.ids_name, self.mask_name = names_in["input_ids"], names_in["attention_mask"]
        self.ids_type, self.mask_type = _NP[types[self.ids_name]], _NP[types[self.mask_name]]
        self.position_name = names_in.get("position_ids") if names_in.get("position_ids") in types else None
        self.logits_name = names_out["logits"]
        layers = int(dec["num_hidden_layers"])
        self.kv_names = [[(names_in[f"past_{k}_names"] % i, names_out[f"present_{k}_names"] % i)
                          for k in ("key", "value")] for i in range(layers)]
        kv_type = _NP[types[self.kv_names[0][0][0]]]
        self.device = "cuda" if provider == "cuda" else "cpu"
        limit = int(max_len or self.context_length)
        shape = KVShape(layers, int(dec["num_key_value_heads"]), int(dec["head_size"]), min(limit, start_len),
                        max_rows, limit)
        if kv_budget_bytes:  # start shorter when every slot at the start length would not fit
            per_slot = kv_budget_bytes // (shape.token_bytes * np.dtype(kv_type).itemsize * max_rows)
            if per_slot < shape.max_len:
                shape = replace(shape, max_len=max(per_slot, min(MIN_START_LEN, limit)))
        self.kv = KVBuffers(shape, kv_type, self.device, budget_bytes=kv_budget_bytes or None)
        self._ort_kv_type = kv_type
        self._bindings: dict[tuple[int, int], object] = {}
        self._generation = self.kv.generation
        self._fed: tuple = ()
        self._logits: dict[tuple[int, int], np.ndarray] = {}
        self.logits_type = _NP[{o.name: o.type for o in self.session.get_outputs()}[self.logits_name]]
        self._positions = None

    @property
    def shape(self) -> KVShape:
        return self.kv.shape

    def forward(self, slot: int, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Run rows [slot, slot + len(ids)): `ids` [n, s] are their new tokens and `mask` [n, total]
        marks each row's tokens (past and new, left-aligned). Returns logits [n, s, vocab] (float32)."""
        n = ids.shape[0]
        io = self._binding(slot, n)
        self._fed = (np.ascontiguousarray(ids, self.ids_type), np.ascontiguousarray(mask, self.mask_type))
        io.bind_cpu_input(self.ids_name, self._fed[0])
        io.bind_cpu_input(self.mask_name, self._fed[1])
        if self.position_name:
            past = mask.sum(axis=1, keepdims=True) - ids.shape[1]
            self._positions = (past + np.arange(ids.shape[1])).astype(np.int64)
            io.bind_cpu_input(self.position_name, self._positions)
        width = ids.shape[1]
        out = self._logits.get((slot, n)) if width == 1 else None
        if width == 1 and out is None:  # decode steps write into a buffer of their own per slot range
            out = self._logits[(slot, n)] = np.empty((n, 1, self.vocab_size), self.logits_type)
        if out is not None:
            io.bind_output(self.logits_name, "cpu", 0, self.logits_type, list(out.shape), out.ctypes.data)
        else:
            io.bind_output(self.logits_name, "cpu")  # a fresh one: its shape follows the new tokens
        self.session.run_with_iobinding(io)
        logits = out if out is not None else io.get_outputs()[-1].numpy()
        return logits if logits.dtype == np.float32 else logits.astype(np.float32)

    def _binding(self, slot: int, n: int):
        """The binding of slots [slot, slot + n) onto the KV buffers, made once per range."""
        if self._generation != self.kv.generation:
            self._bindings.clear()
            self._generation = self.kv.generation
        io = self._bindings.get((slot, n))
        if io is None:
            io = self.session.io_binding()
            shape = self.kv.shape.rows(n)
            for layer, kinds in enumerate(self.kv_names):
                for kind, (past_name, present_name) in enumerate(kinds):
                    ptr = self.kv.address(layer, kind, slot)
                    io.bind_input(past_name, self.device, 0, self._ort_kv_type, shape, ptr)
                    io.bind_output(present_name, self.device, 0, self._ort_kv_type, shape, ptr)
            self._bindings[(slot, n)] = io
        return io
