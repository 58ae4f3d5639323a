"""Shared fixtures: tiny random Hugging Face models built locally with transformers (never
downloaded), and fine-tunes made as small perturbations of a base, saved as real folders."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models: one intra-op thread is faster (thread hand-offs dominate small matrices), and the
# engine's own worker threads still use both cores.
torch.set_num_threads(1)

VOCAB = 96


# Fixtures of tests that merge model folders: those go through an executor, which picks its dtype
# from the recipe, so they run once.
_FOLDER_FIXTURES = {"tmp_path", "tmp_path_factory", "model_factory", "llama_family", "plugin_site"}


def pytest_generate_tests(metafunc):
    # The method tests on tensors run in float32 (on the CPU: the NumPy kernels) and in float64 (the
    # torch code, as on a GPU).
    names = set(metafunc.fixturenames)
    if metafunc.module.__name__.startswith("test_methods_") and "method_dtype" in names and not names & _FOLDER_FIXTURES:
        metafunc.parametrize("method_dtype", [torch.float32, torch.float64], ids=["f32", "f64"], indirect=True)


@pytest.fixture(autouse=True)
def method_dtype(request):
    """The dtype methods_support.run_method computes in for this test (float32 outside test_methods_*)."""
    import methods_support

    methods_support.COMPUTE_DTYPE = getattr(request, "param", torch.float32)
    yield methods_support.COMPUTE_DTYPE
    methods_support.COMPUTE_DTYPE = torch.float32


def tiny_config(kind: str):
    import transformers as tf

    if kind == "llama":
        return tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    if kind == "mistral":
        return tf.MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if kind == "qwen2":
        return tf.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    if kind == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64)
    if kind == "bert":
        return tf.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=64)
    raise ValueError(kind)


def save_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for i in range(32, 32 + VOCAB - 4):
        vocab[chr(i)] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(path)


def build_model(kind: str, path: Path, seed: int = 0, base: Path | None = None, noise: float = 0.02,
                shard_size: str | None = None, tokenizer: bool = True, dtype: torch.dtype = torch.float32) -> Path:
    """A tiny model: random (seed) or, with ``base``, the base plus Gaussian noise of scale ``noise``."""
    import transformers as tf

    torch.manual_seed(seed)
    config = tiny_config(kind)
    model_class = tf.BertModel if kind == "bert" else tf.AutoModelForCausalLM
    if base is not None:
        model = model_class.from_pretrained(base) if kind == "bert" else model_class.from_pretrained(base, dtype=torch.float32)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * noise)
    else:
        model = model_class.from_config(config) if kind != "bert" else model_class(config)
    model = model.to(dtype)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(path, **kwargs)
    if tokenizer:
        save_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory) -> Callable[..., Path]:
    """build(kind, name, seed=0, base=None, ...) -> folder, cached per session by arguments."""
    cache: dict[tuple, Path] = {}
    root = tmp_path_factory.mktemp("models")

    def build(kind: str, name: str, seed: int = 0, base: Path | None = None, **kwargs) -> Path:
        key = (kind, name, seed, base, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = build_model(kind, root / name, seed=seed, base=base, **kwargs)
        return cache[key]

    return build


@pytest.fixture(scope="session")
def llama_family(model_factory) -> dict[str, Path]:
    """A tiny Llama base and three fine-tunes of it."""
    base = model_factory("llama", "llama-base", seed=0)
    return {
        "base": base,
        **{f"ft{i}": model_factory("llama", f"llama-ft{i}", seed=i, base=base) for i in (1, 2, 3)},
    }


@pytest.fixture(scope="session")
def tiny_zoo_dir() -> Path:
    """The tiny zoo's folder (seed 0): built on first use, then cached by content hash."""
    from mergeforge.zoo import build_zoo
    from mergeforge.zoo.build import default_zoo_dir

    build_zoo(None, size="tiny", seed=0)
    return default_zoo_dir("tiny", 0)


@pytest.fixture(scope="module")
def private_hf_cache(tmp_path_factory) -> Iterator[Path]:
    """Offline mode and a private `datasets` cache (lm-eval's tasks load their JSONL through it),
    for this process and the CLI subprocesses (which inherit the environment). `datasets` reads
    its cache path when first imported, so an earlier import is pointed there too."""
    cache = tmp_path_factory.mktemp("hf-home")
    patch = pytest.MonkeyPatch()
    for name, value in {"HF_HOME": cache, "HF_DATASETS_CACHE": cache / "datasets", "HF_HUB_OFFLINE": "1",
                        "HF_DATASETS_OFFLINE": "1"}.items():
        patch.setenv(name, str(value))
    if "datasets" in sys.modules:
        patch.setattr(sys.modules["datasets"].config, "HF_DATASETS_CACHE", cache / "datasets")
    yield cache
    patch.undo()


@pytest.fixture
def scratch_methods():
    """The method registry; methods registered during the test are unregistered afterwards."""
    from mergeforge.methods.registry import METHODS, all_methods

    all_methods()  # built-ins and installed plugins first, so only the test's own registrations are new
    before = set(METHODS.names())
    yield METHODS
    for name in set(METHODS.names()) - before:
        METHODS.remove(name)


def run_cli(*args: str, cwd: Path | None = None, timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess."""
    return subprocess.run([sys.executable, "-m", "mergeforge", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    return state
