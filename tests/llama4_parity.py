"""Helpers for the Llama 4 graph tests: tiny random checkpoints made with transformers, and
logit parity of a build (onnxruntime directly) against transformers, prefill then decode."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from llamaship.llama4_model import LLAMA4_CHAT_TEMPLATE

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def add_chat_template(checkpoint: Path, template: str = LLAMA4_CHAT_TEMPLATE) -> None:
    path = checkpoint / "tokenizer_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "chat_template": template}, indent=2))


def tiny_config(**overrides) -> dict:
    base = dict(vocab_size=2048, hidden_size=64, intermediate_size=32, intermediate_size_mlp=96, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
                interleave_moe_layer_step=1, attention_chunk_size=8, floor_scale=4, attn_scale=0.5,
                max_position_embeddings=256, rope_parameters=dict(LLAMA3_ROPE), bos_token_id=1, eos_token_id=[2, 3],
                pad_token_id=0)
    base.update(overrides)
    return base


def make_checkpoint(out: Path, demo_model: Path, seed: int = 0, **overrides):
    import torch
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    torch.manual_seed(seed)
    model = Llama4ForCausalLM(Llama4TextConfig(**tiny_config(**overrides))).eval()
    with torch.no_grad():  # random init is tiny (std 0.02); widen it so every feature moves the logits
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, 0.15 if "embed" not in name else 1.0)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copyfile(demo_model / name, out / name)
    add_chat_template(out)
    return model


def reference_steps(model, prompt: list[int], decode_steps: int) -> tuple[list[np.ndarray], list[int]]:
    """transformers' logits for the prompt's last token and each greedy decode step, and the tokens."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        cache, logits = out.cache, [out.logits[0, -1].numpy()]
        prefill = out.logits[0].numpy()
        tokens = []
        for _ in range(decode_steps):
            tokens.append(int(logits[-1].argmax()))
            out = model(input_ids=torch.tensor([[tokens[-1]]]), cache=cache, use_cache=True)
            cache = out.cache
            logits.append(out.logits[0, -1].numpy())
    return [prefill] + logits[1:], tokens


def kv_dtype(session) -> type:
    """The KV cache's numpy type of an onnxruntime session over a build (float16 in cuda builds)."""
    return np.float16 if "float16" in session.get_inputs()[2].type else np.float32


def right_padded(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) int64 [B, longest]: each prompt left-aligned, zeros after it."""
    ids = np.zeros((len(prompts), max(len(p) for p in prompts)), dtype=np.int64)
    mask = np.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, : len(p)], mask[b, : len(p)] = p, 1
    return ids, mask


def onnx_steps(build: Path, prompts: list[list[int]], tokens: list[list[int]], layers: int,
               kv_heads: int, head_dim: int, providers: tuple[str, ...] = ("CPUExecutionProvider",)
               ) -> list[list[np.ndarray]]:
    """The build's logits per prompt: the whole prefill (right-padded batch), then one row per
    decode step fed with `tokens` (present → past, mask grows by one)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(str(build / "model.onnx"), so, providers=list(providers))
    kv_type = kv_dtype(session)
    ids, mask = right_padded(prompts)
    batch = len(prompts)
    past = {f"past_key_values.{i}.{kind}": np.zeros((batch, kv_heads, 0, head_dim), kv_type)
            for i in range(layers) for kind in ("key", "value")}
    results: list[list[np.ndarray]] = [[] for _ in prompts]
    names = [o.name for o in session.get_outputs()]
    for step in range(len(tokens[0]) + 1):
        outs = dict(zip(names, session.run(None, {"input_ids": ids, "attention_mask": mask, **past})))
        for b, p in enumerate(prompts):
            results[b].append(outs["logits"][b, : len(p)] if step == 0 else outs["logits"][b, -1])
        if step == len(tokens[0]):
            break
        past = {n.replace("present", "past_key_values"): v for n, v in outs.items() if n.startswith("present")}
        ids = np.array([[t[step]] for t in tokens], dtype=np.int64)
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
    return results


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


def fake_quantize_model(model, bits: dict[str, int | None]) -> None:
    """Replace each weight the build quantizes by its dequantized value, in place."""
    import torch

    from compiler_service.llama4.quant import fake_quantize

    def fq(t: torch.Tensor, b: int | None) -> None:  # t: [N, K] as the build quantizes it
        if b:
            t.copy_(torch.from_numpy(fake_quantize(t.detach().numpy().copy(), b)))

    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                fq(proj.weight, bits["attn"])
            ff = layer.feed_forward
            mlp, group = (ff.shared_expert, "shared_expert") if layer.is_moe_layer else (ff, "mlp")
            for proj in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                fq(proj.weight, bits[group])
            if layer.is_moe_layer and bits["experts"]:
                for e in range(ff.experts.gate_up_proj.shape[0]):
                    fq(ff.experts.gate_up_proj[e].T, bits["experts"])
                    fq(ff.experts.down_proj[e].T, bits["experts"])
        fq(model.lm_head.weight, bits["lm_head"])
