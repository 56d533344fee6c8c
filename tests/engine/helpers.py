"""Shared test helpers: tiny models, running requests to completion, the metrics invariants."""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from service.engine import Engine, FinalResult, FinishReason, GenerationRequest, TokenChunk
from service.models.loading import LoadedModel
from specdec.v1 import metrics_pb2
from testkit.tiny_model import make_model, make_tokenizer  # noqa: F401 (re-export)
from tests.support.float_compare import assert_close_up_to_rounding
from tests.support.metrics_invariants import assert_metrics_invariants  # noqa: F401 (re-export)


def perturbed(base: LoadedModel, seed: int, scale: float, name: str) -> LoadedModel:
    """A copy of `base` with Gaussian noise on every weight: a draft that agrees sometimes."""
    model = LlamaForCausalLM(base.model.config).eval()
    model.load_state_dict(base.model.state_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.std())
    return LoadedModel(name=name, model=model, tokenizer=base.tokenizer, device=base.device, dtype=base.dtype)


def assert_same_cache(got, want, lengths: list[int]) -> None:
    """The first lengths[row] cached keys and values of every layer and row of two
    ModelRunners agree up to rounding."""
    for i in range(got.lean.num_layers):
        for row, n in enumerate(lengths):
            assert_close_up_to_rounding(got.cache.keys[i][row, :, :n], want.cache.keys[i][row, :, :n])
            assert_close_up_to_rounding(got.cache.values[i][row, :, :n], want.cache.values[i][row, :, :n])


# The dense prefill's CUDA tests (test_dense_prefill_cuda.py, test_prefill_graphs_cuda.py): a
# small Llama of head dim 32 over 160 cache positions, so attention spans several of the
# invariant kernels' key chunks. Their bound: a bfloat16 path's largest logit error against
# the float32 forward of the same weights is at most DENSE_ERROR_FACTOR times the reference
# path's (both round at the same points and differ in summation order only).
DENSE_SHAPE = {
    "vocab_size": 300,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}
DENSE_MAX_LEN = 160
DENSE_ERROR_FACTOR = 3.0


def bf16_and_float32(shape: dict = DENSE_SHAPE) -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """A random bfloat16 Llama of `shape` on CUDA, and the same (bf16-rounded) weights in
    float32 arithmetic: the reference (GPU tests only)."""
    torch.manual_seed(0)
    bf16 = LlamaForCausalLM(LlamaConfig(**shape, initializer_range=0.2)).eval().to("cuda", torch.bfloat16)
    return bf16, copy.deepcopy(bf16).float()


def max_abs_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.float() - want).abs().max().item()


def to_cuda(m: LoadedModel) -> LoadedModel:
    """`m` moved to the GPU (GPU tests only)."""
    return LoadedModel(m.name, m.model.to("cuda"), m.tokenizer, torch.device("cuda"), m.dtype)


def graphed_and_reference_runners(tokenizer, lean_variant: str, max_len: int):
    """A random CUDA model, a runner of `lean_variant` replayed from captured graphs, and the
    eager, uncompiled reference runner on the same weights (GPU tests only)."""
    from service.engine.execution.runner import ModelRunner

    target = to_cuda(make_model(tokenizer, seed=0, name="g", vocab_size=len(tokenizer)))
    graphed = ModelRunner(target, max_batch=4, max_len=max_len, max_width=4, lean_variant=lean_variant)
    reference = ModelRunner(
        target, max_batch=4, max_len=max_len, max_width=4, use_graphs=False, use_compile=False
    )
    assert graphed.graphs is not None and graphed.lean.variant == lean_variant
    return target, graphed, reference


@dataclass
class Outcome:
    request_id: str
    chunks: list[TokenChunk] = field(default_factory=list)
    final: FinalResult | None = None
    done: threading.Event = field(default_factory=threading.Event)
    errors: list[str] = field(default_factory=list)

    def on_event(self, event: object) -> None:
        if self.final is not None:
            self.errors.append(f"event after FinalResult: {event!r}")
        if isinstance(event, TokenChunk):
            self.chunks.append(event)
        elif isinstance(event, FinalResult):
            self.final = event
            self.done.set()
        else:
            self.errors.append(f"unexpected event {event!r}")

    @property
    def tokens(self) -> list[int]:
        return [t for c in self.chunks for t in c.token_ids]

    @property
    def streamed_drafts(self) -> int:
        """Delivered tokens marked as accepted drafts."""
        return sum(c.draft_mask.bit_count() for c in self.chunks)

    @property
    def cut_drafts(self) -> int:
        return sum(c.cut_drafts for c in self.chunks)

    @property
    def text(self) -> str:
        return "".join(c.text for c in self.chunks)

    @property
    def metrics(self) -> metrics_pb2.SpeculativeMetrics:
        assert self.final is not None
        return self.final.metrics


def submit(engine: Engine, request: GenerationRequest) -> tuple[Outcome, object]:
    out = Outcome(request.request_id)
    return out, engine.submit(request, out.on_event)


def wait_checked(out: Outcome, timeout: float = 300.0) -> Outcome:
    """Waits for the FinalResult and checks the event stream and the metrics invariants."""
    assert out.done.wait(timeout), f"{out.request_id} did not finish"
    assert not out.errors, out.errors
    final = out.final
    assert final is not None and final.request_id == out.request_id
    assert all(c.request_id == out.request_id for c in out.chunks)
    assert final.completion_tokens == len(out.tokens) == final.metrics.completion_tokens
    assert final.prompt_tokens == final.metrics.prompt_tokens
    assert final.metrics.request_id == out.request_id
    assert (final.error is not None) == (final.finish_reason is FinishReason.ERROR)
    assert_metrics_invariants(final.metrics)
    assert final.metrics.end_time.seconds > 0  # the engine stamps the wall-clock end
    # Provenance: every accepted draft is either a delivered token marked as one, or cut.
    assert all(c.draft_mask >= 0 and c.draft_mask >> len(c.token_ids) == 0 for c in out.chunks)
    assert out.streamed_drafts + out.cut_drafts == final.metrics.accepted_drafts, (
        out.streamed_drafts,
        out.cut_drafts,
        final.metrics.accepted_drafts,
    )
    return out


def run(engine: Engine, requests: list[GenerationRequest], timeout: float = 300.0) -> dict[str, Outcome]:
    """Submits all requests at once, waits for all, checks each; {request_id: Outcome}."""
    pending = [submit(engine, r)[0] for r in requests]
    return {o.request_id: wait_checked(o, timeout) for o in pending}
