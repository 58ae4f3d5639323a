"""Everything in a Hugging Face model folder besides the weights, and the atomic output folder.

The output carries over every file and folder of the reference model (the base, else the first
model) that is not a weight file: generation config, custom code, sentence-transformers module
folders, and so on; tokenizer files come from the tokenizer source. ``config.json`` is rewritten
(dtype, and for slices the layer count and per-layer lists), and a model card and the recipe are
added.

The output is written to a temporary folder beside OUT_DIR and renamed into place only when
complete, so an interrupted merge never leaves a half-written model at OUT_DIR and never damages
an existing one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mergeforge.dtypes import TORCH_NAMES
from mergeforge.errors import OutputError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
NOT_CARRIED = {"README.md", "config.json", "mergekit_config.yml", "mergeforge_config.yml", ".git", ".gitattributes", ".cache"}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
TEMP_MARKER = ".mergeforge-tmp-"


def _is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES)


def carry_over_files(reference: Path, out: Path, tokenizer_from: Path | None) -> None:
    """Copy the reference model's non-weight files and folders, then the tokenizer's files."""
    for entry in sorted(reference.iterdir()):
        name = entry.name
        if name in NOT_CARRIED or name in TOKENIZER_FILES or name.startswith(".") or (entry.is_file() and _is_weight_file(name)):
            continue
        target = out / name
        if entry.is_dir():
            shutil.copytree(entry, target, symlinks=False)
        else:
            shutil.copy2(entry, target)
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            source = tokenizer_from / name
            if source.is_file():
                shutil.copy2(source, out / name)


def write_config(
    reference_config: dict[str, Any] | None,
    out: Path,
    dtype: str | None,
    layer_sources: list[int] | None,
    vocab_size: int | None = None,
) -> None:
    """config.json from the reference model; dtype (a safetensors name) and, for slices, layer
    count and per-layer lists updated. ``layer_sources[k]`` is the reference layer whose per-layer
    entries output layer ``k`` takes; ``vocab_size``, a merged vocabulary's rows."""
    if reference_config is None:
        return
    config = json.loads(json.dumps(reference_config))
    if vocab_size is not None:
        _set_vocab_size(config, vocab_size)
    if dtype is not None:
        dtype_name = TORCH_NAMES[dtype]
        keys = [key for key in ("dtype", "torch_dtype") if key in config] or ["torch_dtype"]
        for key in keys:
            config[key] = dtype_name
        for sub in ("text_config",):
            if isinstance(config.get(sub), dict):
                for key in ("dtype", "torch_dtype"):
                    if key in config[sub]:
                        config[sub][key] = dtype_name
    if layer_sources is not None:
        _renumber_layers(config, layer_sources)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _set_vocab_size(config: dict[str, Any], vocab_size: int) -> None:
    """``vocab_size`` at the top level, and in a multimodal model's ``text_config`` where it lives there."""
    text_config = config.get("text_config")
    if isinstance(text_config, dict) and "vocab_size" in text_config:
        text_config["vocab_size"] = vocab_size
        if "vocab_size" not in config:
            return
    config["vocab_size"] = vocab_size


def _renumber_layers(config: dict[str, Any], layer_sources: list[int]) -> None:
    old_count = next((config[key] for key in LAYER_COUNT_KEYS if isinstance(config.get(key), int)), None)
    if old_count is None:
        return
    for key in LAYER_COUNT_KEYS:
        if config.get(key) == old_count:
            config[key] = len(layer_sources)
    for key, value in list(config.items()):
        # Per-layer lists (layer_types, sliding-window flags, ...) follow their source layers.
        if isinstance(value, list) and len(value) == old_count and key not in LAYER_COUNT_KEYS:
            config[key] = [value[min(i, old_count - 1)] for i in layer_sources]


def write_model_card(out: Path, base_models: list[str], method: str, recipe_yaml: str, title: str | None = None) -> None:
    """README.md with Hugging Face front matter; ``title`` is the recipe's ``name`` (default: "Merged model")."""
    front = ["---", "base_model:"]
    front += [f"- {json.dumps(model)}" for model in base_models]
    front += ["base_model_relation: merge", "library_name: transformers", "tags:", "- merge", "- mergeforge", "---"]
    body = [
        "",
        f"# {title or 'Merged model'}",
        "",
        f"This model was made with [mergeforge](https://pypi.org/project/mergeforge/) using the `{method}` merge method.",
        "",
        "## Models merged",
        "",
        *[f"- {model}" for model in base_models],
        "",
        "## Recipe",
        "",
        "```yaml",
        recipe_yaml.rstrip(),
        "```",
        "",
    ]
    (out / "README.md").write_text("\n".join(front + body), encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# The atomic output folder


def check_output_location(out_dir: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse an OUT_DIR that is an input, lies inside one, or holds one; or is non-empty."""
    out = out_dir.resolve()
    for folder in inputs:
        folder = folder.resolve()
        if out == folder or folder in out.parents:
            raise OutputError(f"{out_dir}: the output folder is, or is inside, the input model folder {folder}; choose another")
        if out in folder.parents:
            raise OutputError(f"{out_dir}: the output folder contains the input model folder {folder}; choose another")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"{out_dir}: folder exists and is not empty; pass --overwrite to replace it")


def _remove_stale_temporaries(parent: Path, name: str) -> None:
    for entry in parent.glob(f".{name}{TEMP_MARKER}*"):
        pid_text = entry.name.rsplit("-", 2)[-2] if entry.name.count("-") >= 2 else ""
        alive = False
        if pid_text.isdigit():
            try:
                os.kill(int(pid_text), 0)
                alive = int(pid_text) != os.getpid()
            except OSError:
                alive = False
        if not alive:
            shutil.rmtree(entry, ignore_errors=True)


@contextmanager
def atomic_output_folder(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``out_dir``; on success move it to ``out_dir`` (replacing
    what was there), on any failure or interruption delete it and leave ``out_dir`` untouched."""
    out_dir = out_dir.absolute()
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{parent}: cannot create the output's parent folder: {exc.strerror}") from None
    _remove_stale_temporaries(parent, out_dir.name)
    temp = parent / f".{out_dir.name}{TEMP_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    temp.mkdir()
    previous_handler = None
    if threading_is_main():
        # SIGTERM (a killed job) unwinds like Ctrl-C, so the temporary folder is removed.
        previous_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield temp
        if out_dir.exists():
            old = parent / f".{out_dir.name}{TEMP_MARKER}old-{uuid.uuid4().hex[:8]}"
            os.rename(out_dir, old)
            os.rename(temp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(temp, out_dir)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
