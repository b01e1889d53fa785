"""Structured output's cost per decoded token: the same greedy requests with and without a
response_format, alternating, on each decode engine, on a stack of real processes with the demo
model. Decode time per token is taken from the first token to the last (prefill excluded).

json_object runs the whole max_tokens on the demo model (it does not close its strings), so it
compares like with like at length; json_schema (bounded fields) ends after its ~30 tokens.

    .venv/bin/python scripts/bench_structured.py [--requests 10] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT = 'admin = {"name": "ada", "age": 36, "role": "admin"}\nuser = '
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "role": {"enum": ["admin", "user", "guest"]}},
          "required": ["name", "age", "role"], "additionalProperties": False}


def decode_ms_per_token(client, max_tokens: int, fmt) -> tuple[float, int]:
    out = client.generate("demo", PROMPT, max_tokens, **({"response_format": fmt} if fmt else {}))
    n = len(out.chunk_times_s)
    # tokens that arrived in one chunk share a time: first to last over the tokens between
    return (out.chunk_times_s[-1] - out.chunk_times_s[0]) * 1000 / max(1, n - 1), n


def main() -> None:
    from llamaship.demo_model import DEFAULT_DIR, make_model
    from shared.proto_gen.llamaship.gateway.v1 import gateway_pb2 as pb
    from tests.engine_switch import start_stack, use_engine

    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    formats = {"text": None,
               "json_object": pb.ResponseFormat(type=pb.ResponseFormat.TYPE_JSON_OBJECT),
               "json_schema": pb.ResponseFormat(type=pb.ResponseFormat.TYPE_JSON_SCHEMA, json_schema=json.dumps(SCHEMA))}
    with tempfile.TemporaryDirectory() as tmp:
        stack, client = start_stack(Path(tmp), make_model(DEFAULT_DIR))
        try:
            for engine in ("genai", "iteration"):
                use_engine(stack, client, engine)
                for fmt in formats.values():  # warm: grammar compile, tokenizer load
                    decode_ms_per_token(client, 8, fmt)
                times: dict[str, list[float]] = {name: [] for name in formats}
                lengths: dict[str, list[int]] = {name: [] for name in formats}
                for _ in range(args.requests):
                    for name, fmt in formats.items():
                        ms, n = decode_ms_per_token(client, args.max_tokens, fmt)
                        times[name].append(ms)
                        lengths[name].append(n)
                base = statistics.median(times["text"])
                for name in formats:
                    med = statistics.median(times[name])
                    print(f"{engine:9s} {name:11s} {med:6.2f} ms/token  ({statistics.median(lengths[name]):.0f} tokens)"
                          f"  {med - base:+6.2f} ms/token ({(med / base - 1) * 100:+5.1f}%)", flush=True)
        finally:
            client.close()
            stack.stop()


if __name__ == "__main__":
    main()
