"""Tiny models with a real byte-level BPE tokenizer, for the GGUF tests: llama.cpp and
transformers' GGUF loader both need a tokenizer they can convert, which the other tests' word-level
one is not."""

from __future__ import annotations

from pathlib import Path

import torch

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "merging models keeps what each fine-tune learned",
    "llama.cpp loads gguf files; transformers loads safetensors",
    "one two three four five six seven eight nine ten 12345",
] * 20
ARCHS = ("llama", "qwen2", "qwen3", "gemma2")


def save_bpe_tokenizer(path: Path) -> int:
    """A byte-level BPE tokenizer (GPT-2 style) trained on a tiny corpus; returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(path)
    return len(fast)


def tiny_config(arch: str, vocab: int):
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6)
    if arch == "llama":
        return tf.LlamaConfig(**common, tie_word_embeddings=False, rope_theta=50000.0)
    if arch == "qwen2":
        return tf.Qwen2Config(**common, tie_word_embeddings=True)
    if arch == "qwen3":
        # transformers reads no head_dim from a qwen3 GGUF (it assumes 128, as every Qwen3 has)
        return tf.Qwen3Config(**common, head_dim=128, tie_word_embeddings=True)
    if arch == "gemma2":
        # head_dim = query_pre_attn_scalar = 256, as in Gemma 2 2B and 9B: llama.cpp scales attention by
        # head_dim, and transformers' GGUF reader leaves query_pre_attn_scalar at its default, 256
        return tf.Gemma2Config(**common, head_dim=256, query_pre_attn_scalar=256, sliding_window=64)
    raise ValueError(arch)


def build(arch: str, path: Path, seed: int = 0, base: Path | None = None, noise: float = 0.02) -> Path:
    """A random tiny model, or ``base`` plus Gaussian noise, with the BPE tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    if base is not None:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * noise)
        model.save_pretrained(path)
        AutoTokenizer.from_pretrained(base).save_pretrained(path)
        return path
    path.mkdir(parents=True)
    vocab = save_bpe_tokenizer(path)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab))
    with torch.no_grad():  # norms away from 1 (and Gemma's from 0), so an offset mistake shows
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(torch.randn(parameter.shape) * 0.1)
    model.save_pretrained(path)
    # As transformers saves the tokenizer for this model type: for qwen2 it is Qwen2Tokenizer,
    # whose own pre-tokenizer (digits one by one) replaces the trained one, as in real Qwen2 folders.
    AutoTokenizer.from_pretrained(path).save_pretrained(path)
    return path


def logits(folder: Path, gguf_file: str | None = None, ids: list[int] | None = None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    with torch.no_grad():
        return model(torch.tensor([ids or [1, 5, 9, 42, 7, 100, 3, 250]])).logits[0]


def save_sentencepiece_style_tokenizer(path: Path) -> int:
    """A Llama-2-style tokenizer: BPE over '▁'-joined words with byte fallback (<0xNN> tokens),
    which GGUF stores as a ``llama`` tokenizer with scores. Returns its size."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", *[f"<0x{i:02X}>" for i in range(256)]],
                                  show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)
    return len(fast)
