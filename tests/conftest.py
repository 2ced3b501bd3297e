"""Test set-up: 8 fake CPU devices, so every sharded code path is exercised here.

XLA reads the flag when jax initialises its backend, so it must be set before any test imports
jax. Unsharded tests simply use the first device.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download anything
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
