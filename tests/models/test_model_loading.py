"""service.models.loading: known models, directories, GGUF conversion cache, vocabulary check."""

from __future__ import annotations

import pytest
import torch
import transformers

from service.models import loading as model_loading
from service.models import store as model_store
from service.models.loading import (
    LoadedModel,
    ModelLoadError,
    check_same_vocabulary,
    load_model,
    resolve_device,
    resolve_dtype,
)

from .conftest import tiny_model, tiny_tokenizer

SMOL = model_store.DEFAULT_MODEL


@pytest.fixture
def from_pretrained_spy(monkeypatch):
    """Records the keyword arguments of every AutoModelForCausalLM/AutoTokenizer.from_pretrained."""
    calls: list[tuple[str, dict]] = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        real = cls.from_pretrained

        def spy(*args, _real=real, _name=cls.__name__, **kwargs):
            calls.append((_name, kwargs))
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    return calls


@pytest.fixture
def convert_spy(monkeypatch):
    calls = []
    real = model_loading._convert_gguf

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(model_loading, "_convert_gguf", spy)
    return calls


# ------------------------------------------------------------------ SmolLM2 (real GGUF)


@pytest.fixture(scope="session")
def smol_cache(tmp_path_factory):
    """A fresh cache whose models/ links to the GGUF in the real cache (fetched once per machine),
    so the first load in this session always converts and the second always reads the copy."""
    gguf = model_store.fetch(SMOL)
    cache = tmp_path_factory.mktemp("specdec-cache")
    (cache / "models").mkdir()
    for p in (gguf, gguf.with_name(gguf.name + ".verified.json")):
        (cache / "models" / p.name).symlink_to(p)
    return cache


@pytest.fixture(scope="session")
def smol_first(smol_cache):
    """SmolLM2 loaded for the first time into smol_cache: this converts the GGUF."""
    calls = []
    real = model_loading._convert_gguf
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(model_loading, "_convert_gguf", lambda *a: (calls.append(a), real(*a))[1])
        loaded = load_model(SMOL, dtype="float32", device="cpu", cache_dir=smol_cache)
    assert len(calls) == 1
    return loaded


def _chat_ids(loaded: LoadedModel) -> torch.Tensor:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = loaded.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return loaded.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids


@pytest.mark.slow
def test_smollm2_loads_ready_for_the_engine(smol_first, smol_cache):
    m = smol_first
    assert m.name == SMOL and m.device == torch.device("cpu") and m.dtype == torch.float32
    assert not m.model.training
    assert all(not p.requires_grad for p in m.model.parameters())
    assert all(p.dtype == torch.float32 for p in m.model.parameters())
    assert m.vocab_size == len(m.tokenizer) == 49152 == model_loading.output_size(m)
    assert m.max_context_tokens == 8192
    converted = list((smol_cache / "converted").iterdir())
    assert [p.name for p in converted] == ["b179c9523d0e6a0f-float32"]  # no temp dir left over
    assert (converted[0] / model_loading.CONVERTED_MARKER).is_file()


@pytest.mark.slow
def test_smollm2_eos_and_chat_template(smol_first):
    """The engine stops on generation_config's EOS ids; the service applies the chat template."""
    tok, gen = smol_first.tokenizer, smol_first.model.generation_config
    # (transformers 5.17 reads EOS <|im_start|> and no pad from the GGUF; the loader fixes that.)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.pad_token_id == 2
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert eos == [2]
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_smollm2_greedy_answer_is_sensible(smol_first):
    m = smol_first
    ids = _chat_ids(m)
    with torch.no_grad():
        out = m.model.generate(ids, max_new_tokens=10, do_sample=False)
    new = out[0, ids.shape[1] :].tolist()
    assert m.tokenizer.decode(new[0]).strip() == "The"
    assert "Paris" in m.tokenizer.decode(new)
    assert new[-1] == m.tokenizer.eos_token_id  # "The capital of France is Paris.<|im_end|>"


@pytest.mark.slow
def test_second_load_reads_the_converted_copy(smol_first, smol_cache, convert_spy, from_pretrained_spy):
    second = load_model(SMOL, dtype="float32", device="cpu", cache_dir=smol_cache)
    assert convert_spy == []
    assert from_pretrained_spy and all("gguf_file" not in kw for _, kw in from_pretrained_spy)
    ids = _chat_ids(smol_first)
    with torch.no_grad():
        a = smol_first.model(ids).logits
        b = second.model(ids).logits
    assert torch.equal(a, b)
    assert second.tokenizer.get_vocab() == smol_first.tokenizer.get_vocab()
    assert second.tokenizer.chat_template == smol_first.tokenizer.chat_template
    check_same_vocabulary(smol_first, second)


@pytest.mark.slow
def test_gguf_file_path_shares_the_converted_copy(smol_first, smol_cache, convert_spy):
    path = smol_cache / "models" / model_store.REGISTRY[SMOL].filename
    loaded = load_model(str(path), dtype="float32", device="cpu", cache_dir=smol_cache)
    assert convert_spy == [] and loaded.name == str(path)


# ------------------------------------------------------------------ tiny random models


def test_directory_loading(tiny_model_dir):
    m = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    assert isinstance(m, LoadedModel) and m.name == str(tiny_model_dir)
    assert not m.model.training and all(not p.requires_grad for p in m.model.parameters())
    assert m.vocab_size == len(m.tokenizer) == 64
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = m.tokenizer("w1 w2 w3", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(m.model(ids).logits, ref(ids).logits)
    m16 = load_model(tiny_model_dir, dtype="bf16", device="cpu")
    assert m16.dtype == torch.bfloat16 and next(m16.model.parameters()).dtype == torch.bfloat16


def _loaded(name: str, n_words: int, vocab_size: int | None = None) -> LoadedModel:
    tok = tiny_tokenizer(n_words)
    model = tiny_model(vocab_size or len(tok))
    return LoadedModel(name=name, model=model, tokenizer=tok, device=torch.device("cpu"), dtype=torch.float32)


def test_same_vocabulary_passes():
    check_same_vocabulary(_loaded("target", 61), _loaded("draft", 61))


def test_vocabulary_size_mismatch_names_models_and_sizes():
    with pytest.raises(ValueError) as exc:
        check_same_vocabulary(_loaded("big-target", 61), _loaded("small-draft", 29))
    msg = str(exc.value)
    assert "big-target" in msg and "small-draft" in msg
    assert "tokenizer 64 tokens, output size 64" in msg
    assert "tokenizer 32 tokens, output size 32" in msg


def test_output_size_mismatch_with_same_tokenizer_is_an_error():
    with pytest.raises(
        ValueError, match="output layers have different sizes.*output size 64.*output size 96"
    ):
        check_same_vocabulary(_loaded("t", 61), _loaded("d", 61, vocab_size=96))


def test_same_size_different_tokens_is_an_error():
    t, d = _loaded("t", 61), _loaded("d", 61)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"x{i}": i + 3 for i in range(61)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    d.tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")
    with pytest.raises(ValueError, match="map tokens differently"):
        check_same_vocabulary(t, d)


# ------------------------------------------------------------------ errors and defaults


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope.gguf"), device="cpu")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("./no/such/dir", device="cpu")


def test_non_gguf_file_is_a_clear_error(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        load_model(str(f), device="cpu")


def test_bad_gguf_file_is_a_clear_error(tmp_path):
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="could not read GGUF file"):
        load_model(str(f), device="cpu", cache_dir=tmp_path / "cache")
    assert not any((tmp_path / "cache" / "converted").glob("*-float32"))


def test_unreachable_hub_id_is_a_clear_error():
    # local_files_only keeps the test off the network (without it the hub retries for a while).
    with pytest.raises(ModelLoadError) as exc:
        load_model("no-such-org/no-such-model", device="cpu", local_files_only=True)
    msg = str(exc.value)
    assert "no-such-org/no-such-model" in msg and "hub id" in msg and SMOL in msg


def test_unknown_dtype_is_rejected():
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("float8", torch.device("cpu"))


def test_dtype_and_device_defaults():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype(torch.float16, torch.device("cpu")) == torch.float16
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
