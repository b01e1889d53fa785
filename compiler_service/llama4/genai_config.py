"""genai_config.json for a Llama 4 build: labelled `llama` so onnxruntime-genai 0.18 runs it
with the same inputs and outputs as its own Llama builds."""

from __future__ import annotations

from compiler_service.llama4.config import Llama4TextSpec

PROVIDERS = {"cpu": [], "cuda": [{"cuda": {}}]}


def genai_config(spec: Llama4TextSpec, context_length: int, pool: str) -> dict:
    eos = list(spec.eos_token_ids)
    return {
        "model": {
            "bos_token_id": spec.bos_token_id,
            "context_length": context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": PROVIDERS.get(pool, [])},
                "filename": "model.onnx",
                "head_size": spec.head_dim,
                "hidden_size": spec.hidden_size,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": spec.num_heads,
                "num_hidden_layers": spec.num_layers,
                "num_key_value_heads": spec.num_kv_heads,
            },
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": spec.pad_token_id if spec.pad_token_id is not None else (eos[0] if eos else 0),
            "type": "llama",
            "vocab_size": spec.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": context_length, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 50, "top_p": 1.0,
        },
    }
