"""Tiny random Llama 4 checkpoints for tests and the bench.

`make_llama4` writes a Llama4ForCausalLM (or a Llama4ForConditionalGeneration with a tiny vision
tower) with random weights as safetensors, with the demo model's tokenizer, an untied lm_head and
several EOS ids. The config can carry the quirks of published Llama 4 configs
(`attn_temperature_tuning: 4`, `max_position_embeddings: 10485760`, an empty `no_rope_layers`),
which transformers' strict config validation rejects: load such a checkpoint with
compiler_service.torch_reference (load_llama4_text, load_tokenizer), not a bare `from_pretrained`. Deterministic: the same arguments
give the same bytes.

Imports torch and transformers: only the compiler side, tests and bench use this module.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llamaship.demo_model import DEFAULT_DIR as DEMO_DIR
from llamaship.demo_model import made_with

STAMP = ".llamaship-make-llama4.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# A chat template in the Llama 4 format (header markers, <|eot|>, text parts of a content list).
LLAMA4_CHAT_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- for message in messages %}\n"
    "    {%- if message['role'] not in ('system', 'user', 'assistant') %}\n"
    "        {{- raise_exception('Unknown role: ' + message['role']) }}\n"
    "    {%- endif %}\n"
    "    {{- '<|header_start|>' + message['role'] + '<|header_end|>\\n\\n' }}\n"
    "    {%- if message['content'] is string %}\n"
    "        {{- message['content'] | trim }}\n"
    "    {%- else %}\n"
    "        {%- for part in message['content'] if part['type'] == 'text' %}\n"
    "            {{- part['text'] | trim }}\n"
    "        {%- endfor %}\n"
    "    {%- endif %}\n"
    "    {{- '<|eot|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|header_start|>assistant<|header_end|>\\n\\n' }}\n"
    "{%- endif %}\n"
)
PUBLISHED_MAX_POSITIONS = 10_485_760  # Llama 4 Scout's config.json
# Scout's rotary: llama3 scaling with these factors (high == low, which transformers warns about)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0, "low_freq_factor": 1.0,
               "high_freq_factor": 1.0, "original_max_position_embeddings": 8192}


@dataclass(frozen=True)
class Llama4Spec:
    hidden_size: int = 64
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 64  # experts and shared expert
    intermediate_size_mlp: int = 128  # dense layers
    num_experts: int = 4
    top_k: int = 1
    moe_layers: tuple[int, ...] | None = None
    interleave_moe_layer_step: int = 1
    no_rope_layers: tuple[int, ...] | None = None  # None: transformers' default (every 4th layer NoPE)
    use_qk_norm: bool = True
    attention_chunk_size: int | None = 8192
    floor_scale: int = 8192
    attn_scale: float = 0.1
    attn_temperature_tuning: bool | int = 4  # 4: as published configs write it
    max_position_embeddings: int = PUBLISHED_MAX_POSITIONS
    rope: tuple[tuple[str, float | str | int], ...] = tuple(sorted(LLAMA3_ROPE.items()))
    rms_norm_eps: float = 1e-5
    init_std: float = 0.05
    conditional: bool = False
    dtype: str = "float32"  # or "bfloat16"
    max_shard_size: str = "5GB"
    # True: weights drawn straight into the shards one slice at a time, never a whole model in
    # memory (bench checkpoints of many GB); False: transformers' own random init and save
    streamed: bool = False
    seed: int = 0
    version: int = 1
    extra: tuple[tuple[str, str], ...] = field(default=())  # config.json keys added as they are (quirks)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True, default=str).encode()).hexdigest()[:16]


def demo_tokenizer_dir() -> Path:
    from llamaship.demo_model import make_model

    return make_model(DEMO_DIR)


def _special_ids(tokenizer_dir: Path) -> tuple[int, int, int, int]:
    """vocab size, bos, eos, pad of the demo tokenizer."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    ids = [tok.token_to_id(t) for t in ("<s>", "</s>", "<pad>")]
    if None in ids:
        raise ValueError("the demo tokenizer lacks <s>, </s> or <pad>")
    return tok.get_vocab_size(), ids[0], ids[1], ids[2]


def text_config_dict(spec: Llama4Spec, vocab: int, bos: int, eos: list[int], pad: int) -> dict:
    cfg = {
        "vocab_size": vocab, "hidden_size": spec.hidden_size, "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads, "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim, "intermediate_size": spec.intermediate_size,
        "intermediate_size_mlp": spec.intermediate_size_mlp, "num_local_experts": spec.num_experts,
        "num_experts_per_tok": spec.top_k, "interleave_moe_layer_step": spec.interleave_moe_layer_step,
        "use_qk_norm": spec.use_qk_norm, "attention_chunk_size": spec.attention_chunk_size,
        "floor_scale": spec.floor_scale, "attn_scale": spec.attn_scale,
        "attn_temperature_tuning": bool(spec.attn_temperature_tuning),
        "max_position_embeddings": spec.max_position_embeddings, "rope_parameters": dict(spec.rope),
        "rms_norm_eps": spec.rms_norm_eps, "initializer_range": spec.init_std, "bos_token_id": bos,
        "eos_token_id": eos, "pad_token_id": pad, "tie_word_embeddings": False,
    }
    if spec.moe_layers is not None:
        cfg["moe_layers"] = list(spec.moe_layers)
    if spec.no_rope_layers is not None:
        cfg["no_rope_layers"] = list(spec.no_rope_layers)
    return cfg


def _vision_config(text_hidden: int) -> dict:
    return {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
            "image_size": 28, "patch_size": 14, "vision_output_dim": 32, "projector_input_dim": 32,
            "projector_output_dim": 32, "pixel_shuffle_ratio": 0.5, "rope_parameters": {"rope_theta": 10000.0}}


def _quirk(config: dict, spec: Llama4Spec) -> dict:
    """Write the text config the way published checkpoints do (what transformers would not save)."""
    config["attn_temperature_tuning"] = spec.attn_temperature_tuning
    config.update(dict(spec.extra))
    return config


def set_chat_template(checkpoint: Path) -> None:
    """The Llama 4 style template in place of the demo tokenizer's (Llama 3 style) one."""
    path = checkpoint / "tokenizer_config.json"
    config = json.loads(path.read_text())
    if config.get("chat_template") != LLAMA4_CHAT_TEMPLATE:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({**config, "chat_template": LLAMA4_CHAT_TEMPLATE}, indent=2))
        tmp.replace(path)


def make_llama4(out_dir: str | Path, spec: Llama4Spec | None = None, *, force: bool = False, **fields) -> Path:
    """Write (or reuse, if made with the same spec) a random Llama 4 checkpoint in `out_dir`.
    Keyword fields override `spec` (e.g. moe_layers=(1, 3), conditional=True)."""
    import dataclasses

    spec = dataclasses.replace(spec or Llama4Spec(), **{k: tuple(v) if isinstance(v, list) else v
                                                       for k, v in fields.items()})
    out = Path(out_dir)
    if not force and made_with(out / STAMP, spec.digest()):
        set_chat_template(out)
        return out

    import torch
    from transformers import Llama4Config, Llama4ForCausalLM, Llama4ForConditionalGeneration, Llama4TextConfig

    tok_dir = demo_tokenizer_dir()
    vocab, bos, eos, pad = _special_ids(tok_dir)
    eos_ids = [eos, pad]  # several EOS ids, as Llama 4's (<|end_of_text|>, <|eot|>, ...)
    text = Llama4TextConfig(**text_config_dict(spec, vocab, bos, eos_ids, pad))
    torch.manual_seed(spec.seed)

    def build():
        if spec.conditional:
            config = Llama4Config(text_config=text, vision_config=_vision_config(spec.hidden_size),
                                  boi_token_index=vocab - 3, eoi_token_index=vocab - 2, image_token_index=vocab - 1,
                                  tie_word_embeddings=False)
            return Llama4ForConditionalGeneration(config)
        return Llama4ForCausalLM(text)

    tmp = out.with_name(out.name + f".tmp-{int(time.time() * 1000)}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if spec.streamed:
        from llamaship.safetensors_stream import write_random

        with torch.device("meta"):
            model = build()
        model.config.architectures = [type(model).__name__]  # as the model's save_pretrained records
        model.config.dtype = spec.dtype
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        shapes = {n: tuple(t.shape) for n, t in model.state_dict().items() if t.is_floating_point()}
        write_random(tmp, shapes, dtype=spec.dtype, std=spec.init_std, seed=spec.seed,
                     max_shard_size=spec.max_shard_size)
    else:
        model = build()
        for param in model.parameters():  # not model.to(): the vision tower's rotary buffer is complex
            param.data = param.data.to(getattr(torch, spec.dtype))
        model.eval().save_pretrained(tmp, safe_serialization=True, max_shard_size=spec.max_shard_size)
    cfg_path = tmp / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if spec.conditional:
        _quirk(cfg["text_config"], spec)
    else:
        _quirk(cfg, spec)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    for name in TOKENIZER_FILES:
        shutil.copyfile(tok_dir / name, tmp / name)
    set_chat_template(tmp)
    (tmp / STAMP).write_text(json.dumps({"digest": spec.digest(), "spec": asdict(spec)}, indent=2, default=str))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out

