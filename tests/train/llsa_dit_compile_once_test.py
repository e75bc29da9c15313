"""train/llsa_dit.py compiles its train step once across steps.

The step is built as the script builds it (`create_train_state`,
`make_train_step`, batches sharded by `parallel.global_batch` over a mesh
of all devices) on a tiny config; after the first step, new batches and
step numbers compile nothing.
"""

from __future__ import annotations

from absl.testing import absltest
import chex
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


class CompileOnceTest(absltest.TestCase):

  def test_train_step_compiles_once(self):
    config = _tiny_config()
    mesh = parallel.make_mesh(config.mesh.fsdp)
    dataset = data.make_dataset(config)
    state = llsa_dit.create_train_state(config, mesh)
    train_step = llsa_dit.make_train_step(config)

    def run(step):
      ids = data.local_indices(dataset, step, config.batch_size, config.seed)
      images = parallel.global_batch(dataset.load(ids), mesh)
      labels = parallel.global_batch(
          dataset.labels[ids].astype(np.int32), mesh)
      return train_step(state, images, labels, np.int32(step))

    with chex_helpers.count_compiles() as first:
      run(0)
    self.assertNotEmpty(first)
    with chex_helpers.count_compiles() as later:
      metrics = [run(step) for step in range(1, NUM_STEPS)]
    self.assertEmpty(later)
    chex.assert_tree_all_finite(metrics)


if __name__ == "__main__":
  absltest.main()
