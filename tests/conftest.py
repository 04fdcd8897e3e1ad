"""Shared pytest setup.

Tests run on CPU with 8 virtual host devices, so data-parallel / FSDP code is exercised
in-process exactly as on an 8-accelerator host. This must happen before jax is imported.
Single-device code is unaffected (it runs on the first device).
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
# The suite compiles hundreds of small programs and runs each for a few steps: LLVM's
# optimization passes cost more time than they save (about a quarter of a tiny run). The
# programs compute the same functions; tests that compare two runs compile both alike.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

# A persistent compilation cache for the session: many tests compile the same tiny models
# (a run, its resumed twin, a sweep of them), and a cache hit returns the very executable
# a fresh compile would, so results are unchanged and only compile time is saved.
import tempfile  # noqa: E402

import jax  # noqa: E402

# FLAXLAB_TEST_JAX_CACHE=DIR keeps it across sessions; =off disables it.
_CACHE = os.environ.get("FLAXLAB_TEST_JAX_CACHE", "")
if _CACHE != "off":
    jax.config.update("jax_compilation_cache_dir", _CACHE or tempfile.mkdtemp(prefix="jaxc_"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
