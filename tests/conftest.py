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
