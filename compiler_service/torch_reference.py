"""The quality gate's PyTorch reference models: transformers' own, float32.

Llama 4 checkpoints are loaded as transformers' Llama4ForCausalLM whatever their architecture: a
Llama4ForConditionalGeneration checkpoint gives its text tower (the text_config and the
`language_model.*` tensors; the vision tower is never read). Published-config quirks that
transformers' strict config validation rejects are coerced first, as the build does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from compiler_service.checkpoint import LLAMA4_ARCHITECTURES, CheckpointError, read_config

# config.json keys of Llama 4 text configs that transformers' Llama4TextConfig does not take as they are
_DROP = ("architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "auto_map")


def llama4_text_config(config: dict):
    """transformers' Llama4TextConfig for either Llama 4 architecture's config.json."""
    from transformers import Llama4TextConfig

    text = dict(config["text_config"] if _nested(config) else config)
    for key in _DROP:
        text.pop(key, None)
    if "attn_temperature_tuning" in text:  # published configs write 4; transformers wants a flag
        text["attn_temperature_tuning"] = bool(text["attn_temperature_tuning"])
    if "rope_parameters" not in text and ("rope_scaling" in text or "rope_theta" in text):
        rope = dict(text.pop("rope_scaling", None) or {"rope_type": "default"})
        rope.setdefault("rope_type", rope.pop("type", "default"))
        rope["rope_theta"] = text.pop("rope_theta", 500000.0)
        text["rope_parameters"] = rope
    return Llama4TextConfig(**text)


def _nested(config: dict) -> bool:
    """A Llama4ForConditionalGeneration config: the text model's is its text_config."""
    return "Llama4ForConditionalGeneration" in (config.get("architectures") or []) or config.get("model_type") == "llama4"


def is_llama4(config: dict) -> bool:
    archs = config.get("architectures") or []
    return bool(set(archs) & set(LLAMA4_ARCHITECTURES))


def load_llama4_text(checkpoint: Path, dtype: str = "float32"):
    """Llama4ForCausalLM with the checkpoint's text tower, tensor by tensor from its safetensors."""
    import torch
    from safetensors import safe_open
    from transformers import Llama4ForCausalLM
    from transformers.models.llama4.modeling_llama4 import Llama4TextRotaryEmbedding

    config = read_config(checkpoint / "config.json")
    text = llama4_text_config(config)
    prefix = "language_model." if _nested(config) else ""
    torch_dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = Llama4ForCausalLM(text)
    wanted = set(model.state_dict())
    state = {}
    for path in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if name.startswith(prefix) and name[len(prefix):] in wanted:
                    state[name[len(prefix):]] = f.get_tensor(name).to(torch_dtype)
    missing = sorted(wanted - set(state))
    if missing:
        raise CheckpointError(f"the weights have no {prefix}{missing[0]}")
    model.load_state_dict(state, strict=True, assign=True)
    model.model.rotary_emb = Llama4TextRotaryEmbedding(config=text)  # its buffers were made on the meta device
    return model.eval()


def _tensor_files(checkpoint: Path) -> dict[str, Path]:
    from safetensors import safe_open

    files: dict[str, Path] = {}
    for path in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            files.update((name, path) for name in f.keys())
    return files


def llama4_logits_layerwise(checkpoint: Path, token_ids: list[list[int]],
                            transform: Callable[[str, Any], Any] | None = None,
                            routes: dict[int, list] | None = None) -> list:
    """transformers' Llama4ForCausalLM logits (float32) for every prompt, computed one decoder
    layer at a time: only one layer's weights (and every prompt's hidden states) are in memory.
    The same modules and mask functions as the whole model's forward, so the same numbers.
    `transform(name, tensor)` may change each weight as it is loaded; `routes`, if given, gets
    every MoE layer's chosen experts per prompt ({layer: [[tokens, k] indices per prompt]})."""
    import torch
    from safetensors import safe_open
    from transformers import Llama4ForCausalLM
    from transformers.models.llama4 import modeling_llama4 as ml

    config = read_config(checkpoint / "config.json")
    text = llama4_text_config(config)
    prefix = "language_model." if _nested(config) else ""
    files = _tensor_files(checkpoint)

    def materialize(module, name: str) -> None:
        """Load `module`'s weights (`name` is its path in Llama4ForCausalLM) from the checkpoint."""
        state = {}
        for key in module.state_dict():
            full = f"{prefix}{name}.{key}"
            if full not in files:
                raise CheckpointError(f"the weights have no {full}")
            with safe_open(str(files[full]), framework="pt") as f:
                state[key] = f.get_tensor(full).to(torch.float32)
            if transform is not None:
                state[key] = transform(f"{name}.{key}", state[key])
        module.load_state_dict(state, strict=True, assign=True)

    with torch.device("meta"):
        model = Llama4ForCausalLM(text)
    m = model.model
    m.rotary_emb = ml.Llama4TextRotaryEmbedding(config=text)
    masks_for = {"full_attention": ml.create_causal_mask, "chunked_attention": ml.create_chunked_causal_mask}
    with torch.inference_mode():
        materialize(m.embed_tokens, "model.embed_tokens")
        hidden = [m.embed_tokens(torch.tensor([ids])) for ids in token_ids]
        m.embed_tokens.to("meta")
        positions = [torch.arange(len(ids)).unsqueeze(0) for ids in token_ids]
        masks, rotary = [], []
        for h, pos in zip(hidden, positions):
            kwargs = {"config": text, "inputs_embeds": h, "attention_mask": None, "position_ids": pos}
            masks.append({t: masks_for[t](**kwargs, **{_cache_kw(masks_for[t]): None}) for t in set(text.layer_types)})
            rotary.append(m.rotary_emb(h, pos))
        for i, layer in enumerate(m.layers):
            materialize(layer, f"model.layers.{i}")
            kind = text.layer_types[i]
            if routes is not None and hasattr(layer.feed_forward, "router"):
                top_k = text.num_experts_per_tok
                layer.feed_forward.router.register_forward_hook(
                    lambda mod, args, out, i=i: routes.setdefault(i, []).append(out[1].topk(top_k, dim=-1).indices))
            no_cache = {_cache_kw(layer.forward): None}
            hidden = [layer(h, attention_mask=mask[kind], position_ids=pos, use_cache=False, position_embeddings=freq,
                            **no_cache) for h, mask, pos, freq in zip(hidden, masks, positions, rotary)]
            layer.to("meta")
        materialize(m.norm, "model.norm")
        materialize(model.lm_head, "lm_head")
        return [model.lm_head(m.norm(h))[0].float().numpy() for h in hidden]


def _cache_kw(fn) -> str:
    """transformers 5.2x names the KV cache argument `cache`; earlier 5.x, `past_key_values`."""
    import inspect

    return "cache" if "cache" in inspect.signature(fn).parameters else "past_key_values"


def reference_logits(checkpoint: Path, token_ids: list[list[int]], routes: dict[int, list] | None = None) -> list:
    """The float32 PyTorch logits the gate compares a build with, at every position of every
    prompt: Llama 4 one layer at a time (its checkpoints are far larger than one layer; `routes`
    gets its router choices), Llama as one model."""
    import torch
    from transformers import AutoModelForCausalLM

    if is_llama4(read_config(checkpoint / "config.json")):
        return llama4_logits_layerwise(checkpoint, token_ids, routes=routes)
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32, trust_remote_code=False)
    model.eval()
    with torch.inference_mode():
        out = [model(torch.tensor([ids])).logits[0].float().numpy() for ids in token_ids]
    del model
    return out


def load_tokenizer(checkpoint: Path):
    """The checkpoint's Hugging Face tokenizer. AutoTokenizer reads config.json through
    AutoConfig, which rejects a published Llama 4 config's quirks: it gets the coerced one."""
    from transformers import AutoTokenizer

    config = read_config(checkpoint / "config.json")
    extra = {"config": llama4_text_config(config)} if is_llama4(config) else {}
    return AutoTokenizer.from_pretrained(str(checkpoint), trust_remote_code=False, **extra)
