"""Chat messages over gRPC, end to end on both decode engines: the replica renders them with the
build's chat template exactly as transformers does, so Generate with messages gives transformers'
greedy tokens for apply_chat_template's ids, and the same tokens as Generate with the rendered text."""

from __future__ import annotations

import json
import shutil

import grpc
import pytest

from shared.proto_gen.llamaship.gateway.v1 import gateway_pb2 as pb
from tests.engine_switch import start_stack, use_engine

pytestmark = pytest.mark.integration
MESSAGES = [{"role": "system", "content": "You write Python."},
            {"role": "user", "content": "Parse the arguments."},
            {"role": "assistant", "content": "def main(argv):"},
            {"role": "user", "content": "Now open the file."}]


def _pb(messages):
    return [pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages]


@pytest.fixture(scope="module")
def chat_stack(tmp_path_factory, demo_model):
    base = tmp_path_factory.mktemp("chat")
    stack, client = start_stack(base, demo_model)
    # a checkpoint without a chat template: its build serves prompts only
    bare = base / "bare"
    shutil.copytree(demo_model, bare)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    assert client.compile(str(bare), "bare", "fp32").build_id
    # a tiny random Llama 4 checkpoint: its Llama 4 style template goes through the same path
    from llamaship.llama4_model import make_llama4

    llama4 = make_llama4(base / "llama4")
    assert client.compile(str(llama4), "l4", "fp32", max_sequence_length=512).build_id
    yield stack, client, llama4
    client.close()
    stack.stop()


@pytest.fixture(scope="module", params=["genai", "iteration"])
def client(request, chat_stack):
    stack, client, _ = chat_stack
    use_engine(stack, client, request.param)
    return client


@pytest.fixture(scope="module")
def reference(demo_model):
    """transformers: the rendered chat, its ids, and greedy generation from them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model)
    model = AutoModelForCausalLM.from_pretrained(demo_model)
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = list(tok.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True, return_dict=False))
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0].tolist()
    return text, ids, out[len(ids):], tok.bos_token


def test_messages_give_transformers_greedy_tokens(client, reference):
    text, ids, new, bos = reference
    out = client.generate("demo", "", 24, messages=_pb(MESSAGES))
    assert out.prompt_tokens == len(ids)  # the template's BOS, and no second one
    assert out.token_ids == new
    # the same request as a prompt: the rendered text without its BOS text (a prompt gets BOS added)
    assert text.startswith(bos)
    as_prompt = client.generate("demo", text[len(bos):], 24)
    assert as_prompt.token_ids == out.token_ids and as_prompt.prompt_tokens == out.prompt_tokens


def test_template_refusal_is_invalid_argument(client):
    with pytest.raises(grpc.RpcError) as err:
        client.generate("demo", "", 4, messages=_pb([{"role": "robot", "content": "hi"}]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Unknown role: robot" in err.value.details()


def test_too_long_counts_the_rendered_prompt(client, demo_model):
    """Contents that fit the context as a prompt, but not once the template wraps them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model)
    content = "x " * 4000
    chat = [{"role": "user", "content": content}]
    assert len(tok(content)["input_ids"]) < 4096 <= \
        len(tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=False))
    with pytest.raises(grpc.RpcError) as err:
        client.generate("demo", "", 1, messages=_pb(chat))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "rendered with the chat template" in err.value.details()
    assert client.generate("demo", content, 1).completion_tokens == 1


def test_build_without_template_is_failed_precondition(client):
    with pytest.raises(grpc.RpcError) as err:
        client.generate("bare", "", 4, messages=_pb(MESSAGES))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no chat template" in err.value.details()
    assert client.generate("bare", "def f():", 4).completion_tokens == 4


def test_prompt_and_messages_together_are_refused(client):
    with pytest.raises(grpc.RpcError) as err:
        client.generate("demo", "x", 4, messages=_pb(MESSAGES))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt, messages" in err.value.details()


def test_llama4_build_renders_its_llama4_template(client, chat_stack):
    from compiler_service.torch_reference import load_tokenizer

    tok = load_tokenizer(chat_stack[2])  # a Llama 4 config.json's quirks need the project's loader
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = tok.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert text.endswith("<|header_start|>assistant<|header_end|>\n\n")
    out = client.generate("l4", "", 12, messages=_pb(MESSAGES))
    assert out.prompt_tokens == len(ids)
    as_prompt = client.generate("l4", text[len(tok.bos_token):], 12)
    assert as_prompt.token_ids == out.token_ids and as_prompt.prompt_tokens == out.prompt_tokens
