"""Rotary inverse frequencies equal transformers' for Scout's llama3 scaling, where the high and
low frequency factors are equal (a division by zero that must not leak into the result)."""

import warnings

import numpy as np


def test_scout_llama3_inverse_frequencies_match_transformers():
    import torch
    from transformers import Llama4TextConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from compiler_service.llama4.rope import inverse_frequencies

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0, "low_freq_factor": 1.0,
            "high_freq_factor": 1.0, "original_max_position_embeddings": 8192}
    cfg = Llama4TextConfig(head_dim=128, hidden_size=5120, num_attention_heads=40, rope_parameters=rope)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = inverse_frequencies(rope, 128)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-6, atol=0)
