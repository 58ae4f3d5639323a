"""How much of a quantized fine-tune's task vector is quantization noise, per GGUF type.

    python benchmarks/gguf_noise.py BASE_HF_FOLDER FINE_TUNE_HF_FOLDER

For every 2-D tensor of the fine-tune (float32), quantize it with each type the gguf package
quantizes in Python, dequantize it, and compare, over the whole model:

- weight noise: ‖deq(q(W)) − W‖ / ‖W‖ (and the same on Gaussian weights, the figure mergeforge's
  warning uses);
- the task vector τ = W_ft − W_base against τ_q = deq(q(W_ft)) − W_base: ‖τ‖ / ‖W_base‖, the
  noise-to-signal ratio ‖τ_q − τ‖ / ‖τ‖, and the cosine of τ_q with τ.

Prints a Markdown table.
"""

from __future__ import annotations

import sys

import gguf
import numpy as np

from mergeforge.checkpoint.reader import open_checkpoint
from mergeforge.engine.gguf_output import expected_noise

TYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")


def main(base_ref: str, tuned_ref: str) -> None:
    sums = {kind: np.zeros(3) for kind in TYPES}  # ‖deq(q(W)) − W‖², ‖τ_q − τ‖², τ_q·τ
    weight = task = 0.0
    quantized_task_by_type = dict.fromkeys(TYPES, 0.0)
    with open_checkpoint(base_ref) as base, open_checkpoint(tuned_ref) as tuned:
        for name in tuned.names():
            info = tuned.info(name)
            if len(info.shape) != 2 or info.shape[-1] % 32:
                continue
            w_ft = tuned.read(name).float().numpy().astype(np.float32)
            w_base = base.read(name).float().numpy().astype(np.float32)
            tau = (w_ft - w_base).astype(np.float64)
            weight += float(np.sum(w_ft.astype(np.float64) ** 2))
            task += float(np.sum(tau**2))
            for kind in TYPES:
                qtype = gguf.GGMLQuantizationType[kind]
                restored = gguf.quants.dequantize(gguf.quants.quantize(w_ft, qtype), qtype).astype(np.float64)
                tau_q = restored - w_base
                sums[kind] += [np.sum((restored - w_ft) ** 2), np.sum((tau_q - tau) ** 2), np.sum(tau_q * tau)]
                quantized_task_by_type[kind] += float(np.sum(tau_q**2))
    base_norm = weight**0.5
    print(f"base: {base_ref}\nfine-tune: {tuned_ref}\ntask vector ‖τ‖/‖W‖: {task**0.5 / base_norm:.3%}\n")
    print("| type | weight noise (this model) | weight noise (Gaussian) | noise-to-signal ‖τ_q − τ‖/‖τ‖ | cos(τ_q, τ) |")
    print("|---|---|---|---|---|")
    for kind in TYPES:
        noise, residual, dot = sums[kind]
        cosine = dot / (task**0.5 * quantized_task_by_type[kind] ** 0.5)
        print(f"| {kind} | {noise**0.5 / base_norm:.2%} | {expected_noise(kind):.2%} | {(residual / task) ** 0.5:.1f}x | {cosine:.3f} |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
