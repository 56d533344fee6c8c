"""Tiny random causal LMs with a real byte-level BPE tokenizer, in memory or saved as a
model directory (for the service tests, which load through the real loader).

Weights do not matter for these tests; the tokenizer is real (multi-byte characters split
across tokens, an EOS token, a chat template), so detokenization and stop strings are
exercised.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from service.models.loading import LoadedModel

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps. The fox runs away.",
    "Speculative decoding drafts tokens and verifies them with the target model.",
    "Unicode: café, naïve, Ünïcödé, 日本語のテキスト, emoji 🙂🚀✨, ½ ≠ ∞.",
    "def add(x, y):\n    return x + y\n\nprint(add(1, 2))\n",
]


def make_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE (so multi-byte characters split across tokens), EOS = id 0."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def make_model(
    tokenizer: object,
    seed: int,
    name: str,
    vocab_size: int,
    layers: int = 2,
    hidden: int = 64,
    init: float = 0.2,
    max_position: int = 512,
) -> LoadedModel:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position,
        initializer_range=init,
        eos_token_id=0,
        bos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    return LoadedModel(
        name=name, model=model, tokenizer=tokenizer, device=torch.device("cpu"), dtype=torch.float32
    )


def save_tiny_model(
    path: Path,
    seed: int = 0,
    layers: int = 2,
    with_eos: bool = True,
    max_position: int = 512,
    attention_scale: float = 1.0,
) -> Path:
    """A tiny model directory (weights, tokenizer with a chat template) for load_model().

    with_eos=False declares no end-of-sequence token anywhere (tokenizer, model config,
    generation config), so generation always runs to max_tokens: for tests that need a
    request to stay in flight (cancellation, deadlines, draining). attention_scale below 1
    shrinks every attention output, so the model barely looks back and its greedy output
    falls into cycles that n-gram lookups find (accepted drafts).
    """
    tokenizer = make_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    loaded = make_model(
        tokenizer, seed=seed, name="tiny", vocab_size=len(tokenizer), layers=layers, max_position=max_position
    )
    if attention_scale != 1.0:
        with torch.no_grad():
            for layer in loaded.model.model.layers:
                layer.self_attn.o_proj.weight.mul_(attention_scale)
    if not with_eos:
        tokenizer.eos_token = None
        loaded.model.config.eos_token_id = None
        loaded.model.generation_config.eos_token_id = None
    loaded.model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
