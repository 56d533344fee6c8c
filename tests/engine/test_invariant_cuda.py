"""The engine's default CUDA path, the "invariant" lean forward replayed from captured graphs:
reference logits, and bfloat16 speculative greedy output equal to plain greedy output on
the real SmolLM2 (GPU only)."""

from __future__ import annotations

import pytest
import torch

from service.engine import Engine, EngineConfig, GenerationRequest, Method
from tests.engine.helpers import assert_same_cache, graphed_and_reference_runners, run
from tests.support.float_compare import assert_close_up_to_rounding

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@torch.inference_mode()
def test_invariant_graphs_match_the_reference_variant(tokenizer) -> None:
    target, graphed, reference = graphed_and_reference_runners(tokenizer, "invariant", max_len=160)
    assert graphed.capture_all_graphs() == 3 * 3 * 4  # batch 1, 2, 4 x kv 64, 128, 160 x width 1..4
    gen = torch.Generator().manual_seed(0)
    lengths = [70, 13, 66]  # prompts across the 64-position key chunks
    for runner in (graphed, reference):
        for row, n in enumerate(lengths):
            prompt = torch.randint(
                1, target.vocab_size, (1, n), generator=torch.Generator().manual_seed(row)
            ).cuda()
            runner.forward(row, row + 1, prompt, [0], last_only=True)
    for rows, width in ((3, 1), (3, 4), (1, 2), (2, 3), (3, 1)):
        ids = torch.randint(1, target.vocab_size, (rows, width), generator=gen).cuda()
        got = graphed.forward(0, rows, ids, lengths[:rows]).clone()
        assert_close_up_to_rounding(got, reference.forward(0, rows, ids, lengths[:rows]))
        lengths = [n + width if r < rows else n for r, n in enumerate(lengths)]
    assert_same_cache(graphed, reference, lengths)


@pytest.fixture(scope="module")
def smollm2_bf16_cuda():
    from service.models.loading import load_model
    from service.models.store import cached_path

    if cached_path("smollm2-135m-instruct") is None:
        pytest.skip("SmolLM2 is not in the model cache")
    return load_model("smollm2-135m-instruct", dtype=torch.bfloat16, device="cuda")


PROMPTS = {
    "grounded": "Repeat this text exactly:\nThe quick brown fox jumps over the lazy dog near the river "
    "bank, where the old mill stands. Every morning the miller opens the doors and the fox runs away.",
    "rewrite": "Rewrite this function with a docstring:\ndef area(w, h):\n    return w * h\n\n"
    "def perimeter(w, h):\n    return 2 * (w + h)",
    "chat": "What should I pack for a week of hiking in the mountains in autumn?",
    "story": "Tell me a short story about a lighthouse keeper and a storm.",
}


def test_bfloat16_speculative_equals_plain_on_cuda(smollm2_bf16_cuda) -> None:
    """The invariant kernels make every verify row compute what a plain pass computes, so
    n-gram and draft-model speculation (any k, adaptive draft length) return plain greedy
    output token for token in bfloat16 at batch 1 (the "layer" variant agreed on 63%).
    SmolLM2's passes of more than its gemv limit (16 rows) use the tensor-core linear, which
    rounds otherwise: there the guarantee is only among such passes
    (tests/engine/test_invariant_kernels.py)."""
    tok = smollm2_bf16_cuda.tokenizer

    def ids(text: str) -> tuple[int, ...]:
        chat = tok.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return tuple(tok(chat, add_special_tokens=False)["input_ids"])

    engine = Engine(
        smollm2_bf16_cuda,
        EngineConfig(max_batch_size=1, kv_cache_tokens=512, instance_id="t", adaptive_draft_length=True),
        draft=smollm2_bf16_cuda,
    )
    assert engine.config.lean_variant == "invariant"
    engine.start()
    try:
        setups = [(Method.NONE, 0), (Method.NGRAM, 3), (Method.NGRAM, 8), (Method.DRAFT_MODEL, 4)]
        requests = [
            GenerationRequest(f"{kind}-{m.name}-{k}", ids(text), max_tokens=96, method=m, num_draft_tokens=k)
            for kind, text in PROMPTS.items()
            for m, k in setups
        ]
        alone = {}
        for request in requests:  # batch 1
            alone.update(run(engine, [request]))
        for kind in PROMPTS:
            plain = alone[f"{kind}-NONE-0"].tokens
            assert len(plain) > 10
            for m, k in setups:
                name = f"{kind}-{m.name}-{k}"
                assert alone[name].tokens == plain, name
        assert sum(alone[f"grounded-NGRAM-{k}"].metrics.accepted_drafts for k in (3, 8)) > 0
    finally:
        engine.stop()
