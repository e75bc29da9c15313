"""Test-wide JAX settings: strict numerics, 8 CPU devices.

Tests that need several devices carry `@pytest.mark.multidevice`; they run
in CI like every other test (the marker names them, it does not skip them).
"""

import jax

# The config (not chex.set_n_cpu_devices, which exports XLA_FLAGS) keeps
# the training scripts' subprocesses on their own device count.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "multidevice: needs the 8 CPU devices set in conftest.py")
