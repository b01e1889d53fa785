"""`llamaship make-model`: a small, real Llama checkpoint made on this machine.

There is no model hub here, so the demo model is made locally: a byte-level BPE tokenizer
trained on Python's own standard-library sources, and a LlamaForCausalLM with grouped-query
attention trained briefly on the same text. Deterministic (fixed seeds, sorted inputs, fixed
thread count) and cached: a directory that already holds a model made with the same recipe is
left as it is.

Imports torch and transformers: only the compiler side, tests and bench use this module.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

STAMP = ".llamaship-make-model.json"
DEFAULT_DIR = Path(__file__).resolve().parent.parent / ".llamaship" / "demo" / "demo-model"
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
# A chat template in the Llama 3 format (header markers, end-of-turn marker, a dated system
# header); the demo tokenizer spells the markers with ordinary tokens.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if messages and messages[0]['role'] == 'system' %}\n"
    "    {%- set system_text = messages[0]['content'] | trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_text = '' %}\n"
    "{%- endif %}\n"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}\n"
    "{{- 'Today Date: ' + strftime_now('%d %b %Y') + '\\n\\n' }}\n"
    "{{- system_text + '<|eot_id|>' }}\n"
    "{%- for message in messages %}\n"
    "    {%- if message['role'] not in ('user', 'assistant') %}\n"
    "        {{- raise_exception('Unknown role: ' + message['role']) }}\n"
    "    {%- endif %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('Roles must alternate user/assistant after an optional system message') }}\n"
    "    {%- endif %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}\n"
    "    {{- message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)


@dataclass(frozen=True)
class DemoModelSpec:
    vocab_size: int = 2048
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    max_position_embeddings: int = 4096
    train_steps: int = 200
    batch_size: int = 12
    seq_len: int = 128
    learning_rate: float = 3e-3
    corpus_bytes: int = 2_000_000
    seed: int = 1234
    version: int = 1

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def corpus_files() -> list[Path]:
    """Python standard-library sources: present on every machine that runs Llamaship."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def read_corpus(limit_bytes: int) -> list[str]:
    texts, total = [], 0
    for path in corpus_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        total += len(text)
        if total >= limit_bytes:
            break
    return texts


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def write_tokenizer_files(tok, out: Path) -> None:
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": BOS,
                "eos_token": EOS,
                "pad_token": PAD,
                "add_bos_token": True,
                "add_eos_token": False,
                "clean_up_tokenization_spaces": False,
                "model_max_length": 4096,
                "chat_template": LLAMA3_CHAT_TEMPLATE,
            },
            indent=2,
        )
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}, indent=2)
    )


def add_chat_template(out: Path) -> None:
    """Give a demo model made before chat templates its template (the weights do not change)."""
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text())
    if "chat_template" not in config:
        config["chat_template"] = LLAMA3_CHAT_TEMPLATE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(config, indent=2))
        tmp.replace(path)


def made_with(stamp: Path, digest: str) -> bool:
    """The checkpoint beside `stamp` was made from a spec with this digest (so it can be reused)."""
    try:
        return json.loads(stamp.read_text()).get("digest") == digest
    except (OSError, ValueError):
        return False


def make_model(
    out_dir: str | Path,
    spec: DemoModelSpec = DemoModelSpec(),
    *,
    force: bool = False,
    progress: Callable[[int, int, float], None] | None = None,
) -> Path:
    """Write (or reuse) the demo checkpoint in `out_dir`; returns the directory."""
    out = Path(out_dir)
    if not force and made_with(out / STAMP, spec.digest()):
        add_chat_template(out)
        return out

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(spec.seed)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)

    texts = read_corpus(spec.corpus_bytes)
    tok = train_tokenizer(texts, spec.vocab_size)
    eos_id = tok.token_to_id(EOS)
    ids: list[int] = []
    for text in texts:
        ids.extend(tok.encode(text, add_special_tokens=False).ids)
        ids.append(eos_id)
    data = torch.tensor(ids, dtype=torch.long)

    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tok.token_to_id(BOS),
        eos_token_id=eos_id,
        pad_token_id=tok.token_to_id(PAD),
        tie_word_embeddings=False,
        rope_theta=10000.0,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.learning_rate, total_steps=spec.train_steps)
    gen = torch.Generator().manual_seed(spec.seed)
    window = spec.seq_len + 1
    loss_value = float("nan")
    for step in range(spec.train_steps):
        starts = torch.randint(0, len(data) - window, (spec.batch_size,), generator=gen)
        batch = torch.stack([data[s : s + window] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_value = float(loss.detach())
        if progress:
            progress(step + 1, spec.train_steps, loss_value)

    tmp = out.with_name(out.name + f".tmp-{int(time.time() * 1000)}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.eval()
    model.save_pretrained(tmp, safe_serialization=True)
    write_tokenizer_files(tok, tmp)
    (tmp / STAMP).write_text(
        json.dumps({"digest": spec.digest(), "spec": asdict(spec), "final_loss": loss_value}, indent=2)
    )
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
