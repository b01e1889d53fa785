"""Iteration-level batching over ONNX Runtime: the decoder model driven directly, with KV buffers
the engine owns, so sequences join and leave a running batch between any two decode steps.

    kv.py         per-layer KV buffers [max_rows, kv_heads, max_len, head_dim], one slot per row
    model.py      the decoder session: IO binding of a slot range onto the shared KV buffers
    sampler.py    per-row greedy / temperature-top_k-top_p sampling with its own seeded generator
    scheduler.py  the loop: chunked prefill of newcomers, one batched decode step, rows leave at once
"""
