"""What ``--math-dtype recipe`` changes: every data-free method merged both ways at bfloat16.

A recipe with ``dtype: bfloat16`` rounds the inputs to bf16 in both settings. With ``float32`` (the
default) the method then computes in float32; with ``recipe`` it computes in bf16, as mergekit
does. This merges a small Llama-shaped bf16 trio (a base and two fine-tunes, from
``make_checkpoints.py``) with every data-free method under both settings and reports, over every
output element, the share that differ and the largest absolute difference. With ``--mergekit``
it also runs mergekit's ``mergekit-yaml`` on the same recipes and reports how far each setting is
from mergekit's output (for the methods mergekit has).

Example (mergekit in its own venv):
    PYTHONPATH=src python benchmarks/math_dtype.py --mergekit /tmp/mkvenv/bin/mergekit-yaml
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_checkpoints import LlamaShape, make_set  # noqa: E402
from measure import load_average  # noqa: E402

# Big enough that a method's thresholds and norms see thousands of entries per tensor, small
# enough that 29 methods x 2 settings (x mergekit) run in minutes on two cores.
SHAPE = LlamaShape("math-dtype", 2048, 256, 704, 4, 4, 4, False)
MODELS = 2  # fine-tunes besides the base: the most that every method with a fixed count takes


def method_recipe(spec, folders: list[Path]) -> dict:
    """A recipe for ``spec`` over the base and fine-tunes, with values that make each method do
    real work (TIES-family densities of 0.5, a nearswap ``t`` of the deltas' size)."""
    from mergeforge.methods.registry import BaseUse

    base, *tuned = (str(f) for f in folders)
    count = max(spec.min_models, min(MODELS, spec.max_models or MODELS))
    recipe: dict = {"merge_method": spec.name, "dtype": "bfloat16"}
    if spec.base != BaseUse.NONE:
        recipe["base_model"] = base
    per_model, shared = {}, {}
    for param in spec.params:
        value = {"weight": 0.5, "density": 0.5, "t": 0.001 if spec.name == "nearswap" else 0.5}.get(param.name)
        if value is None and not param.required:
            continue
        (per_model if param.per_model else shared)[param.name] = value if value is not None else param.default
    recipe["models"] = [{"model": m, **({"parameters": dict(per_model)} if per_model else {})} for m in tuned[:count]]
    if shared:
        recipe["parameters"] = shared
    return recipe


def load_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    state: dict = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def difference(first: dict, second: dict) -> tuple[float, float]:
    """(share of output elements that differ, largest absolute difference) over shared tensors,
    ``second`` rounded to ``first``'s dtype (mergekit writes some methods' outputs in float32
    whatever the recipe's dtype, e.g. arcee_fusion, whose mask is float32)."""
    import torch

    differing = total = 0
    largest = 0.0
    for name, tensor in first.items():
        a, b = tensor.to(torch.float32), second[name].to(tensor.dtype).to(torch.float32)
        changed = a != b
        differing += int(changed.sum())
        total += a.numel()
        if changed.any():
            largest = max(largest, float((a - b).abs().max()))
    return differing / max(total, 1), largest


def run_mergekit(command: str, recipe: Path, out: Path) -> dict | None:
    done = subprocess.run([command, str(recipe), str(out), "--no-copy-tokenizer", "--allow-crimes"], capture_output=True, text=True)
    return load_weights(out) if done.returncode == 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=os.environ.get("BENCH_CACHE", ".cache/bench"))
    parser.add_argument("--mergekit", default=None, help="mergekit-yaml to compare with (in its own venv)")
    parser.add_argument("--methods", nargs="*", default=None, help="only these methods")
    args = parser.parse_args()

    from mergeforge import merge
    from mergeforge.methods.registry import all_methods

    root = Path(args.cache) / "math_dtype"
    folders = make_set(SHAPE, root / "models", finetunes=MODELS)
    specs = [m for m in all_methods() if m.calibrate is None and (not args.methods or m.name in args.methods)]
    started, load_before = time.perf_counter(), load_average()
    header = "| method | elements differing | max abs diff |"
    rule = "| --- | ---: | ---: |"
    if args.mergekit:
        header += " float32 vs mergekit | recipe vs mergekit |"
        rule += " ---: | ---: |"
    rows = [header, rule]
    for spec in specs:
        work = root / spec.name
        work.mkdir(parents=True, exist_ok=True)
        recipe_path = work / "recipe.yml"
        recipe_path.write_text(yaml.safe_dump(method_recipe(spec, folders), sort_keys=False))
        outputs = {}
        for math_dtype in ("float32", "recipe"):
            out = work / math_dtype
            try:
                merge(recipe_path, out, math_dtype=math_dtype, overwrite=True, quiet=True, copy_tokenizer=False)
            except Exception as error:  # a method that cannot compute in bf16 is a finding, not a crash
                outputs[math_dtype] = f"fails: {type(error).__name__}: {str(error).splitlines()[0][:80]}"
                continue
            outputs[math_dtype] = load_weights(out)
        if isinstance(outputs["float32"], dict) and isinstance(outputs["recipe"], dict):
            share, largest = difference(outputs["float32"], outputs["recipe"])
            row = f"| `{spec.name}` | {share:.2%} | {largest:.3g} |"
        else:
            failure = next(v for v in outputs.values() if isinstance(v, str))
            row = f"| `{spec.name}` | {failure} | |"
        if args.mergekit:
            reference = run_mergekit(args.mergekit, recipe_path, work / "mergekit")
            for math_dtype in ("float32", "recipe"):
                ours = outputs[math_dtype]
                if reference is None or not isinstance(ours, dict):
                    row += " — |"
                else:
                    share, largest = difference(ours, reference)
                    row += f" {share:.2%} ({largest:.2g}) |"
        rows.append(row)
        print(row, flush=True)
    print()
    print(f"- {SHAPE.parameters / 1e6:.1f}M-parameter bf16 Llama trio, recipe dtype bfloat16; "
          f"{platform.machine()}, {os.cpu_count()} cores; load average {load_before} before, {load_average()} after; "
          f"{time.perf_counter() - started:.0f} s")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
