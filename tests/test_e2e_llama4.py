"""Llama 4 end to end through real processes: a tiny random Llama 4 checkpoint compiles (fp32,
its own graph builder), is published and served, and streams exactly transformers' greedy tokens,
alone and batched; a Llama4ForConditionalGeneration checkpoint compiles its text tower; a
malformed one fails with a clear message, publishes nothing and leaves the services up."""

from __future__ import annotations

import asyncio
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from shared.proto_gen.llamaship.compiler.v1 import compiler_pb2

pytestmark = pytest.mark.integration

# MoE on layers 0, 1 and 3 (2 is dense); layer 3 NoPE; QK norm; a chunk and a temperature floor
# far below the test sequences, so every feature acts on them; published-config quirks.
CONFIG = dict(num_hidden_layers=4, moe_layers=(0, 1, 3), num_experts=4, top_k=1, use_qk_norm=True,
              attention_chunk_size=16, floor_scale=8, attn_scale=0.5, attn_temperature_tuning=4)
PROMPTS = ["def main(argv):\n    ",
           "class LRUCache:\n    def __init__(self, capacity):\n        self.capacity = capacity\n",
           "import os\nimport sys\n\n\ndef main():\n    for name in sorted(os.listdir(sys.argv[1])):\n"
           "        if name.endswith('.py'):\n            print(name)\n"]
NEW_TOKENS = 40
CONTEXT = 512


@pytest.fixture(scope="module")
def llama4_checkpoints(tmp_path_factory) -> dict[str, Path]:
    from llamaship.llama4_model import make_llama4

    base = tmp_path_factory.mktemp("llama4-e2e")
    return {"causal": make_llama4(base / "causal", **CONFIG),
            "conditional": make_llama4(base / "conditional", conditional=True, seed=3, **CONFIG)}


def _reference(checkpoint: Path):
    """transformers' greedy generate on the checkpoint's text model."""
    import torch

    from compiler_service.torch_reference import load_llama4_text, load_tokenizer

    tok, model = load_tokenizer(checkpoint), load_llama4_text(checkpoint)

    def run(prompt: str, max_new_tokens: int) -> tuple[list[int], list[int]]:
        ids = tok(prompt)["input_ids"]
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)[0].tolist()
        return ids, out[len(ids):]

    return run


@pytest.fixture(scope="module")
def llama4_build(client, llama4_checkpoints) -> str:
    stages: list[tuple[str, str]] = []
    job = client.compile(str(llama4_checkpoints["causal"]), "tiny-llama4", "fp32", max_sequence_length=CONTEXT,
                         on_update=lambda j: stages.append((j.stage, j.message)))
    assert job.state == compiler_pb2.JOB_STATE_SUCCEEDED, job.message
    assert any(stage == "build" and "Llama 4 graph builder" in message for stage, message in stages)
    return job.build_id


def test_llama4_build_is_verified_gated_and_keeps_the_requested_context(client, llama4_build):
    info = client.build(llama4_build)
    manifest = json.loads(info.manifest_json)
    assert manifest["architecture"] == "Llama4ForCausalLM"
    assert info.context_length == CONTEXT  # not the config's 10,485,760 positions
    assert info.quality.passed and info.quality.top1_agreement == 1.0 and info.quality.mean_kl < 1e-6
    details = manifest["recipe_details"]
    assert details["builder"].startswith("llama4-") and details["llama4"]["moe_layers"] == [0, 1, 3]
    ops = details["graph"]["ops"]
    assert ops["GroupQueryAttention"] == 4 and ops["MoE"] == 3
    assert 50 << 20 < details["compile_peak_rss_bytes"] < 16 << 30  # the compile's processes, sampled


def test_llama4_recompile_reuses_the_build(client, llama4_build, llama4_checkpoints):
    job = client.compile(str(llama4_checkpoints["causal"]), "tiny-llama4", "fp32", max_sequence_length=CONTEXT)
    assert job.state == compiler_pb2.JOB_STATE_SUCCEEDED, job.message
    assert job.reused and job.build_id == llama4_build


def test_llama4_greedy_stream_equals_transformers(client, llama4_build, llama4_checkpoints):
    reference = _reference(llama4_checkpoints["causal"])
    for prompt in PROMPTS:
        prompt_ids, ref_ids = reference(prompt, NEW_TOKENS)
        out = client.generate("tiny-llama4", prompt, NEW_TOKENS)
        assert out.build_id == llama4_build
        assert out.prompt_tokens == len(prompt_ids)  # BOS as the tokenizer adds it
        assert out.token_ids == ref_ids[: len(out.token_ids)] and out.finish_reason in ("length", "eos")
        assert len(out.token_ids) == len(ref_ids) or out.finish_reason == "eos"


def test_llama4_concurrent_streams_through_the_gateway_are_exact(client, llama4_build, llama4_checkpoints):
    reference = _reference(llama4_checkpoints["causal"])
    prompts = [p for p in PROMPTS for _ in range(2)]
    expected = [reference(p, NEW_TOKENS)[1] for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        outs = list(pool.map(lambda p: client.generate("tiny-llama4", p, NEW_TOKENS), prompts))
    for out, ref in zip(outs, expected):
        assert out.token_ids == ref[: len(out.token_ids)]
        assert len(out.token_ids) == len(ref) or out.finish_reason == "eos"


def test_llama4_prompts_of_different_lengths_decode_in_one_cohort_exactly(stack, llama4_build, llama4_checkpoints):
    """Right-padded rows of different lengths in one static batch: every row's positions, chunk
    mask and temperature are its own."""
    from serving_service.engine import Engine
    from shared.generation import GenRequest
    from shared.store import BuildStore

    reference = _reference(llama4_checkpoints["causal"])
    expected = [reference(p, NEW_TOKENS)[1] for p in PROMPTS]

    async def collect(engine, rid, prompt):
        return [t async for c in engine.stream(GenRequest(rid, "m", prompt, NEW_TOKENS)) for t in c.token_ids]

    async def run():
        engine = Engine(BuildStore(stack.cfg.store), "cpu", slots=8)
        try:
            await engine.load("m", llama4_build)
            together = await asyncio.gather(*(collect(engine, f"r{i}", p) for i, p in enumerate(PROMPTS)))
            return together, max(engine.builds["m"].worker.step_rows)
        finally:
            engine.close()

    together, widest = asyncio.run(run())
    assert widest >= 2, f"the prompts did not share a cohort (widest step: {widest} rows)"
    for got, ref in zip(together, expected):
        assert got == ref[: len(got)] and len(got) >= 8


MORE_CONFIGS = {
    # MoE on every layer, NoPE every 2nd layer, no QK norm, top-2 routing
    "every-layer-top2": dict(num_hidden_layers=4, no_rope_layers=(1, 0, 1, 0), use_qk_norm=False, top_k=2,
                             attention_chunk_size=12, floor_scale=5, attn_temperature_tuning=True),
    # MoE on alternate layers (interleave step 2), Scout's NoPE pattern, QK norm
    "alternate": dict(num_hidden_layers=4, interleave_moe_layer_step=2, attention_chunk_size=20, floor_scale=16),
    # no chunked attention (every layer full), no temperature tuning
    "unchunked": dict(num_hidden_layers=3, moe_layers=(1,), attention_chunk_size=None, attn_temperature_tuning=False),
    # bfloat16 weights in several shards, as published checkpoints come
    "bf16-sharded": dict(num_hidden_layers=2, dtype="bfloat16", streamed=True, max_shard_size="300KB",
                         attention_chunk_size=16, floor_scale=8),
}


@pytest.mark.parametrize("name", list(MORE_CONFIGS))
def test_llama4_configs_stream_transformers_greedy_tokens(client, tmp_path, name):
    from llamaship.llama4_model import make_llama4

    checkpoint = make_llama4(tmp_path / name, seed=7, **MORE_CONFIGS[name])
    job = client.compile(str(checkpoint), f"llama4-{name}", "fp32", max_sequence_length=256)
    assert job.state == compiler_pb2.JOB_STATE_SUCCEEDED, job.message
    assert client.build(job.build_id).quality.top1_agreement == 1.0
    reference = _reference(checkpoint)
    for prompt in PROMPTS[:2]:
        ref_ids = reference(prompt, NEW_TOKENS)[1]
        out = client.generate(f"llama4-{name}", prompt, NEW_TOKENS)
        assert out.token_ids == ref_ids[: len(out.token_ids)] and len(out.token_ids) >= 8, name


def test_conditional_checkpoint_compiles_its_text_tower(client, llama4_checkpoints):
    job = client.compile(str(llama4_checkpoints["conditional"]), "tiny-llama4-mm", "fp32", max_sequence_length=256)
    assert job.state == compiler_pb2.JOB_STATE_SUCCEEDED, job.message
    manifest = json.loads(client.build(job.build_id).manifest_json)
    assert manifest["architecture"] == "Llama4ForConditionalGeneration"
    prompt_ids, ref_ids = _reference(llama4_checkpoints["conditional"])(PROMPTS[1], NEW_TOKENS)
    out = client.generate("tiny-llama4-mm", PROMPTS[1], NEW_TOKENS)
    assert out.token_ids == ref_ids[: len(out.token_ids)] and len(out.token_ids) >= 8


@pytest.mark.parametrize("recipe", ["int8", "hybrid-int4"])
def test_quantized_llama4_builds_pass_the_routed_gate_and_serve(client, llama4_checkpoints, recipe):
    name = f"tiny-llama4-{recipe}"
    job = client.compile(str(llama4_checkpoints["causal"]), name, recipe, max_sequence_length=CONTEXT)
    assert job.state == compiler_pb2.JOB_STATE_SUCCEEDED, job.message
    info = client.build(job.build_id)
    q = info.quality
    assert q.passed and q.min_top1_agreement < 0.95 and q.top1_agreement >= q.min_top1_agreement, q  # routed defaults
    manifest = json.loads(info.manifest_json)
    assert manifest["recipe_details"]["graph"]["ops"].get("QMoE") == 3  # the experts at 4 or 8 bits
    flips = manifest["quality"]["extra"]["router_flips"]  # how often a token's expert changed
    assert set(flips["per_layer"]) == {"0", "1", "3"} and 0 <= flips["rate"] < 0.1, flips
    assert client.generate(name, PROMPTS[0], 16).completion_tokens == 16


def test_llama4_auto_measures_its_groups_and_passes_the_gate(client, llama4_checkpoints):
    job = client.compile(str(llama4_checkpoints["causal"]), "tiny-llama4-auto", "auto", max_sequence_length=CONTEXT)
    assert job.state == compiler_pb2.JOB_STATE_SUCCEEDED, job.message
    info = client.build(job.build_id)
    details = json.loads(info.manifest_json)["recipe_details"]
    auto = details["auto"]
    assert set(auto["sensitivity"]) == {f"{g}={w}" for g in ("attn", "shared_expert", "lm_head", "mlp")
                                        for w in ("int8", "int4")} | {"experts=int4"}  # 8-bit experts: slow
    assert auto["chosen"]["experts"] in ("float", "int4")
    built = dict(item.split("=") for item in details["builder_precision"].removeprefix("groups:").split(","))
    assert built == auto["chosen"] and set(built) == {"attn", "mlp", "shared_expert", "experts", "lm_head"}
    assert info.quality.passed, info.quality
    assert client.generate("tiny-llama4-auto", PROMPTS[0], 8).completion_tokens == 8


def test_llama4_recipes_its_builder_does_not_make_are_refused(client, llama4_checkpoints):
    job = client.compile(str(llama4_checkpoints["causal"]), "tiny-llama4-h8", "hybrid-int8")
    assert job.state == compiler_pb2.JOB_STATE_FAILED
    assert "recipe hybrid-int8 on pool cpu is not supported for Llama 4 checkpoints yet; supported: fp32" in job.message
    job = client.compile(str(llama4_checkpoints["causal"]), "tiny-llama4-h8-cuda", "hybrid-int8", pool="cuda")
    assert job.state == compiler_pb2.JOB_STATE_FAILED
    assert "recipe hybrid-int8 on pool cuda is not supported for Llama 4" in job.message
    assert "fp16, int8, int4, hybrid-int4 on cuda" in job.message


def test_llama4_compiles_for_the_cuda_pool_without_a_gpu(client, llama4_checkpoints):
    """A float16 build for the cuda pool: the compiler without a GPU checks its graph, loads and
    decodes it on the CPU, publishes it to the cuda pool and says its gate waits for a GPU."""
    job = client.compile(str(llama4_checkpoints["causal"]), "tiny-llama4-cuda", "fp16", pool="cuda",
                         max_sequence_length=CONTEXT, wait_served=False)  # no cuda replica here
    assert job.state == compiler_pb2.JOB_STATE_SUCCEEDED, job.message
    info = client.build(job.build_id)
    manifest = json.loads(info.manifest_json)
    assert manifest["target_pool"] == "cuda" and manifest["execution_provider"] == "cuda"
    report = manifest["recipe_details"]["llama4"]
    assert report["compute_type"] == "float16" and report["features"]["weights.experts"] == "MoE float16"
    assert "no GPU" in info.quality.skipped_reason


def test_malformed_llama4_checkpoint_fails_clearly_and_publishes_nothing(client, stack, llama4_build,
                                                                         llama4_checkpoints, tmp_path):
    from safetensors.numpy import load_file, save_file

    broken = Path(shutil.copytree(llama4_checkpoints["causal"], tmp_path / "broken"))
    tensors = load_file(str(broken / "model.safetensors"))
    tensors["model.layers.1.feed_forward.experts.gate_up_proj"] = tensors[
        "model.layers.1.feed_forward.experts.gate_up_proj"][:, :, :64]
    del tensors["model.layers.3.feed_forward.experts.down_proj"]
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    builds_before = sorted(p.name for p in (stack.cfg.store / "builds").iterdir())

    job = client.compile(str(broken), "broken-llama4", "fp32")
    assert job.state == compiler_pb2.JOB_STATE_FAILED
    assert ("model.layers.1.feed_forward.experts.gate_up_proj is [4, 64, 64], the config implies [4, 64, 128]"
            in job.message), job.message
    assert "broken-llama4" not in {m.name for m in client.models()}
    assert sorted(p.name for p in (stack.cfg.store / "builds").iterdir()) == builds_before
    assert client.generate("tiny-llama4", PROMPTS[0], 4).completion_tokens == 4  # the services are up


def test_cancelling_a_llama4_compile_stops_it_and_publishes_nothing(client, stack, llama4_checkpoints):
    builds_before = sorted(p.name for p in (stack.cfg.store / "builds").iterdir())
    job = client.submit_compile(str(llama4_checkpoints["conditional"]), "tiny-llama4-cancelled", "auto")
    for current in client.watch_compile(job.job_id):
        if current.stage == "auto" and "sensitivity" in current.message:  # trial builds of the Llama 4 builder
            break
    client.cancel_compile(job.job_id)
    final = None
    for final in client.watch_compile(job.job_id):
        pass
    assert final.state == compiler_pb2.JOB_STATE_CANCELLED, final.message
    assert "tiny-llama4-cancelled" not in {m.name for m in client.models()}
    assert sorted(p.name for p in (stack.cfg.store / "builds").iterdir()) == builds_before
    assert not list((stack.cfg.store / ".staging").iterdir())
