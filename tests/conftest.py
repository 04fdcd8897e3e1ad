"""Shared pytest setup: float64 available for NumPy-reference comparisons, CPU only."""
import os

# Tests run on CPU in CI; keep any accidental accelerator use out of the numbers.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
