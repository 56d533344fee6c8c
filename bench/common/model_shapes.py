"""The architecture of the real models the benchmarks stand in for, as their published
configs give it (transformers LlamaConfig fields): what decides the cost of a pass. Each
tool adds what it needs besides (vocabulary, context length, rope scaling)."""

from __future__ import annotations

from typing import Any

LLAMA_3_1_8B: dict[str, Any] = dict(
    num_hidden_layers=32,
    hidden_size=4096,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=14336,
    rope_theta=500000.0,
    tie_word_embeddings=False,
)
LLAMA_3_2_1B: dict[str, Any] = dict(
    num_hidden_layers=16,
    hidden_size=2048,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=8192,
    rope_theta=500000.0,
    tie_word_embeddings=True,
)
SMOLLM2_135M: dict[str, Any] = dict(
    num_hidden_layers=30,
    hidden_size=576,
    num_attention_heads=9,
    num_key_value_heads=3,
    intermediate_size=1536,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)
