"""train/llsa_dit.py's train step on a device mesh: compiled once, and the
losses of one device.

The step is built as the script builds it (`create_train_state`,
`make_train_step`, batches sharded by `parallel.global_batch` over a mesh
of all devices) on a tiny config: after the first step, new batches and
step numbers compile nothing, and a (data=4, fsdp=2) mesh gives the losses
of a single device.
"""

from __future__ import annotations

from absl.testing import absltest
import chex
import jax
import numpy as np
import pytest

from tests import chex_helpers
from train import llsa_dit
from train.configs import llsa_dit as llsa_dit_config
from train.lib import data
from train.lib import parallel

pytestmark = pytest.mark.multidevice

NUM_STEPS = 3


def _tiny_config():
  config = llsa_dit_config.get_config()
  config.data.image_size = 16
  config.model.hidden_size = 32
  config.model.depth = 1
  config.model.num_heads = 2
  config.attn.options.topk = 4
  config.batch_size = 8  # one example per test device
  return config


def _runner(config, mesh):
  """step -> metrics of the script's train step on `mesh`."""
  dataset = data.make_dataset(config)
  state = llsa_dit.create_train_state(config, mesh)
  train_step = llsa_dit.make_train_step(config)

  def run(step):
    ids = data.local_indices(dataset, step, config.batch_size, config.seed)
    images = parallel.global_batch(dataset.load(ids), mesh)
    labels = parallel.global_batch(
        dataset.labels[ids].astype(np.int32), mesh)
    return train_step(state, images, labels, np.int32(step))

  return run


class MeshTest(absltest.TestCase):

  def test_data_and_fsdp_mesh_matches_one_device(self):
    config = _tiny_config()
    config.mesh.fsdp = 2
    mesh = parallel.make_mesh(config.mesh.fsdp)
    self.assertEqual(dict(mesh.shape), {"data": 4, "fsdp": 2})
    one = jax.make_mesh((1, 1), ("data", "fsdp"), devices=jax.devices()[:1],
                        axis_types=(jax.sharding.AxisType.Auto,) * 2)
    sharded, single = _runner(config, mesh), _runner(config, one)
    for step in range(NUM_STEPS):
      got, want = sharded(step), single(step)
      chex.assert_trees_all_close(got, want, rtol=2e-4, atol=1e-5,
                                  custom_message=f"step {step}")

  def test_train_step_compiles_once(self):
    config = _tiny_config()
    run = _runner(config, parallel.make_mesh(config.mesh.fsdp))

    with chex_helpers.count_compiles() as first:
      run(0)
    self.assertNotEmpty(first)
    with chex_helpers.count_compiles() as later:
      metrics = [run(step) for step in range(1, NUM_STEPS)]
    self.assertEmpty(later)
    chex.assert_tree_all_finite(metrics)


if __name__ == "__main__":
  absltest.main()
