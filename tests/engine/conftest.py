"""Fixtures: tiny random float32 models sharing a byte-level BPE tokenizer; SmolLM2 when loadable."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from service.engine import Engine, EngineConfig
from service.models.loading import LoadedModel
from tests.engine.helpers import make_model, make_tokenizer, perturbed


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def target(tokenizer) -> LoadedModel:
    return make_model(tokenizer, seed=0, name="tiny-target", vocab_size=len(tokenizer))


@pytest.fixture(scope="session")
def other_draft(tokenizer) -> LoadedModel:
    """An unrelated random model with the same vocabulary: acceptance is low."""
    return make_model(tokenizer, seed=1, name="tiny-other", vocab_size=len(tokenizer), layers=1, hidden=32)


@pytest.fixture(scope="session")
def close_draft(target) -> LoadedModel:
    """The target with noisy weights: acceptance is partial, so both paths get exercised."""
    return perturbed(target, seed=2, scale=0.05, name="tiny-close")


@pytest.fixture(scope="session")
def same_draft(target) -> LoadedModel:
    """The target itself as draft: acceptance is ~100% (the long-acceptance path)."""
    return LoadedModel(
        name="tiny-same",
        model=target.model,
        tokenizer=target.tokenizer,
        device=target.device,
        dtype=target.dtype,
    )


@pytest.fixture
def make_engine() -> Iterator:
    """Factory: make_engine(target, draft=None, **config) -> started Engine, stopped at teardown."""
    engines: list[Engine] = []

    def factory(
        target: LoadedModel, draft: LoadedModel | None = None, start: bool = True, **config
    ) -> Engine:
        config.setdefault("kv_cache_tokens", 512)
        config.setdefault("instance_id", "test-instance")
        engine = Engine(target, EngineConfig(**config), draft=draft)
        if start:
            engine.start()
        engines.append(engine)
        return engine

    yield factory
    for engine in engines:
        engine.stop(drain_timeout_s=0)


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    """SmolLM2-135M-Instruct in float32 on CPU, through the project's loader."""
    from service.models import loading as model_loading

    load_model = getattr(model_loading, "load_model", None)
    if load_model is None:
        pytest.skip("service.models.loading.load_model does not exist yet: SmolLM2 tests skipped")
    try:
        return load_model("smollm2-135m-instruct", dtype=torch.float32, device="cpu")
    except Exception as exc:  # noqa: BLE001 - no network / no file: skip with the reason
        pytest.skip(f"could not load smollm2-135m-instruct: {exc!r}")


@pytest.fixture(scope="session")
def loopy(tokenizer) -> LoadedModel:
    """A target whose attention barely matters: its greedy output falls into cycles, so
    n-gram lookups over its own tokens hit and get accepted."""
    loaded = make_model(tokenizer, seed=0, name="tiny-loopy", vocab_size=len(tokenizer))
    with torch.no_grad():
        for layer in loaded.model.model.layers:
            layer.self_attn.o_proj.weight.mul_(0.01)
    return loaded


@pytest.fixture(scope="session")
def loopy_draft(loopy) -> LoadedModel:
    return perturbed(loopy, seed=3, scale=0.05, name="tiny-loopy-draft")
