"""Mixture-of-Experts models from dense fine-tunes of one base (mergekit-moe's recipes)."""

# mergekit-moe's flag for building an MoE whose experts are all one model.
ALLOW_ALL_SAME_FLAG = "--i-understand-this-is-not-useful-without-training"
