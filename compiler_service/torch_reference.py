"""The quality gate's PyTorch reference models: transformers' own, float32.

Llama 4 checkpoints are loaded as transformers' Llama4ForCausalLM whatever their architecture: a
Llama4ForConditionalGeneration checkpoint gives its text tower (the text_config and the
`language_model.*` tensors; the vision tower is never read). Published-config quirks that
transformers' strict config validation rejects are coerced first, as the build does.
"""

from __future__ import annotations

from pathlib import Path

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


def load_reference(checkpoint: Path):
    """The float32 PyTorch model the gate compares a build with."""
    import torch
    from transformers import AutoModelForCausalLM

    if is_llama4(read_config(checkpoint / "config.json")):
        return load_llama4_text(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32, trust_remote_code=False)
    return model.eval()


def load_tokenizer(checkpoint: Path):
    """The checkpoint's Hugging Face tokenizer. AutoTokenizer reads config.json through
    AutoConfig, which rejects a published Llama 4 config's quirks: it gets the coerced one."""
    from transformers import AutoTokenizer

    config = read_config(checkpoint / "config.json")
    extra = {"config": llama4_text_config(config)} if is_llama4(config) else {}
    return AutoTokenizer.from_pretrained(str(checkpoint), trust_remote_code=False, **extra)
