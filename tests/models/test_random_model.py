"""bench.random_model: the realistic-size benchmark models, written at a tiny shape by the same
code path, then loaded by transformers and by the service's loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench.random_model import SHAPES, llama_config, parameter_shapes, smollm2_tokenizer, write_random_model

pytestmark = pytest.mark.slow  # reads SmolLM2's tokenizer from the real GGUF file


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def written(tmp_path_factory, tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("random-models")
    # A shard limit below the tiny target's 25 MB: the sharded layout (index file) is exercised.
    return {
        "tiny": write_random_model(root / "tiny", "tiny", tokenizer, seed=1, max_shard_size="10MB"),
        "tiny-draft": write_random_model(root / "tiny-draft", "tiny-draft", tokenizer, seed=1),
    }


def test_real_shapes_have_the_published_dimensions(tokenizer):
    big = parameter_shapes(llama_config("llama-3.1-8b", tokenizer))
    assert len(tokenizer) == 49152
    assert big["model.embed_tokens.weight"] == (49152, 4096)
    assert big["lm_head.weight"] == (49152, 4096)
    assert big["model.layers.31.self_attn.k_proj.weight"] == (1024, 4096)  # 8 KV heads of 128
    assert big["model.layers.31.mlp.down_proj.weight"] == (4096, 14336)
    assert "model.layers.32.mlp.up_proj.weight" not in big
    per_layer = 2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 4096 * 14336 + 2 * 4096  # attention, MLP, norms
    assert sum(s.numel() for s in big.values()) == 2 * 49152 * 4096 + 32 * per_layer + 4096  # 7.38 B
    small = parameter_shapes(llama_config("llama-3.2-1b", tokenizer))
    assert "lm_head.weight" not in small  # tied: stored once
    assert small["model.layers.15.self_attn.v_proj.weight"] == (512, 2048)  # 8 KV heads of 64
    assert small["model.layers.15.mlp.gate_proj.weight"] == (8192, 2048)
    per_layer = 2 * 2048 * 2048 + 2 * 512 * 2048 + 3 * 2048 * 8192 + 2 * 2048
    assert sum(s.numel() for s in small.values()) == 49152 * 2048 + 16 * per_layer + 2048  # 1.07 B
    config = llama_config("llama-3.1-8b", tokenizer)
    rope = getattr(config, "rope_parameters", None) or {
        "rope_theta": config.rope_theta,
        **config.rope_scaling,
    }
    assert rope["rope_theta"] == 500000.0 and rope["rope_type"] == "llama3"
    assert config.max_position_embeddings >= 8192


def test_writes_sharded_bf16_safetensors_with_the_tokenizer(written, tokenizer):
    d = written["tiny"]
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((d / s).is_file() for s in shards)
    from safetensors import safe_open

    total = 0
    seen = {}
    for shard in shards:
        with safe_open(str(d / shard), framework="pt") as f:
            for name in f.keys():
                seen[name] = f.get_tensor(name)
                total += seen[name].numel() * 2
    assert total == index["metadata"]["total_size"]
    expected = parameter_shapes(llama_config("tiny", tokenizer))
    assert {n: t.shape for n, t in seen.items()} == expected
    assert all(t.dtype == torch.bfloat16 for t in seen.values())
    assert torch.equal(
        seen["model.norm.weight"], torch.ones(SHAPES["tiny"]["hidden_size"], dtype=torch.bfloat16)
    )
    q = seen["model.layers.0.self_attn.q_proj.weight"].float()
    assert abs(q.std().item() - 0.02) < 0.002 and abs(q.mean().item()) < 0.002
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"):
        assert (d / name).is_file(), name
    assert not (written["tiny-draft"] / "model.safetensors.index.json").exists()  # one file: no index
    assert (written["tiny-draft"] / "model.safetensors").is_file()


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, tokenizer, written):
    from safetensors.torch import load_file

    again = write_random_model(tmp_path / "again", "tiny-draft", tokenizer, seed=1)
    other = write_random_model(tmp_path / "other", "tiny-draft", tokenizer, seed=2)
    a = load_file(written["tiny-draft"] / "model.safetensors")
    assert all(torch.equal(a[n], t) for n, t in load_file(again / "model.safetensors").items())
    assert not torch.equal(
        a["model.embed_tokens.weight"], load_file(other / "model.safetensors")["model.embed_tokens.weight"]
    )


def test_transformers_loads_it_and_its_logits_are_finite(written):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = written["tiny"]
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(d)
    assert model.dtype == torch.bfloat16 and model.config.num_hidden_layers == 2
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Hello there"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    assert tok.decode(ids[0]).startswith("<|im_start|>")  # SmolLM2's chat template
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape[-1] == 49152 and torch.isfinite(logits).all()
    tied = AutoModelForCausalLM.from_pretrained(written["tiny-draft"], dtype=torch.bfloat16)
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()


def test_the_service_loader_takes_the_pair_as_target_and_draft(written):
    from service.models.loading import check_same_vocabulary, load_model

    target = load_model(str(written["tiny"]), dtype="float32", device="cpu")
    draft = load_model(str(written["tiny-draft"]), dtype="float32", device="cpu")
    check_same_vocabulary(target, draft)  # raises if the pair could not serve together
    assert target.tokenizer.eos_token == "<|im_end|>"  # the GGUF's own, not transformers' guess
    assert target.tokenizer.eos_token_id == target.model.config.eos_token_id
