"""Semantic IDs: item text -> embedding -> residual quantization -> hierarchical codes."""
