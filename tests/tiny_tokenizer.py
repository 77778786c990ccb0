"""Tiny tokenizers and Llama models for tests: built in milliseconds, no model hub.

`tiny_tokenizer()` is a byte-level BPE (so decoding gives back the exact text) with the
ChatML special tokens and SmolLM2's chat template, which has no `{% generation %}` tags and
adds a default system prompt: the case the prefix-by-prefix masking in
`loramix.training.data` is for.
`save_tiny_model(folder)` writes a 2-layer `LlamaForCausalLM` and that tokenizer as a local
transformers folder, loadable by `loramix.smollm2.load_base_model(folder)`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# SmolLM2-135M-Instruct's chat template, verbatim.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "what is two plus two? four. what is the capital of france? paris.",
    "system user assistant you are a helpful AI assistant named SmolLM",
    "hello world, answer the question in one word",
]


def tiny_tokenizer(chat_template: str | None = CHATML_TEMPLATE) -> PreTrainedTokenizerFast:
    """A ~320-token byte-level BPE tokenizer; EOS is <|im_end|>, pad is <|endoftext|>.

    Args:
        chat_template: Jinja chat template to attach; None for a tokenizer without one.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    wrapped.chat_template = chat_template
    return wrapped


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """A random 2-layer Llama with hidden size 32 (about 40k parameters)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        initializer_range=0.2,  # large enough that a LoRA can make confident predictions
    )
    return LlamaForCausalLM(config)


def save_tiny_model(folder: Path, seed: int = 0) -> Path:
    """Write a tiny Llama and `tiny_tokenizer()` to `folder` as a transformers model folder."""
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer), seed=seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
