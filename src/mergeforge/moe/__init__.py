"""Mixture-of-Experts models from dense fine-tunes of one base (mergekit-moe's recipes)."""
