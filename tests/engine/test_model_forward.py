"""The lean Llama/Qwen2 forward computes what transformers' forward computes."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from service.engine.execution.kv_cache import StaticKVCache, causal_mask
from service.engine.execution.model_forward import ModelForward, supports
from tests.support.float_compare import FORWARD_BUDGET, assert_close_up_to_rounding

SHAPE = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


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


def _has_cpp_compiler() -> bool:
    import shutil

    return any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))


needs_cpp = pytest.mark.skipif(not _has_cpp_compiler(), reason="torch.compile on CPU needs a C++ compiler")


@pytest.mark.parametrize("variant", ["around_attention", "layer"])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("tie", [True, False])
@torch.inference_mode()
def test_prefill_then_ragged_decode_matches_transformers(kind: str, tie: bool, variant: str) -> None:
    _check_against_transformers(kind, tie, variant, compile=False)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("tie", [True, False])
@torch.inference_mode()
def test_float32_forward_is_within_half_the_rounding_budget_of_float64(kind: str, tie: bool) -> None:
    """The tolerance above is justified on this machine, not assumed: transformers' own float32
    forward of these models lies within half of FORWARD_BUDGET of the same forward in float64,
    so two float32 paths that each round as well differ by less than the budget."""
    model = _model(kind, tie)
    ids = torch.randint(0, SHAPE["vocab_size"], (3, 16), generator=torch.Generator().manual_seed(0))
    exact = copy.deepcopy(model).double()(ids).logits.float()
    assert_close_up_to_rounding(model(ids).logits, exact, FORWARD_BUDGET // 2, what="float32 against float64")


@needs_cpp
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@torch.inference_mode()
def test_compiled_layer_matches_transformers(kind: str) -> None:
    """The whole-layer variant compiled by inductor (C++ on CPU): the same numbers, and two
    compiled specialisations for the whole run (T == 1 and T >= 2 at B = 3), not one per shape."""
    lean = _check_against_transformers(kind, tie=False, variant="layer", compile=True)
    assert lean.compiled_graphs() == 2


def _check_against_transformers(kind: str, tie: bool, variant: str, compile: bool) -> ModelForward:
    torch.manual_seed(0)
    model = _model(kind, tie)
    ids = torch.randint(0, SHAPE["vocab_size"], (3, 16))
    reference = model(ids).logits  # [3, 16, V], full causal forward
    lean = ModelForward(model, compile=compile, variant=variant)
    assert torch.equal(model(ids).logits, reference), "fusing must not change the model"
    cache = StaticKVCache(max_batch=3, max_len=32, device=torch.device("cpu"), dtype=torch.float32)
    cache.allocate(lean.num_layers, lean.num_kv_heads, lean.head_dim)
    keys, values = cache.rows(0, 3)

    def run(tokens: torch.Tensor, starts: list[int]) -> torch.Tensor:
        starts_t = torch.tensor(starts)
        positions = starts_t[:, None] + torch.arange(tokens.shape[1])
        kv_len = max(starts) + tokens.shape[1]
        return lean(
            tokens,
            positions,
            positions,
            causal_mask(starts_t, tokens.shape[1], kv_len, torch.float32),
            keys,
            values,
        )

    # Rows prefill different lengths (ragged), then decode 1 and 3 tokens at a time.
    lengths = [5, 8, 6]
    out = run(
        torch.stack([torch.cat([ids[r, : lengths[r]], ids[r, : 8 - lengths[r]]]) for r in range(3)]),
        [0, 0, 0],
    )
    for r, n in enumerate(lengths):
        assert_close_up_to_rounding(out[r, :n], reference[r, :n], what=f"prefill row {r}")
    for width in (1, 3, 1, 2):
        chunk = torch.stack([ids[r, lengths[r] : lengths[r] + width] for r in range(3)])
        out = run(chunk, lengths)
        for r, n in enumerate(lengths):
            assert_close_up_to_rounding(out[r], reference[r, n : n + width], what=f"width {width} row {r}")
        lengths = [n + width for n in lengths]
    return lean


def test_fused_weights_are_views_not_copies() -> None:
    model = _model("qwen2", tie=True)
    before = sum(p.numel() for p in model.parameters())
    lean = ModelForward(model)
    layer, attn = lean.layers[0], model.model.layers[0].self_attn
    assert attn.q_proj.weight.data_ptr() == layer.qkv_weight.data_ptr()
    assert attn.k_proj.weight.untyped_storage().data_ptr() == layer.qkv_weight.untyped_storage().data_ptr()
    assert (
        model.model.layers[0].mlp.up_proj.weight.untyped_storage().data_ptr()
        == layer.gate_up_weight.untyped_storage().data_ptr()
    )
    assert sum(p.numel() for p in model.parameters()) == before


def test_other_families_fall_back() -> None:
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    assert not supports(gpt2)
    with pytest.raises(ValueError, match="gpt2"):
        ModelForward(gpt2)


def _lean_pass(
    lean: ModelForward, cache: StaticKVCache, lo: int, tokens: torch.Tensor, starts: list[int], kv_len: int
) -> torch.Tensor:
    """One pass over cache rows [lo, lo + B) as the runner makes it."""
    keys, values = cache.rows(lo, lo + tokens.shape[0])
    starts_t = torch.tensor(starts)
    positions = starts_t[:, None] + torch.arange(tokens.shape[1])
    return lean(
        tokens,
        positions,
        positions,
        causal_mask(starts_t, tokens.shape[1], kv_len, torch.float32),
        keys,
        values,
    )


def _cache(lean: ModelForward) -> StaticKVCache:
    cache = StaticKVCache(max_batch=4, max_len=48, device=torch.device("cpu"), dtype=torch.float32)
    cache.allocate(lean.num_layers, lean.num_kv_heads, lean.head_dim)
    return cache


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=needs_cpp)])
@torch.inference_mode()
def test_layer_variant_writes_the_cache_in_place_like_the_reference_variant(compile: bool) -> None:
    """The "layer" variant writes its keys and values into the cache's own storage (also when
    compiled: inductor mutates the cache tensors passed in), including rows [lo, hi) with lo > 0
    (views at a storage offset) and a single row, and gives the logits of the reference variant."""
    model = _model("qwen2", tie=False)
    reference = ModelForward(model, variant="around_attention")
    lean = ModelForward(model, compile=compile, variant="layer")
    caches = _cache(reference), _cache(lean)
    gen = torch.Generator().manual_seed(1)
    passes = [  # (lo, rows, width, starts): prefill rows 1..3 then row 0, then decode and verify passes
        (1, 3, 6, [0, 0, 0]),
        (0, 1, 5, [0]),
        (0, 4, 1, [5, 6, 6, 6]),
        (2, 1, 1, [7]),
        (1, 2, 3, [7, 8]),
        (0, 1, 2, [6]),
        (0, 4, 4, [8, 10, 8, 6]),
    ]
    for lo, rows, width, starts in passes:
        tokens = torch.randint(0, SHAPE["vocab_size"], (rows, width), generator=gen)
        kv_len = max(starts) + width
        want = _lean_pass(reference, caches[0], lo, tokens, starts, kv_len)
        got = _lean_pass(lean, caches[1], lo, tokens, starts, kv_len)
        assert_close_up_to_rounding(got, want, what=f"logits of pass {lo, rows, width}")
        for layer in range(lean.num_layers):
            assert_close_up_to_rounding(
                caches[1].keys[layer], caches[0].keys[layer], what=f"keys of layer {layer}"
            )
            assert_close_up_to_rounding(
                caches[1].values[layer], caches[0].values[layer], what=f"values of layer {layer}"
            )
    assert caches[1].keys[0].abs().sum() > 0
    if compile:
        # One specialisation per (B == 1 or not, T == 1 or not) met, and per rows' storage
        # offset 0 or not where torch specialises an offset of 0 (2.13 does, 2.11 does not):
        # (3, 6, lo 1), (1, 5, lo 0), (4, 1, lo 0), (1, 1, lo 2), (4, 4, lo 0). The other
        # passes, and every kv length, reuse them.
        assert lean.compiled_graphs() in (4, 5)


def test_unknown_variant_is_refused() -> None:
    with pytest.raises(ValueError, match="variant"):
        ModelForward(_model("llama", tie=True), variant="stack")


def test_engine_config_knows_the_variants() -> None:
    from service.engine.config import EngineConfig
    from service.engine.execution.model_forward import VARIANTS

    for variant in VARIANTS:
        EngineConfig(lean_variant=variant).validate()
    with pytest.raises(ValueError, match="lean_variant"):
        EngineConfig(lean_variant="whole").validate()


@torch.inference_mode()
def test_runner_keeps_around_attention_off_cuda() -> None:
    """On CPU the runner runs "around_attention" eagerly whatever lean_variant says: the
    "layer" variant only pays compiled and the invariant kernels are Triton (CUDA). The
    variants themselves are tested eagerly above and on CUDA in test_lean_layer_cuda.py and
    test_invariant_cuda.py."""
    from service.engine.execution.runner import ModelRunner
    from service.models.loading import LoadedModel

    loaded = LoadedModel("tiny", _model("llama", tie=False), None, torch.device("cpu"), torch.float32)
    runners = [
        ModelRunner(loaded, max_batch=2, max_len=32, max_width=3, lean_variant=variant)
        for variant in ("around_attention", "layer", "invariant")
    ]
    assert [r.lean.variant for r in runners] == ["around_attention"] * 3
    assert not any(r.lean.compiled for r in runners) and all(r.graphs is None for r in runners)
