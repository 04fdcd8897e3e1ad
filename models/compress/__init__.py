"""Compression transforms on parameter pytrees (quantize, prune, LoRA)."""
