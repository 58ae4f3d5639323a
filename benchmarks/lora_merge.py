"""PEFT's factor-space adapter merges against the exact delta-space merge (docs/lora.md).

    python benchmarks/lora_merge.py [WORK_DIR]
    python benchmarks/lora_merge.py WORK_DIR --zoo ZOO_DIR   # the zoo's first three LoRA experts instead

Three rank-16 LoRA adapters (alpha 32, on every attention and MLP projection) are *trained*, with
PEFT, on a tiny Llama built from a config (hidden 64, 4 layers, vocabulary 64, random weights):
each learns a different next-token rule over random sequences that start with the task's marker
token (t -> a·t + b mod 61). Then each
adapter set is merged two ways:

- PEFT's ``add_weighted_adapter`` with ``combination_type`` linear, ties (density 0.5), cat and
  svd / ties_svd (rank 16);
- ``mergeforge lora merge`` (:func:`mergeforge.lora.merge.merge_adapters`): linear and TIES on
  ΔWᵢ = scaleᵢ·BᵢAᵢ, exact or truncated to rank 16, and KnOTS-TIES.

Each merged ΔW is compared with the exact reference over all modules together,
‖ΔW − ΔW_ref‖_F / ‖ΔW_ref‖_F, where ΔW_ref is Σ wᵢΔWᵢ for linear merges and the TIES merge of the
dense ΔWᵢ for TIES merges. The table also shows each merged model's next-token accuracy on the
three tasks (held-out sequences). KnOTS-TIES is a different merge (TIES on the aligned
coefficients), so its distance from dense TIES is a difference, not an error. Prints a Markdown
table. Training takes a few minutes on two cores; a second run on the same WORK_DIR reuses the adapters.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from mergeforge.engine.api import merge_tensors
from mergeforge.lora.adapter import read_lora
from mergeforge.lora.merge import merge_adapters

VOCAB, LENGTH, RANK, ALPHA = 64, 16, 16, 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TASKS = [(7, 3), (11, 13), (13, 29)]  # t -> a·t + b mod SYMBOLS
SYMBOLS = VOCAB - len(TASKS)  # the other tokens are the task markers
WEIGHTS = [1.0, 1.0, 1.0]
DENSITY = 0.5


def sequences(task_index: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``[marker, t₀, t₁, ...]``: the task's marker token, then tᵢ₊₁ = a·tᵢ + b mod SYMBOLS, so one
    model can in principle do all three tasks (the marker says which)."""
    a, b = TASKS[task_index]
    tokens = [torch.full((count,), SYMBOLS + task_index), torch.randint(0, SYMBOLS, (count,), generator=generator)]
    for _ in range(LENGTH - 2):
        tokens.append((tokens[-1] * a + b) % SYMBOLS)
    return torch.stack(tokens, dim=1)


def base_model(folder: Path) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, max_position_embeddings=LENGTH, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def load(folder: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def train_adapter(base: Path, task: int, folder: Path, seed: int, steps: int = 100) -> Path:
    """Real LoRA training (PEFT's default init: B = 0), AdamW on the task's sequences; an adapter
    already in ``folder`` (an earlier run on the same WORK_DIR) is reused."""
    if (folder / "adapter_config.json").is_file():
        return folder
    torch.manual_seed(seed)
    model = get_peft_model(load(base), LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = sequences(task, 32, generator)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(folder)
    return folder


def accuracy(model: torch.nn.Module, task: int) -> float:
    """Next-token accuracy on held-out sequences, over the predictable positions (after t₀)."""
    batch = sequences(task, 256, torch.Generator().manual_seed(1234))
    with torch.no_grad():
        predicted = model(input_ids=batch).logits[:, 1:-1].argmax(-1)
    return float((predicted == batch[:, 2:]).float().mean())


def peft_deltas(model: PeftModel, name: str) -> dict[str, torch.Tensor]:
    """Every module's ΔW of adapter ``name`` inside a PeftModel (scaling · B · A)."""
    deltas = {}
    for path, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and name in module.lora_A:
            deltas[path] = (module.lora_B[name].weight @ module.lora_A[name].weight * module.scaling[name]).detach()
    return deltas


def relative(deltas: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    error = sum(float((deltas[name].double() - reference[name].double()).norm() ** 2) for name in reference)
    norm = sum(float(reference[name].double().norm() ** 2) for name in reference)
    return (error / norm) ** 0.5


def model_with(base: Path, deltas: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = load(base)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, delta in deltas.items():
            modules[name].weight.add_(delta)
    return model.eval()


def main(work: Path, zoo: Path | None = None) -> None:
    """Train the three adapters (or, with ``zoo``, take a zoo's LoRA experts: errors only, no
    accuracy, since their tasks are the zoo's) and print the table."""
    started = time.perf_counter()
    if zoo is None:
        base = base_model(work / "base")
        adapters = [train_adapter(base, i, work / f"adapter-{i}", seed=i) for i in range(len(TASKS))]
    else:
        from mergeforge.zoo import load_zoo

        loaded = load_zoo(zoo)
        base, adapters = loaded.base.path, [m.path for m in loaded.loras][:3]
    trained = time.perf_counter() - started
    scored = zoo is None
    singles = [{name: u.delta() for name, u in read_lora(folder).updates.items()} for folder in adapters]
    exact_linear = {name: sum(w * d[name] for w, d in zip(WEIGHTS, singles)) for name in singles[0]}
    exact_ties = {name: merge_tensors("ties", [d[name] for d in singles], base=torch.zeros_like(singles[0][name]),
                                      density=DENSITY, weight=WEIGHTS) for name in singles[0]}

    peft_model = PeftModel.from_pretrained(load(base), adapters[0], adapter_name="a0")
    for i, folder in enumerate(adapters[1:], 1):
        peft_model.load_adapter(folder, adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(adapters))]
    rows: list[tuple[str, str, float, list[float]]] = []

    def peft_row(label: str, kind: str, reference: dict[str, torch.Tensor], **kwargs: object) -> None:
        peft_model.add_weighted_adapter(names, WEIGHTS, label, **kwargs)
        deltas = peft_deltas(peft_model, label)
        rows.append((f"PEFT `{kwargs['combination_type']}`" + (f" (rank {kwargs['svd_rank']})" if "svd_rank" in kwargs else ""),
                     kind, relative(deltas, reference), scores(deltas)))

    def ours_row(label: str, kind: str, reference: dict[str, torch.Tensor], method: str, **options: object) -> None:
        recipe = {"merge_method": method, "models": [{"model": str(f), "parameters": {"weight": w}} for f, w in zip(adapters, WEIGHTS)],
                  "parameters": {"density": DENSITY} if method == "ties" else {"normalize": False}}
        merge_adapters(recipe, work / label, overwrite=True, **options)
        deltas = {name: u.delta() for name, u in read_lora(work / label).updates.items()}
        rows.append((label, kind, relative(deltas, reference), scores(deltas)))

    def scores(deltas: dict[str, torch.Tensor]) -> list[float]:
        return [accuracy(model_with(base, deltas), t) for t in range(len(TASKS))] if scored else []

    peft_row("p_linear", "linear", exact_linear, combination_type="linear")
    peft_row("p_cat", "linear", exact_linear, combination_type="cat")
    peft_row("p_svd", "linear", exact_linear, combination_type="svd", svd_rank=RANK)
    ours_row("mergeforge linear (concat, rank 48)", "linear", exact_linear, "linear")
    ours_row("mergeforge linear (QR+SVD, rank 16)", "linear", exact_linear, "linear", rank=RANK)
    peft_row("p_ties", "ties", exact_ties, combination_type="ties", density=DENSITY)
    peft_row("p_ties_svd", "ties", exact_ties, combination_type="ties_svd", density=DENSITY, svd_rank=RANK)
    ours_row("mergeforge ties (dense SVD, rank 48)", "ties", exact_ties, "ties")
    ours_row("mergeforge ties (dense SVD, rank 16)", "ties", exact_ties, "ties", rank=RANK)
    full = max(min(delta.shape) for delta in singles[0].values())
    ours_row(f"mergeforge ties (dense SVD, full rank {full})", "ties", exact_ties, "ties", rank=full)
    ours_row("mergeforge ties + KnOTS (rank 48)", "ties", exact_ties, "ties", knots=True)

    if scored:
        evaluate: Callable[[torch.nn.Module], list[float]] = lambda m: [accuracy(m.eval(), t) for t in range(len(TASKS))]  # noqa: E731
        base_accuracy = evaluate(load(base))
        own = [accuracy(PeftModel.from_pretrained(load(base), folder).eval(), task) for task, folder in enumerate(adapters)]
        print(f"three rank-{RANK} adapters trained in {trained:.0f} s; own-task accuracy {', '.join(f'{a:.3f}' for a in own)}; "
              f"base {', '.join(f'{a:.3f}' for a in base_accuracy)}\n")
    else:
        print(f"the zoo's LoRA experts: {', '.join(Path(a).name for a in adapters)}\n")
    print("| merge | reference | ‖ΔW − ΔW_ref‖ / ‖ΔW_ref‖ | accuracy task 1 / 2 / 3 |")
    print("| --- | --- | --- | --- |")
    references = {"linear": "exact Σ wᵢΔWᵢ", "ties": "TIES of the dense ΔWᵢ"}
    for label, kind, error, accuracies in rows:
        print(f"| {label} | {references[kind]} | {error:.2e} | {' / '.join(f'{a:.3f}' for a in accuracies) or 'not scored'} |")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    torch.set_num_threads(2)
    if len(sys.argv) > 2 and sys.argv[2] == "--zoo":
        main(Path(sys.argv[1]), Path(sys.argv[3]))
    elif len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as folder:
            main(Path(folder))
