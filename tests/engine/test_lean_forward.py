"""The lean Llama/Qwen2 forward computes what transformers' forward computes."""

from __future__ import annotations

import pytest
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

from service.engine.kv_cache import StaticKVCache, causal_mask
from service.engine.lean_forward import LeanForward, supports

SHAPE = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def _model(kind: str, tie: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**SHAPE, tie_word_embeddings=tie, initializer_range=0.2))
    else:  # Qwen2: q/k/v biases, which we randomise so they matter
        model = Qwen2ForCausalLM(Qwen2Config(**SHAPE, tie_word_embeddings=tie, initializer_range=0.2))
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                torch.nn.init.normal_(param, std=0.5)
    return model.eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("tie", [True, False])
@torch.inference_mode()
def test_prefill_then_ragged_decode_matches_transformers(kind: str, tie: bool) -> None:
    model = _model(kind, tie)
    ids = torch.randint(0, SHAPE["vocab_size"], (3, 16))
    reference = model(ids).logits  # [3, 16, V], full causal forward
    lean = LeanForward(model)
    assert torch.equal(model(ids).logits, reference), "fusing must not change the model"
    cache = StaticKVCache(max_batch=3, max_len=32, device=torch.device("cpu"), dtype=torch.float32)
    cache.allocate(lean.num_layers, lean.num_kv_heads, lean.head_dim)
    keys, values = cache.rows(0, 3)

    def run(tokens: torch.Tensor, starts: list[int]) -> torch.Tensor:
        starts_t = torch.tensor(starts)
        positions = starts_t[:, None] + torch.arange(tokens.shape[1])
        kv_len = max(starts) + tokens.shape[1]
        return lean(tokens, positions, positions, causal_mask(starts_t, tokens.shape[1], kv_len, torch.float32),
                    keys, values)

    # Rows prefill different lengths (ragged), then decode 1 and 3 tokens at a time.
    lengths = [5, 8, 6]
    out = run(torch.stack([torch.cat([ids[r, :lengths[r]], ids[r, :8 - lengths[r]]]) for r in range(3)]),
              [0, 0, 0])
    for r, n in enumerate(lengths):
        torch.testing.assert_close(out[r, :n], reference[r, :n], rtol=1e-5, atol=1e-5)
    for width in (1, 3, 1, 2):
        chunk = torch.stack([ids[r, lengths[r]:lengths[r] + width] for r in range(3)])
        out = run(chunk, lengths)
        for r, n in enumerate(lengths):
            torch.testing.assert_close(out[r], reference[r, n:n + width], rtol=1e-5, atol=1e-5)
        lengths = [n + width for n in lengths]


def test_fused_weights_are_views_not_copies() -> None:
    model = _model("qwen2", tie=True)
    before = sum(p.numel() for p in model.parameters())
    lean = LeanForward(model)
    layer, attn = lean.layers[0], model.model.layers[0].self_attn
    assert attn.q_proj.weight.data_ptr() == layer.qkv_weight.data_ptr()
    assert attn.k_proj.weight.untyped_storage().data_ptr() == layer.qkv_weight.untyped_storage().data_ptr()
    assert model.model.layers[0].mlp.up_proj.weight.untyped_storage().data_ptr() == \
        layer.gate_up_weight.untyped_storage().data_ptr()
    assert sum(p.numel() for p in model.parameters()) == before


def test_other_families_fall_back() -> None:
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    assert not supports(gpt2)
    with pytest.raises(ValueError, match="gpt2"):
        LeanForward(gpt2)
