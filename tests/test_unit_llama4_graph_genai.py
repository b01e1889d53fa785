"""onnxruntime-genai 0.18 runs a Llama 4 build as it runs our Llama builds (type `llama`,
shared KV buffer) and decodes transformers' greedy tokens, alone and in a right-padded batch."""

from __future__ import annotations

import json

import numpy as np
import pytest

from compiler_service.llama4.build import build_llama4
from compiler_service.llama4.linear import PRECISIONS
from tests.llama4_parity import fake_quantize_model, make_checkpoint

NEW_TOKENS = 12


def _greedy_reference(model, prompt: list[int]) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return [int(t) for t in out[0, len(prompt):]]


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_genai_greedy_matches_transformers(tmp_path, demo_model, precision):
    import onnxruntime_genai as og

    ckpt, build = tmp_path / "ckpt", tmp_path / "build"
    model = make_checkpoint(ckpt, demo_model, seed=3, interleave_moe_layer_step=2)
    build_llama4(ckpt, build, precision=precision, pool="cpu", context_length=96)
    fake_quantize_model(model, PRECISIONS[precision].bits)  # the reference runs the build's rounded weights
    config = json.loads((build / "genai_config.json").read_text())
    assert config["model"]["type"] == "llama" and config["model"]["eos_token_id"] == [2, 3]
    rng = np.random.default_rng(3)
    prompts = [[1] + [int(t) for t in rng.integers(4, 2048, n - 1)] for n in (30, 11)]
    expected = [_greedy_reference(model, p) for p in prompts]

    og_model = og.Model(str(build))
    for prompt, want in zip(prompts, expected):  # one at a time
        params = og.GeneratorParams(og_model)
        params.set_search_options(max_length=len(prompt) + NEW_TOKENS, do_sample=False)
        gen = og.Generator(og_model, params)
        gen.append_tokens(prompt)
        while not gen.is_done():
            gen.generate_next_token()
        assert list(gen.get_sequence(0))[len(prompt):] == want

    width = max(len(p) for p in prompts)  # a batch, right-padded with the pad id as serving pads it
    params = og.GeneratorParams(og_model)
    params.set_search_options(max_length=width + NEW_TOKENS, do_sample=False, batch_size=len(prompts))
    gen = og.Generator(og_model, params)
    gen.append_tokens(np.asarray([p + [0] * (width - len(p)) for p in prompts], dtype=np.int32))
    got: list[list[int]] = [[] for _ in prompts]
    for _ in range(NEW_TOKENS):
        gen.generate_next_token()
        for row, token in zip(got, gen.get_next_tokens()):
            row.append(int(token))
    assert got == expected
