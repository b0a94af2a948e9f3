"""Test set-up shared by every test.

- Tests run on the CPU with float32 and the fewest XLA optimisations (compile time dominates tiny models).
- `torchvision` is hidden: the lpips reference package pulls PyPI's torchvision, a CUDA build that cannot
  import beside the CPU torch 2.13 wheel, and transformers/diffusers would try to import it. With
  `sys.modules["torchvision"] = None` they see it as absent. The LPIPS parity test lends lpips a small
  stand-in VGG16 (tests/reference_vgg.py) for the one import that needs it.
"""
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.modules.setdefault("torchvision", None)

import jax  # noqa: E402

jax.config.update("jax_disable_most_optimizations", True)
jax.config.update("jax_threefry_partitionable", True)
jax.config.update("jax_default_matmul_precision", "highest")
